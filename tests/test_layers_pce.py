"""PCEConv2d against slow references: a plain Conv-BN-ReLU, the soft path, and a per-patch loop."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pce_timm.layers import PCEConv2d, collect_aux_loss
from pce_timm.layers.gather import gather_rows_top1
from pce_timm.layers.losses import AuxLossWeights
from pce_timm.layers.mix import mix_pixels
from pce_timm.layers.patches import grid_size, window_index


def _assert_same_gradients(a: nn.Module, b: nn.Module, x: torch.Tensor, grad_a, grad_b) -> None:
    """Input and weight gradients of two modules that compute the same function.

    ``grad_a(module)`` / ``grad_b(module)`` read the weight gradient to compare after the backward.
    """
    results = []
    for module, weight_grad in ((a, grad_a), (b, grad_b)):
        module.zero_grad()
        xg = x.clone().requires_grad_()
        out = module(xg)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((xg.grad, weight_grad(module)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)


def _dense_twin(layer: PCEConv2d) -> nn.Sequential:
    """A plain Conv-BN-ReLU holding expert 0's weights."""
    conv = nn.Conv2d(layer.in_chs, layer.out_chs, layer.kernel_size, layer.stride, layer.kernel_size // 2, bias=False)
    bn = nn.BatchNorm2d(layer.out_chs)
    conv.weight.data.copy_(layer.experts.weight[0])
    bn.load_state_dict(layer.experts.bn.state_dict())
    return nn.Sequential(conv, bn, nn.ReLU())


@pytest.mark.parametrize('top_k', [None, 1])
@pytest.mark.parametrize('stride,hw', [(1, (16, 16)), (1, (13, 19)), (2, (16, 16)), (2, (15, 9))])
def test_one_expert_equals_conv_bn_relu(top_k, stride, hw):
    torch.manual_seed(0)
    layer = PCEConv2d(5, 7, stride=stride, num_experts=1, patch_size=4, top_k=top_k, router='cosine')
    with torch.no_grad():
        layer.experts.bn.weight.uniform_(0.5, 1.5)
        layer.experts.bn.bias.uniform_(-0.5, 0.5)
    dense = _dense_twin(layer)
    x = torch.randn(3, 5, *hw)
    for training in (True, False, True):
        layer.train(training)
        dense.train(training)
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    _assert_same_gradients(layer, dense, x, lambda m: m.experts.weight.grad[0], lambda m: m[0].weight.grad)
    torch.testing.assert_close(layer.experts.bn.running_var, dense[1].running_var)
    torch.testing.assert_close(layer.experts.bn.running_mean, dense[1].running_mean)


@pytest.mark.parametrize('hw', [(16, 16), (20, 18), (32, 32)])  # 32x32 floats: the 4 KiB-stride copy
@pytest.mark.parametrize('stride', [1, 2])
def test_sparse_top_all_equals_soft(hw, stride):
    torch.manual_seed(0)
    soft = PCEConv2d(6, 8, stride=stride, num_experts=4, patch_size=4, top_k=None)
    sparse = PCEConv2d(6, 8, stride=stride, num_experts=4, patch_size=4, top_k=4)
    sparse.load_state_dict(soft.state_dict())
    x = torch.randn(2, 6, *hw)
    for training in (True, False):
        soft.train(training)
        sparse.train(training)
        torch.testing.assert_close(sparse(x), soft(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.experts.bn.running_var, soft.experts.bn.running_var)
    _assert_same_gradients(sparse, soft, x, lambda m: m.experts.weight.grad, lambda m: m.experts.weight.grad)


def _reference_loop(layer: PCEConv2d, x: torch.Tensor) -> torch.Tensor:
    """Slow reference: each patch through each of its chosen experts, one window at a time.

    Routing is taken from the layer's own last forward (routing itself is tested elsewhere); BatchNorm in
    training mode uses each expert's statistics over the real output pixels of the patches it received.
    """
    b, c, h, w = x.shape
    e = layer.num_experts
    ho, wo = (h - 1) // layer.stride + 1, (w - 1) // layer.stride + 1
    ph, pw = layer.patch_size[0] // layer.stride, layer.patch_size[1] // layer.stride
    gh, gw = grid_size(h, w, layer.patch_size)
    index = window_index(h, w, layer.patch_size, layer.kernel_size, layer.stride, x.device)
    indices, weights = layer.last_expert_indices, layer.last_routing_weights
    bn = layer.experts.bn
    raw = {}  # (image, patch, expert) -> conv output cropped to the map
    for i in range(b):
        rows = torch.cat([x[i].flatten(1), torch.zeros(c, 1)], dim=1)
        for p in range(gh * gw):
            r, q = divmod(p, gw)
            crop_h, crop_w = min(ph, ho - r * ph), min(pw, wo - q * pw)
            for j in indices[i, p].tolist():
                window = rows[:, index[p]].unsqueeze(0)
                y = F.conv2d(window, layer.experts.weight[j], stride=layer.stride)
                raw[i, p, j] = y[0, :, :crop_h, :crop_w]
    stats = {}
    for j in range(e):
        outs = [y.flatten(1) for (_, _, jj), y in raw.items() if jj == j]
        if layer.training and outs:
            cat = torch.cat(outs, dim=1)
            stats[j] = cat.mean(1), cat.var(1, unbiased=False)
    out = torch.zeros(b, layer.out_chs, gh * ph, gw * pw)
    for (i, p, j), y in raw.items():
        channels = slice(j * layer.out_chs, (j + 1) * layer.out_chs)
        mean, var = stats[j] if layer.training else (bn.running_mean[channels], bn.running_var[channels])
        y = (y - mean.view(-1, 1, 1)) / torch.sqrt(var.view(-1, 1, 1) + bn.eps)
        y = F.relu(y * bn.weight[channels].view(-1, 1, 1) + bn.bias[channels].view(-1, 1, 1))
        slot = indices[i, p].tolist().index(j)
        r, q = divmod(p, gw)
        out[i, :, r * ph:r * ph + y.shape[1], q * pw:q * pw + y.shape[2]] += weights[i, p, slot] * y
    return layer.mix(out[:, :, :ho, :wo])


@pytest.mark.parametrize('top_k', [1, 2])
@pytest.mark.parametrize('training', [False, True])
@pytest.mark.parametrize('stride,hw', [(1, (12, 10)), (2, (12, 12))])
def test_vectorised_dispatch_equals_reference_loop(top_k, training, stride, hw):
    torch.manual_seed(1)
    # capacity_factor = num_experts gives every expert room for every patch: nothing is rerouted
    layer = PCEConv2d(4, 6, stride=stride, num_experts=3, patch_size=4, top_k=top_k, capacity_factor=3.0)
    layer.train(training)
    with torch.no_grad():
        layer.experts.bn.running_mean.uniform_(-0.2, 0.2)
        layer.experts.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_loop(layer, x), atol=1e-4, rtol=1e-4)
    # gradients: with positional routing the weights do not depend on x, so the reference sees all paths
    layer.set_routing_mode('positional')
    x = x.requires_grad_()
    torch.manual_seed(2)  # the positional noise (training) must give the same routes in both calls
    out = layer(x)
    x_ref = x.detach().clone().requires_grad_()
    reference = _reference_loop(layer, x_ref)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    probe = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad((out * probe).sum(), (x, layer.experts.weight))
    ref_x, ref_w = torch.autograd.grad((reference * probe).sum(), (x_ref, layer.experts.weight))
    torch.testing.assert_close(grad_x, ref_x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-4, rtol=1e-4)


def test_top1_router_gradient_equals_the_reference_loop():
    """Top-1 skips the multiply by its weight of 1; the router must still get the product's gradient."""
    torch.manual_seed(3)
    # capacity_factor = num_experts: nothing is rerouted, so the reference loop sees the same routes
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1, router='mlp', capacity_factor=4.0)
    x = torch.randn(2, 4, 16, 16)
    out = layer(x)
    reference = _reference_loop(layer, x)  # weighs by the layer's own routing weights: same router graph
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    probe = torch.randn_like(out)
    params = list(layer.router.parameters()) + [layer.mix.weight, layer.mix.bias]
    grads = torch.autograd.grad((out * probe).sum(), params, retain_graph=True)  # the router graph is shared
    ref_grads = torch.autograd.grad((reference * probe).sum(), params)
    assert grads[0].abs().sum() > 0
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('num_rows', [6, 10])  # a permutation (every slot filled) / 4 empty slots
def test_top1_gather_gives_the_gradient_of_the_product(num_rows):
    torch.manual_seed(0)
    source = torch.randn(num_rows, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randperm(num_rows)[:6]
    inverse = torch.full((num_rows,), 6, dtype=torch.long)
    inverse[index] = torch.arange(6)
    pixel_token = torch.tensor([0, 0, 1, 1, 2, 2])
    token_weight = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64, requires_grad=True)
    ones = token_weight / token_weight.detach()  # the top-1 weight p / stop_grad(p)
    out = gather_rows_top1(source, index, inverse, ones, pixel_token)
    expected = source[index] * ones[pixel_token].unsqueeze(-1)
    torch.testing.assert_close(out, expected)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), (source, token_weight), retain_graph=True)
    expected_grads = torch.autograd.grad((expected * probe).sum(), (source, token_weight))
    for grad, ref in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, ref)


def test_mix_pixels_is_a_1x1_conv_with_nchw_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 1).double()
    rows = torch.randn(2, 3 * 7, 5, dtype=torch.float64, requires_grad=True)
    out = mix_pixels(rows, conv.weight, conv.bias, 3, 7)
    assert out.shape == (2, 4, 3, 7) and out.is_contiguous()
    expected = conv(rows.view(2, 3, 7, 5).permute(0, 3, 1, 2))
    torch.testing.assert_close(out, expected)
    torch.autograd.gradcheck(lambda r, w, b: mix_pixels(r, w, b, 3, 7), (rows, conv.weight, conv.bias))


@pytest.mark.parametrize('top_k', [1, 2, None])
def test_bfloat16_autocast_forward_and_backward(top_k):
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, num_experts=4, patch_size=4, top_k=top_k)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert x.grad.dtype == torch.float32 and layer.mix.weight.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), layer(x), atol=0.05, rtol=0.05)


def test_overflow_is_rerouted_not_dropped():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1, router='cosine', capacity_factor=1.0).eval()
    with torch.no_grad():  # every patch prefers expert 0
        layer.router.keys.copy_(torch.randn(4, layer.router.keys.shape[1]))
        layer.experts.bn.bias.fill_(1.0)  # every expert output is non-zero after ReLU
        layer.mix = nn.Identity()
    x = torch.randn(2, 4, 16, 16)
    out = layer(x)
    assert (out.abs().sum(1) > 0).all(), 'some pixels got no expert output'


def test_gradients_reach_every_expert_and_the_router():
    torch.manual_seed(0)
    for top_k, router in ((1, 'cosine'), (2, 'mlp'), (None, 'cosine')):
        layer = PCEConv2d(4, 8, num_experts=4, patch_size=4, top_k=top_k, router=router)
        x = torch.randn(4, 4, 16, 16)
        loss = layer(x).pow(2).mean() + collect_aux_loss(layer, AuxLossWeights(entropy=0.01, balance=0.01))[0]
        loss.backward()
        grad = layer.experts.weight.grad
        assert all(grad[j].abs().sum() > 0 for j in range(4)), (top_k, router)
        router_params = list(layer.router.parameters()) + list(layer.embed.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_params), (top_k, router)


def test_routing_stats_and_modes():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1)
    with pytest.raises(RuntimeError, match='no routing recorded'):
        layer.routing_stats()
    x = torch.randn(2, 4, 16, 16)
    layer.set_routing_mode('uniform')
    layer(x)
    stats = layer.routing_stats()
    assert stats['grid_size'] == (4, 4) and stats['expert_indices'].shape == (2, 16, 1)
    assert stats['usage_counts'].tolist() == [8, 8, 8, 8]
    assert stats['usage_entropy'] == pytest.approx(1.0) and stats['imbalance'] == 1.0
    layer.set_routing_mode('positional')
    layer.eval()
    layer(x)
    assert layer.routing_stats()['expert_indices'][0, :, 0].view(4, 4).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match='routing mode'):
        layer.set_routing_mode('random')


def test_attention_switch():
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, num_experts=2, patch_size=4, top_k=1, attention=True).eval()
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        nn.init.normal_(layer.attn.proj.weight)
    on = layer(x)
    layer.set_attention(False)
    off = layer(x)
    assert not torch.allclose(on, off)
    layer.attn = None
    torch.testing.assert_close(layer(x), off)


@pytest.mark.parametrize('kwargs,match', [
    (dict(patch_size=0), 'patch_size'),
    (dict(num_experts=0), 'num_experts'),
    (dict(top_k=5), 'top_k'),
    (dict(top_k=0), 'top_k'),
    (dict(router='random'), 'router'),
    (dict(stride=2, patch_size=3), 'multiple of stride'),
    (dict(kernel_size=2), 'odd'),
    (dict(capacity_factor=0), 'capacity_factor'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PCEConv2d(4, 4, **{'num_experts': 4, **kwargs})


def test_bad_inputs():
    layer = PCEConv2d(4, 4)
    with pytest.raises(ValueError, match='in_chs=4'):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match='4D'):
        layer(torch.randn(4, 8, 8))


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=2).eval()
    x = torch.randn(2, 4, 10, 14)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), layer(x))


def test_compile_sparse_path_fullgraph():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1)
    x = torch.randn(2, 4, 12, 12)
    expected = layer.eval()(x)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')  # graph breaks raise
    torch.testing.assert_close(compiled(x), expected)
    layer.train()
    compiled(x).sum().backward()
    assert layer.experts.weight.grad is not None
    assert layer.last_expert_indices is not None and layer.last_expert_indices.shape == (2, 9, 1)


def test_export_eval():
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1).eval()
    x = torch.randn(2, 4, 12, 12)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


@pytest.mark.parametrize('top_k', [None, 1, 2])
def test_inference_with_batchnorm_folded_matches_eval_with_grad(top_k):
    """Under no_grad an eval layer folds BatchNorm into the expert conv (and skips top-1's weight of 1)."""
    torch.manual_seed(0)
    layer = PCEConv2d(6, 8, num_experts=4, patch_size=4, top_k=top_k).eval()
    with torch.no_grad():
        layer.experts.bn.running_mean.uniform_(-0.5, 0.5)
        layer.experts.bn.running_var.uniform_(0.5, 2.0)
        layer.experts.bn.weight.uniform_(0.5, 1.5)
        layer.experts.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, 16, 12)
    with torch.no_grad():
        folded = layer(x)
    with torch.enable_grad():
        unfolded = layer(x)
    assert unfolded.requires_grad
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('top_k', [1, 2])
def test_eval_output_of_an_image_does_not_depend_on_its_batch(top_k):
    """In eval every patch gets its chosen experts even where training's capacity would have moved it."""
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=top_k).eval()
    layer.logit_bias.copy_(torch.tensor([4.0, 2.0, 0.0, 0.0]))  # most patches choose expert 0 (then 1)
    x = torch.randn(3, 4, 12, 12)
    with torch.no_grad():
        batched = layer(x)
        assert (layer.last_expert_indices[..., 0] == 0).float().mean() > 0.5  # training capacity would overflow
        reference = _reference_loop(layer, x)  # every patch through its own chosen experts
        alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_compiled_eval_routes_exactly_too():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1).eval()
    layer.logit_bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    x = torch.randn(2, 4, 12, 12)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), layer(x))


def test_sorted_experts_need_eval_mode():
    experts = PCEConv2d(4, 6, num_experts=2, patch_size=4, top_k=1).experts.train()
    with pytest.raises(RuntimeError, match='eval mode'):
        experts.forward_sorted(torch.randn(2, 4, 6, 6), [1, 1])


def test_eval_on_meta_tensors_gives_shapes():
    """timm's default-cfg checks run models on the meta device, where no routing can size the experts' runs."""
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1, stride=2).eval().to('meta')
    assert layer(torch.empty(2, 4, 12, 12, device='meta')).shape == (2, 6, 6, 6)


def test_eval_capacity_factor_trades_exactness_for_the_training_cost():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=1).eval()
    layer.logit_bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))  # expert 0 overflows 1.0 x balanced capacity
    x = torch.randn(2, 4, 12, 12)
    exact = layer(x)
    layer.eval_capacity_factor = 1.0
    capped = layer(x)
    assert not torch.allclose(capped, exact)  # the overflowing patches went to other experts
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), capped)
    torch.testing.assert_close(torch.jit.script(layer)(x), capped)
    with pytest.raises(ValueError, match='eval_capacity_factor'):
        PCEConv2d(4, 6, top_k=1, eval_capacity_factor=0.0)
