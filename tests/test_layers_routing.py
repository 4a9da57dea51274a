"""Routers, dispatch and aux losses: known answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from pce_timm.layers import (
    CosineRouter,
    assign_slots,
    expert_capacity,
    load_balance_loss,
    route,
    router_entropy_loss,
    router_z_loss,
)
from pce_timm.layers.routers import create_router, positional_logits, uniform_logits


@pytest.mark.parametrize('top_k', [1, 2, 3])
def test_route_weights_sum_to_one_and_respect_top_k(top_k):
    logits = torch.randn(50, 4)
    probs, indices, weights = route(logits, top_k)
    assert torch.allclose(probs.sum(-1), torch.ones(50))
    assert indices.shape == weights.shape == (50, top_k)
    assert torch.allclose(weights.sum(-1), torch.ones(50), atol=1e-6)
    assert torch.equal(indices, probs.topk(top_k, -1).indices)
    assert (weights > 0).all()


def test_route_soft_and_top1_gradient():
    logits = torch.randn(10, 4, requires_grad=True)
    probs, indices, weights = route(logits, 4)
    assert torch.equal(indices, probs.argsort(-1, descending=True))  # most probable first, soft too
    assert torch.allclose(weights, probs.gather(-1, indices))
    _, _, weights = route(logits, 1)
    assert torch.allclose(weights, torch.ones(10, 1))
    (weights * torch.randn(10, 1)).sum().backward()  # straight-through: top-1 still trains the router
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_route_gumbel_only_while_training():
    logits = torch.randn(200, 4)
    assert torch.equal(route(logits, 1, gumbel_tau=1.0, training=False)[1], route(logits, 1)[1])
    torch.manual_seed(0)
    sampled = route(logits, 1, gumbel_tau=1.0, training=True)[1]
    assert not torch.equal(sampled, route(logits, 1)[1])


def test_capacity():
    assert expert_capacity(64, 8, 1, 1.0) == 8
    assert expert_capacity(64, 8, 2, 1.25) == 20
    assert expert_capacity(64, 8, 8, 1.0) == 64  # top-E: every expert sees every token
    assert expert_capacity(3, 8, 1, 1.0) == 1


def test_assign_slots_keeps_within_capacity_and_reroutes_overflow():
    indices = torch.tensor([[0], [0], [0], [1], [0], [2]])  # expert 0 wanted 4 times, capacity 2
    capacity = expert_capacity(6, 3, 1, 1.0)
    slot, token_of_slot = assign_slots(indices, 3, capacity)
    assert capacity == 2 and slot.shape == (1, 6)
    assert slot[0, :2].tolist() == [0, 1]  # first two claim expert 0
    assert sorted(slot[0].tolist()) == list(range(6))  # nobody dropped, every slot used once
    assert slot[0, 3].item() == 2 and slot[0, 5].item() == 4  # chosen experts kept where there was room
    for token, s in enumerate(slot[0].tolist()):
        assert token_of_slot[s].item() == token


def test_assign_slots_drops_only_when_all_slots_taken():
    indices = torch.zeros(10, 1, dtype=torch.long)
    slot, token_of_slot = assign_slots(indices, 2, 3)  # 6 slots for 10 tokens
    assert (slot[0] < 6).sum() == 6 and (slot[0] == 6).sum() == 4
    assert (token_of_slot < 10).all()


def test_cosine_router_init_keys_recovers_clusters():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 16), dim=1) * 5
    labels = torch.arange(4).repeat_interleave(50)
    points = centers[labels] + 0.1 * torch.randn(200, 16)
    router = CosineRouter(16, 4)
    found = router.init_keys(points, seed=0)
    # every true cluster maps to exactly one fitted cluster
    pairs = {(int(t), int(f)) for t, f in zip(labels, found, strict=True)}
    assert len(pairs) == 4
    chosen = router(points.unsqueeze(0), torch.zeros(200, 2)).argmax(-1)[0]
    assert len({(int(t), int(c)) for t, c in zip(labels, chosen, strict=True)}) == 4


def test_cosine_router_ema_update_moves_used_keys_only():
    router = CosineRouter(8, 3)
    before = router.keys.detach().clone()
    target = F.normalize(torch.randn(1, 8), dim=1)
    router.ema_update(target.repeat(5, 1), torch.zeros(5, dtype=torch.long), decay=0.5)
    assert torch.equal(router.keys[1:], before[1:])
    assert F.cosine_similarity(router.keys[:1], target).item() > F.cosine_similarity(before[:1], target).item()
    assert router.keys.grad is None


def test_router_logits_are_float32_under_autocast():
    embeddings, positions = torch.randn(2, 5, 21), torch.zeros(5, 2)
    for name in ('cosine', 'mlp', 'positional', 'uniform'):
        router = create_router(name, 21, 4)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = router(embeddings.bfloat16(), positions)
        assert logits.dtype == torch.float32 and logits.shape == (2, 5, 4), name


def test_positional_and_uniform_routing():
    positions = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    logits = positional_logits(positions, 1, 4, noise_std=0.0, training=True)
    assert logits.argmax(-1)[0].tolist() == [0, 1, 2, 3]
    uniform = uniform_logits(1, 8, 4, torch.device('cpu'))
    assert torch.allclose(uniform.softmax(-1), torch.full((1, 8, 4), 0.25), atol=1e-4)
    assert torch.bincount(uniform.argmax(-1)[0], minlength=4).tolist() == [2, 2, 2, 2]


def test_aux_losses_known_answers():
    uniform = torch.zeros(100, 4)
    assert router_entropy_loss(uniform).item() == pytest.approx(math.log(4))
    assert router_entropy_loss(torch.tensor([[100., 0, 0, 0]])).item() == pytest.approx(0, abs=1e-6)
    balanced = torch.arange(100).remainder(4).view(100, 1)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[10., 0, 0, 0]]).repeat(100, 1)
    assert load_balance_loss(skewed_logits, torch.zeros(100, 1, dtype=torch.long)).item() > 3.9
    torch.manual_seed(0)
    for _ in range(5):  # uniform routing is the minimum
        logits = torch.randn(100, 4)
        assert load_balance_loss(logits, logits.argmax(-1, keepdim=True)) >= load_balance_loss(uniform, balanced)
    assert router_z_loss(uniform).item() == pytest.approx(math.log(4) ** 2)
