"""Balanced routing by construction (issue 13): expert choice and the loss-free balancing bias in PCEConv2d.

Expert choice is checked against a slow per-image reference loop built on the experts' dense path; the bias
against token choice without it.
"""
import math

import pytest
import torch

from pce_timm.layers import PCEConv2d, collect_aux_loss
from pce_timm.layers.dispatch import expert_choice, expert_choice_capacity, route


def _layer(choice='expert', balance='loss', top_k=1, num_experts=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = PCEConv2d(6, 5, num_experts=num_experts, patch_size=4, top_k=top_k, router='mlp', choice=choice,
                      balance=balance, **kwargs)
    with torch.no_grad():  # a router that prefers experts differently per patch, and BN with real statistics
        layer.router.fc2.weight.normal_(0, 1.0)
        for name in ('running_mean', 'running_var'):
            getattr(layer.experts.bn, name).uniform_(0.5, 1.5)
    return layer


def _reference_expert_choice(layer, x):
    """Slow reference: per image, per expert, pick the top-c patches; sum weighted dense expert outputs."""
    b = x.shape[0]
    logits = layer.last_router_logits  # [b, n, e], the router's own output for this x
    gh, gw = layer.last_grid_size
    n, e, o = gh * gw, layer.num_experts, layer.out_chs
    c = expert_choice_capacity(n, e, layer.top_k, layer.capacity_factor)
    dense = layer.experts.forward_dense(x).view(b, e, o, x.shape[2], x.shape[3])  # stride 1: same size
    out = torch.zeros(b, o, x.shape[2], x.shape[3])
    masks = torch.zeros(b, n, e, dtype=torch.bool)
    ph, pw = layer.patch_size
    for i in range(b):
        probs = logits[i].softmax(-1)  # [n, e]
        for j in range(e):
            for patch in sorted(range(n), key=lambda p: -float(probs[p, j]))[:c]:
                masks[i, patch, j] = True
        for patch in range(n):
            picked = [j for j in range(e) if masks[i, patch, j]]
            total = sum(float(probs[patch, j]) for j in picked)
            y, xx = (patch // gw) * ph, (patch % gw) * pw
            for j in picked:
                out[i, :, y:y + ph, xx:xx + pw] += float(probs[patch, j]) / total * dense[i, j, :, y:y + ph, xx:xx + pw]
    return layer.mix(out), masks


@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('top_k,num_experts', [(1, 4), (2, 3)])
def test_expert_choice_matches_per_image_reference(training, top_k, num_experts):
    layer = _layer(top_k=top_k, num_experts=num_experts)
    layer.train(training)
    layer.experts.eval()  # BatchNorm with running statistics, so the dense reference computes the same function
    x = torch.randn(3, 6, 12, 16)  # a 3 x 4 grid of 4 px patches
    with torch.no_grad():
        out = layer(x)
        expected, masks = _reference_expert_choice(layer, x)
    assert torch.equal(layer.last_expert_mask, masks)
    assert (masks.sum(1) == expert_choice_capacity(12, num_experts, top_k, 1.0)).all()  # c per expert and image
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    stats = layer.routing_stats()
    assert stats['dropped_fraction'] == pytest.approx(float((~masks.any(-1)).double().mean()))
    assert stats['usage_counts'].tolist() == masks.sum((0, 1)).tolist()  # the load: flat by construction


def test_expert_choice_weights_sum_to_one_and_drop_unpicked():
    torch.manual_seed(1)
    logits = torch.randn(2, 9, 4, requires_grad=True)
    chosen = expert_choice(logits, capacity=2)
    picked = chosen.expert_mask  # [b, n, e]
    weights = torch.zeros(2, 4, 9).scatter(2, chosen.patch_indices, chosen.weights.detach()).transpose(1, 2)
    per_patch = weights.sum(-1)
    torch.testing.assert_close(per_patch[picked.any(-1)], torch.ones(int(picked.any(-1).sum())))
    assert (per_patch[~picked.any(-1)] == 0).all() and (~picked.any(-1)).any()  # 8 picks for 9 patches
    chosen.weights.sum().backward()  # weights keep a gradient to the router
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_expert_choice_is_batch_independent():
    layer = _layer(top_k=1, num_experts=4).eval()
    image = torch.randn(1, 6, 16, 16)
    other = torch.randn(1, 6, 16, 16) * 3
    with torch.no_grad():
        alone = layer(image)
        batch = layer(torch.cat([other.expand(5, -1, -1, -1), image]))  # a batch skewed by five copies of another
    torch.testing.assert_close(batch[-1:], alone, atol=1e-5, rtol=1e-5)


def test_expert_choice_trains_every_part():
    layer = _layer(top_k=1, num_experts=4).train()
    x = torch.randn(2, 6, 16, 16, requires_grad=True)
    layer(x).square().mean().backward()
    for name in ('router.fc1.weight', 'router.fc2.weight', 'experts.weight', 'mix.weight'):
        grad = layer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bias_changes_choices_not_weights_or_their_gradient():
    torch.manual_seed(0)
    logits = torch.randn(64, 4, requires_grad=True)
    bias = torch.tensor([2.0, 0.0, 0.0, -2.0])
    _, plain, _ = route(logits, top_k=2)
    _, biased, weights = route(logits, top_k=2, choice_bias=bias)
    assert not torch.equal(plain, biased)  # the bias changed choices
    assert (biased == 0).sum() > (plain == 0).sum() and (biased == 3).sum() < (plain == 3).sum()
    # the weights are the router's probabilities of the chosen experts, renormalised: no bias in them
    probs = logits.softmax(-1).gather(-1, biased)
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))
    # ... with the gradient the same choices give without a bias
    cotangent = torch.randn(64, 2)
    (grad_biased,) = torch.autograd.grad((weights * cotangent).sum(), logits)
    fixed = logits.softmax(-1).gather(-1, biased)
    (grad_fixed,) = torch.autograd.grad((fixed / fixed.sum(-1, keepdim=True).detach() * cotangent).sum(), logits)
    torch.testing.assert_close(grad_biased, grad_fixed)


def test_bias_in_the_layer_moves_choices_only():
    layer = _layer(choice='token', balance='bias', top_k=1).train()
    x = torch.randn(4, 6, 16, 16)
    with torch.no_grad():
        layer(x)
        before = layer.last_expert_indices.clone()
        logits = layer.last_router_logits.clone()
        layer.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))
        layer(x)
    assert (layer.last_expert_indices == 3).all() and not (before == 3).all()
    torch.testing.assert_close(layer.last_router_logits, logits)  # logits (and probabilities) untouched
    assert (layer.last_routing_weights == 1).all()  # top-1 weights stay exactly 1


def test_balance_bias_state_dict_round_trip_and_old_checkpoints():
    layer = _layer(choice='token', balance='bias')
    layer.balance_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    state = layer.state_dict()
    assert 'balance_bias' in state and 'logit_bias' in state  # the two biases stay apart
    fresh = _layer(choice='token', balance='bias', seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.balance_bias, layer.balance_bias)
    old = {k: v for k, v in state.items() if k != 'balance_bias'}  # a checkpoint from before the buffer
    fresh = _layer(choice='token', balance='bias', seed=1)
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.balance_bias, torch.zeros(4))
    assert 'balance_bias' not in _layer(choice='token', balance='loss').state_dict()  # other layers: keys unchanged


def test_aux_balance_loss_only_for_loss_balanced_token_choice():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_layer(choice='token', balance='loss'), _layer(choice='token', balance='bias', seed=1),
                                _layer(choice='expert', seed=2))
    model.train()
    model[0].out_chs = 5
    x = torch.randn(2, 6, 16, 16)
    for layer in model:
        layer(x)
    _, parts = collect_aux_loss(model)
    total, _ = collect_aux_loss(model, weights=type(collect_aux_loss.__defaults__[0])(balance=1.0))
    from pce_timm.layers.losses import load_balance_loss
    first = load_balance_loss(model[0].last_router_logits, model[0].last_expert_indices)
    torch.testing.assert_close(total, first / 3)  # only layer 0's term, averaged over the three layers
    assert parts['balance'] > 0  # all three are still reported


@pytest.mark.parametrize('kwargs,match', [
    (dict(choice='expert', top_k=None), "choice='expert' needs sparse routing"),
    (dict(choice='token', balance='bias', top_k=None), "balance='bias' biases"),
    (dict(choice='expert', balance='bias', top_k=1), 'balanced by construction'),
    (dict(choice='experts', top_k=1), 'choice must be one of'),
    (dict(balance='aux', top_k=1), 'balance must be one of'),
    (dict(balance='bias', top_k=1, bias_update_rate=-1.0), 'bias_update_rate must be'),
    (dict(balance='bias', top_k=1, bias_update='median'), 'bias_update must be one of'),
    (dict(choice='expert', top_k=1, eval_capacity_factor=1.0), 'eval_capacity_factor does not apply'),
])
def test_bad_choice_or_balance_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PCEConv2d(4, 4, num_experts=4, patch_size=4, **kwargs)


def test_expert_choice_capacity():
    assert expert_choice_capacity(16, 8, 1, 1.0) == 2
    assert expert_choice_capacity(4, 16, 1, 1.0) == 1  # at least one patch per expert
    assert expert_choice_capacity(4, 2, 2, 2.0) == 4  # at most every patch
    assert expert_choice_capacity(9, 4, 1, 1.25) == math.ceil(1.25 * 9 / 4)


@pytest.mark.slow
@pytest.mark.parametrize('choice,balance', [('expert', 'loss'), ('token', 'bias')])
def test_compile_fullgraph_and_export(choice, balance):
    layer = _layer(choice=choice, balance=balance, top_k=1).eval()
    if balance == 'bias':
        layer.balance_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    x = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        exported = torch.export.export(layer, (x,)).module()(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported, eager, atol=1e-5, rtol=1e-5)
    layer.train()  # the training graph compiles too (expert choice: the same per-image choice)
    out = torch.compile(layer, fullgraph=True)(x)
    out.sum().backward()
    assert layer.experts.weight.grad is not None


def test_torchscript_both_disciplines():
    for choice, balance in (('expert', 'loss'), ('token', 'bias')):
        layer = _layer(choice=choice, balance=balance).eval()
        x = torch.randn(2, 6, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(layer)(x), layer(x), atol=1e-5, rtol=1e-5)


def test_expert_choice_with_soft_probabilities_matches_dense_when_every_patch_is_picked():
    """capacity_factor high enough that every expert takes every patch: expert choice = soft routing."""
    layer = _layer(top_k=4, num_experts=4, capacity_factor=1.0).eval()  # c = n * 4 / 4 = n
    soft = _layer(choice='token', top_k=None, num_experts=4)
    soft.load_state_dict(layer.state_dict())
    soft.eval()
    x = torch.randn(2, 6, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), soft(x), atol=1e-5, rtol=1e-5)
    assert layer.routing_stats()['dropped_fraction'] == 0.0
