"""PCEConv2d's structure: patch geometry, cached plans, one positional routing, attention switch, factory kwargs."""
import copy

import pytest
import torch
import torch.nn as nn

from pce_timm.layers import PCEConv2d
from pce_timm.layers.dispatch import sparse_plan
from pce_timm.layers.patches import halo, patch_geometry, pixel_patch_index, window_index
from pce_timm.layers.routers import expert_anchors, positional_logits

STATE_KEYS = {  # the layer's state-dict keys, public since the first release (in this order)
    'cosine+attention': [
        'logit_bias', 'embed.proj.weight', 'embed.proj.bias', 'router.keys', 'experts.weight', 'experts.bn.weight',
        'experts.bn.bias', 'experts.bn.running_mean', 'experts.bn.running_var', 'experts.bn.num_batches_tracked',
        'mix.weight', 'mix.bias', 'attn.q.weight', 'attn.q.bias', 'attn.kv.weight', 'attn.kv.bias',
        'attn.offset.0.weight', 'attn.offset.0.bias', 'attn.offset.2.weight', 'attn.proj.weight', 'attn.proj.bias'],
    'positional': [
        'logit_bias', 'router.anchors', 'experts.weight', 'experts.bn.weight', 'experts.bn.bias',
        'experts.bn.running_mean', 'experts.bn.running_var', 'experts.bn.num_batches_tracked', 'mix.weight',
        'mix.bias'],
}


def test_state_dict_keys_are_unchanged():
    assert list(PCEConv2d(8, 8, router='cosine', attention=True).state_dict()) == STATE_KEYS['cosine+attention']
    assert list(PCEConv2d(8, 8, router='positional', top_k=1).state_dict()) == STATE_KEYS['positional']


def test_patch_geometry_known_answers():
    g = patch_geometry(15, 9, (4, 4), 3, 2)
    assert (g.grid_h, g.grid_w) == (4, 3)
    assert (g.out_h, g.out_w, g.out_patch_h, g.out_patch_w) == (8, 5, 2, 2)
    assert (g.halo_before, g.halo_after) == halo(3, 2) == (1, 0)
    assert (g.window_h, g.window_w) == (5, 5)


def test_sparse_plan_matches_the_index_helpers():
    g = patch_geometry(13, 10, (4, 4), 3, 1)
    plan = sparse_plan(g, 2, torch.device('cpu'))
    assert torch.equal(plan.window, window_index(13, 10, (4, 4), 3, 1, torch.device('cpu')))
    patch_of_pixel, offset = pixel_patch_index(13, 10, (4, 4), torch.device('cpu'))
    n = g.grid_h * g.grid_w
    assert torch.equal(plan.pixel_token, torch.cat([patch_of_pixel.reshape(-1), n + patch_of_pixel.reshape(-1)]))
    assert torch.equal(plan.pixel_offset, offset.reshape(-1).repeat(2))
    # patch_pixel / patch_inside invert pixel -> (patch, offset) on the map
    flat = torch.arange(13 * 10)
    on_map = plan.patch_inside.reshape(-1)
    assert torch.equal(plan.patch_pixel.reshape(-1)[on_map].sort().values, flat)
    pixel = plan.patch_pixel.reshape(n, -1)
    for p, o in ((0, 0), (5, 7), (n - 1, 0)):
        if plan.patch_inside.reshape(n, -1)[p, o]:
            assert patch_of_pixel.reshape(-1)[pixel[p, o]] == p and offset.reshape(-1)[pixel[p, o]] == o


def test_plans_are_cached_per_shape_and_rebuilt_for_new_ones():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1)
    cache = layer.slot_dispatch.plans
    x = torch.randn(2, 4, 12, 12)
    first = layer(x)
    assert len(cache) == 1
    plan = next(iter(cache._plans.values()))
    torch.testing.assert_close(layer(x), first)
    assert len(cache) == 1 and next(iter(cache._plans.values())) is plan  # reused, not rebuilt
    layer(torch.randn(3, 4, 12, 12))
    layer(torch.randn(2, 4, 16, 8))
    assert len(cache) == 3
    with torch.no_grad():  # (the routing results a forward with grad keeps on the layer cannot be copied)
        layer(x)
    assert len(copy.deepcopy(layer).slot_dispatch.plans) == 0  # a copy starts empty
    for _ in range(12):  # bounded
        layer(torch.randn(1, 4, 4, 4 * (_ + 1)))
    assert len(cache) == cache.max_size


def test_plans_built_in_inference_mode_do_not_break_a_later_backward():
    """F.embedding saves its indices for backward, which an inference tensor cannot be."""
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=2, eval_capacity_factor=1.0).eval()
    x = torch.randn(2, 4, 12, 12)
    with torch.inference_mode():
        layer(x)  # static eval: the slot discipline builds its plan here
    layer.train()
    layer(x.requires_grad_()).sum().backward()
    assert x.grad is not None


def test_positional_mode_and_router_are_one_implementation():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1, router='positional').eval()
    positions = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])
    default = positional_logits(positions, 1, 4, 0.0, False, anchors=expert_anchors(4, torch.device('cpu')))
    torch.testing.assert_close(layer.router(torch.zeros(1, 4, 0), positions), default)
    with torch.no_grad():  # as expert surgery leaves it: anchors no longer the default grid
        layer.router.anchors.copy_(layer.router.anchors.flip(0))
    layer(x)
    by_router = layer.last_expert_indices.clone()
    layer.set_routing_mode('positional')
    layer(x)
    assert torch.equal(layer.last_expert_indices, by_router)
    assert by_router[0, 0, 0] == 3  # the top-left patch follows the moved anchors

    cosine = PCEConv2d(4, 4, num_experts=3, patch_size=4, top_k=1, router='cosine').eval()
    cosine.set_routing_mode('positional')  # no anchors of its own: the default grid for its expert count
    cosine(x)
    grid = patch_positions_of(cosine, x)
    expected = positional_logits(grid, 2, 3, 0.0, False).argmax(-1)
    assert torch.equal(cosine.last_expert_indices[..., 0], expected)


def patch_positions_of(layer: PCEConv2d, x: torch.Tensor) -> torch.Tensor:
    from pce_timm.layers.patches import grid_size, patch_positions

    return patch_positions(grid_size(x.shape[2], x.shape[3], layer.patch_size), x.device)


def test_positional_mode_keeps_the_seeded_noise_of_training():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1, router='positional', router_noise_std=1.0)
    x = torch.randn(2, 4, 16, 16)
    torch.manual_seed(5)
    layer(x)
    by_router = layer.last_router_logits.clone()
    layer.set_routing_mode('positional')
    torch.manual_seed(5)
    layer(x)
    torch.testing.assert_close(layer.last_router_logits, by_router)
    grid = patch_positions_of(layer, x)
    torch.manual_seed(5)
    torch.testing.assert_close(by_router, positional_logits(grid, 2, 4, 1.0, True))


def test_attention_switched_off_does_not_run():
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, num_experts=2, patch_size=4, top_k=1, attention=True).eval()
    calls = []
    layer.attn.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 8, 8, 8)
    layer(x)
    assert len(calls) == 1 and layer.attn_enabled and layer.attn_gate.item() == 1.0
    layer.set_attention(False)
    layer(x)
    assert len(calls) == 1 and not layer.attn_enabled and layer.attn_gate.item() == 0.0
    assert 'attn_gate' not in dict(layer.named_buffers())


def test_export_follows_the_attention_switch():
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, num_experts=2, patch_size=4, top_k=1, attention=True).eval()
    with torch.no_grad():
        nn.init.normal_(layer.attn.proj.weight)
    x = torch.randn(2, 8, 8, 8)
    on = layer(x)
    torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), on)
    layer.set_attention(False)
    off = layer(x)
    torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), off)
    assert not torch.allclose(on, off)


def _build(device, **kwargs) -> PCEConv2d:
    return PCEConv2d(6, 8, num_experts=4, patch_size=4, device=device, **kwargs)


@pytest.mark.parametrize('kwargs', [
    dict(top_k=1, router='cosine', attention=True),
    dict(top_k=2, router='mlp'),
    dict(top_k=None, router='positional'),
    dict(top_k=1, router='uniform', mix_conv=False),
])
@pytest.mark.parametrize('attention_off', [False, True])
def test_meta_build_then_load_equals_a_normal_build(kwargs, attention_off):
    torch.manual_seed(0)
    normal = _build(None, **kwargs).eval()
    if normal.attn is not None:
        with torch.no_grad():
            nn.init.normal_(normal.attn.proj.weight)
    meta = _build('meta', **kwargs)
    assert all(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
    meta = meta.to_empty(device='cpu').eval()
    meta.load_state_dict(normal.state_dict())
    if attention_off:
        normal.set_attention(False)
        meta.set_attention(False)
    x = torch.randn(2, 6, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(meta(x), normal(x))


def test_dtype_builds_float64_parameters_and_buffers():
    layer = _build(None, top_k=1, router='mlp', attention=True, dtype=torch.float64)
    floats = [t for t in list(layer.parameters()) + list(layer.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float64 for t in floats)
    positional = _build(None, top_k=1, router='positional', dtype=torch.float64)
    assert positional.router.anchors.dtype == torch.float64
    x = torch.randn(2, 6, 12, 12, dtype=torch.float64)
    assert layer(x).dtype == torch.float64


def test_compiled_forward_leaves_the_plan_cache_alone():
    """Plans built while tracing hold fake tensors: they must never reach the cache."""
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=2)
    x = torch.randn(2, 4, 12, 12)
    expected = layer(x)
    layer.slot_dispatch.plans.clear()
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), expected)
    assert len(layer.slot_dispatch.plans) == 0
    torch.testing.assert_close(layer(x), expected)  # eager again: builds and caches real tensors
    assert len(layer.slot_dispatch.plans) == 1
