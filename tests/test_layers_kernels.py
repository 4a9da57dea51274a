"""The tuned CPU kernels (layers/kernels_cpu.py) against the plain reference path, op by op and in the layer."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pce_timm.layers import PCEConv2d, kernels_cpu
from pce_timm.layers.dispatch import assign_slots, expert_capacity, sparse_plan
from pce_timm.layers.dispatch.slots import window_pixels
from pce_timm.layers.embed import cell_mean
from pce_timm.layers.gather import gather_rows, gather_rows_top1, gather_windows, gather_windows_reference
from pce_timm.layers.mix import mix_pixels
from pce_timm.layers.patches import patch_geometry


def _grads(fn, inputs, probe_seed=0):
    """Output of ``fn(*inputs)`` and the gradients of a fixed random projection of it."""
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=out.dtype)
    return out, torch.autograd.grad((out * probe).sum(), [t for t in inputs if t.requires_grad])


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0])
    for grad_a, grad_b in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(grad_a, grad_b)


def test_reference_kernels_switch_is_scoped():
    x = torch.zeros(1)
    assert kernels_cpu.use_cpu_kernels(x)
    with pytest.raises(RuntimeError), kernels_cpu.reference_kernels():
        assert not kernels_cpu.use_cpu_kernels(x)
        raise RuntimeError
    assert kernels_cpu.use_cpu_kernels(x)
    assert not kernels_cpu.use_cpu_kernels(torch.zeros(1, device='meta'))


def _window_case(top_k, capacity_factor, hw=(8, 12), stride=1, seed=0):
    torch.manual_seed(seed)
    b, c, e = 2, 3, 3
    geometry = patch_geometry(*hw, (4, 4), 3, stride)
    plan = sparse_plan(geometry, b, torch.device('cpu'))
    num_tokens = b * geometry.grid_h * geometry.grid_w
    expert_indices = torch.stack([torch.randperm(e)[:top_k] for _ in range(num_tokens)])
    capacity = expert_capacity(num_tokens, e, top_k, capacity_factor)
    slot_of_assignment, assignment_of_slot = assign_slots(expert_indices, e, capacity)
    token_of_slot = torch.where(assignment_of_slot < top_k * num_tokens, assignment_of_slot % num_tokens,
                                num_tokens).view(e, capacity).t()
    x = torch.randn(b, c, *hw, dtype=torch.float64, requires_grad=True)
    pixels = window_pixels(x, plan, token_of_slot, num_tokens)
    return x, pixels, slot_of_assignment, geometry


@pytest.mark.parametrize('top_k,capacity_factor', [(1, 1.0), (2, 1.0), (1, 0.5), (2, 3.0)])
@pytest.mark.parametrize('stride,hw', [(1, (8, 12)), (2, (10, 6))])
def test_gather_windows_tuned_equals_reference(top_k, capacity_factor, stride, hw):
    x, pixels, slots, geometry = _window_case(top_k, capacity_factor, hw, stride)
    tuned = _grads(lambda t: kernels_cpu.gather_windows(t, pixels, slots, geometry), (x,))
    reference = _grads(lambda t: gather_windows_reference(t, pixels), (x,))
    _assert_same(tuned, reference)
    with kernels_cpu.reference_kernels():  # the selector takes the reference path
        _assert_same(_grads(lambda t: gather_windows(t, pixels, slots, geometry), (x,)), reference)
    _assert_same(_grads(lambda t: gather_windows(t, pixels, None, geometry), (x,)), reference)


def test_gather_windows_tuned_gradcheck():
    x, pixels, slots, geometry = _window_case(2, 0.5, (8, 4))
    torch.autograd.gradcheck(lambda t: kernels_cpu.gather_windows(t, pixels, slots, geometry), (x,))


@pytest.mark.parametrize('dtype,hw', [(torch.float32, (32, 32)), (torch.float32, (16, 16)), (torch.float64, (8, 8))])
def test_image_rows_shift_equals_plain_rows(dtype, hw):
    x = torch.randn(2, 5, *hw, dtype=dtype)  # 32x32 float32 channels are 4 KiB apart: the shifted copy
    rows = kernels_cpu.image_rows(x)
    expected = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 5), torch.zeros(1, 5, dtype=dtype)])
    assert torch.equal(rows, expected)


@pytest.mark.parametrize('num_rows', [6, 10])  # every source row read once / 4 rows never read
def test_gather_rows_tuned_equals_reference(num_rows):
    torch.manual_seed(0)
    source = torch.randn(num_rows, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randperm(num_rows)[:6]
    inverse = torch.full((num_rows,), 6, dtype=torch.long)
    inverse[index] = torch.arange(6)
    tuned = _grads(lambda s: kernels_cpu.gather_rows(s, index, inverse), (source,))
    with kernels_cpu.reference_kernels():
        reference = _grads(lambda s: gather_rows(s, index, inverse), (source,))
    _assert_same(tuned, reference)
    torch.autograd.gradcheck(lambda s: kernels_cpu.gather_rows(s, index, inverse), (source,))


def test_gather_rows_top1_tuned_equals_reference():
    torch.manual_seed(0)
    source = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.randperm(6)
    inverse = torch.empty_like(index).scatter_(0, index, torch.arange(6))
    pixel_token = torch.tensor([0, 0, 1, 1, 2, 2])
    token_weight = torch.tensor([0.3, 1.7, 0.9], dtype=torch.float64, requires_grad=True)
    # the weights are top-1's p / stop_grad(p): 1 in value, with p's gradient
    tuned = _grads(lambda s, w: kernels_cpu.gather_rows_top1(s, index, inverse, w / w.detach(), pixel_token),
                   (source, token_weight))
    with kernels_cpu.reference_kernels():
        reference = _grads(lambda s, w: gather_rows_top1(s, index, inverse, w / w.detach(), pixel_token),
                           (source, token_weight))
    _assert_same(tuned, reference)


def test_mix_pixels_tuned_equals_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 1).double()
    rows = torch.randn(2, 3 * 7, 5, dtype=torch.float64, requires_grad=True)
    inputs = (rows, conv.weight, conv.bias)
    tuned = _grads(lambda r, w, b: mix_pixels(r, w, b, 3, 7), inputs)
    with kernels_cpu.reference_kernels():
        reference = _grads(lambda r, w, b: mix_pixels(r, w, b, 3, 7), inputs)
        torch.autograd.gradcheck(lambda r, w, b: mix_pixels(r, w, b, 3, 7), inputs)
    _assert_same(tuned, reference)
    assert tuned[0].is_contiguous()  # the tuned GEMM writes NCHW


@pytest.mark.parametrize('cell', [(2, 2), (1, 3), (4, 1)])
def test_cell_mean_tuned_equals_reference(cell):
    torch.manual_seed(0)
    x = torch.randn(2, 3, cell[0] * 3, cell[1] * 2, dtype=torch.float64, requires_grad=True)
    tuned = _grads(lambda t: kernels_cpu.cell_mean(t, cell), (x,))
    with kernels_cpu.reference_kernels():
        reference = _grads(lambda t: cell_mean(t, cell), (x,))
    _assert_same(tuned, reference)
    torch.testing.assert_close(reference[0], F.avg_pool2d(x, cell))


@pytest.mark.parametrize('kwargs,hw', [
    (dict(top_k=1), (16, 16)),
    (dict(top_k=2, stride=2), (15, 9)),
    (dict(top_k=1, capacity_factor=0.5), (16, 16)),  # dropped choices
    (dict(top_k=None), (32, 32)),
    (dict(top_k=1, mix_conv=False), (32, 32)),
])
@pytest.mark.parametrize('training', [True, False])
def test_layer_tuned_equals_reference(kwargs, hw, training):
    """The whole layer, forward and backward, with the tuned kernels and with the reference path on CPU."""
    torch.manual_seed(0)
    layer = PCEConv2d(6, 8, num_experts=4, patch_size=4, router='mlp', **kwargs).train(training)
    x = torch.randn(2, 6, *hw, requires_grad=True)
    results = []
    for reference in (False, True):
        state = {k: v.clone() for k, v in layer.state_dict().items()}  # training updates BatchNorm statistics
        with kernels_cpu.reference_kernels() if reference else torch.enable_grad():
            out = layer(x)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                        [x] + [p for p in layer.parameters() if p.requires_grad], allow_unused=True)
        layer.load_state_dict(state)
        results.append((out, [g for g in grads if g is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _dense_weighted_sum(experts, x, weight_map):
    """The reference of ``forward_weighted``: all experts in one conv, then the weighted sum over experts."""
    y = experts.forward_dense(x)
    e, b, _, ho, wo = weight_map.shape
    return (y.view(b, e, -1, ho, wo) * weight_map.transpose(0, 1)).sum(1)


@pytest.mark.parametrize('mode', ['train', 'eval', 'inference'])
@pytest.mark.parametrize('momentum,stride', [(0.1, 1), (None, 2)])  # None: cumulative running averages
def test_experts_forward_weighted_equals_dense_then_weighted_sum(mode, momentum, stride):
    """Soft dispatch's expert-by-expert accumulation: same output, gradients and BatchNorm statistics."""
    from pce_timm.layers.experts import ConvExperts

    torch.manual_seed(0)
    experts = ConvExperts(3, 4, 5, stride=stride).double().train(mode == 'train')
    experts.bn.momentum = momentum
    with torch.no_grad():  # non-trivial statistics and affine parameters to fold and to update
        experts.bn.running_mean.uniform_(-1, 1)
        experts.bn.running_var.uniform_(0.5, 2)
        experts.bn.weight.uniform_(0.5, 1.5)
        experts.bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, requires_grad=True)
    ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    weight_map = torch.rand(3, 2, 1, ho, wo, dtype=torch.float64, requires_grad=True)
    inputs = (x, weight_map, experts.weight, experts.bn.weight, experts.bn.bias)
    results, buffers = [], []
    for fn in (experts.forward_weighted, lambda t, w: _dense_weighted_sum(experts, t, w)):
        state = {k: v.clone() for k, v in experts.state_dict().items()}
        if mode == 'inference':
            with torch.no_grad():
                results.append((fn(x, weight_map), ()))
        else:
            results.append(_grads(lambda t, w, *params, fn=fn: fn(t, w), inputs))
        buffers.append({k: v.clone() for k, v in experts.state_dict().items()})
        experts.load_state_dict(state)
    _assert_same(*results)
    for key in buffers[1]:
        torch.testing.assert_close(buffers[0][key], buffers[1][key], msg=key)
    if mode == 'train':
        assert int(buffers[0]['bn.num_batches_tracked']) == 1
        assert not torch.equal(buffers[0]['bn.running_mean'], experts.bn.running_mean)  # they were updated
    if mode != 'inference':
        torch.autograd.gradcheck(lambda t, w, *params: experts.forward_weighted(t, w), inputs)


def test_experts_forward_sorted_equals_conv_then_eval_batch_norm():
    """Each expert's run through its conv and eval BatchNorm, whether the BatchNorm is folded into the conv
    (a long run: output larger than the weight) or applied to the output (a short run)."""
    from pce_timm.layers.experts import ConvExperts

    torch.manual_seed(0)
    experts = ConvExperts(3, 4, 5).double().eval()
    with torch.no_grad():
        experts.bn.running_mean.uniform_(-1, 1)
        experts.bn.running_var.uniform_(0.5, 2)
        experts.bn.weight.uniform_(0.5, 1.5)
        experts.bn.bias.uniform_(-0.5, 0.5)
    counts = [1, 0, 9]  # 1 x 5 x 3 x 3 outputs < 180 weights: normalised; 9 x 45 = 405 > 180: folded
    windows = torch.randn(sum(counts), 4, 5, 5, dtype=torch.float64, requires_grad=True)
    expert_of_window = [0] + [2] * 9

    def reference(w, *params):  # every expert on every window, then each window's own expert's channels
        all_experts = experts.bn(F.conv2d(w, experts.weight.view(15, 4, 3, 3)))  # [a, e * o, 3, 3]
        return torch.stack([all_experts[i, j * 5:(j + 1) * 5] for i, j in enumerate(expert_of_window)]).relu()

    inputs = (windows, experts.weight, experts.bn.weight, experts.bn.bias)
    _assert_same(_grads(lambda w, *params: experts.forward_sorted(w, counts), inputs), _grads(reference, inputs))
    torch.autograd.gradcheck(lambda w, *params: experts.forward_sorted(w, counts), inputs)


@pytest.mark.parametrize('slots,chs,hw,stride,branch', [
    (1, 8, 3, 1, 'gemm'),  # weight 24 * 8 * 3 * 3 > im2col columns 1 * 3 * 8 * 9 * 1 * 1: batched GEMM
    (1, 8, 5, 2, 'gemm'),
    (2, 4, 4, 1, 'nchw'),  # windows 2 * 12 * 4 * 4 < weight 12 * 4 * 3 * 3 < columns: grouped conv on NCHW
    (1, 4, 5, 2, 'nchw'),
    (6, 2, 9, 1, 'channels-last'),  # windows larger than the weight: the grouped conv as given
])
@pytest.mark.parametrize('with_bias', [False, True])
def test_expert_windows_conv_tuned_equals_grouped_conv(slots, chs, hw, stride, branch, with_bias):
    torch.manual_seed(0)
    e, k = 3, 3
    windows = torch.randn(slots, e * chs, hw, hw, dtype=torch.float64)
    windows = windows.contiguous(memory_format=torch.channels_last).requires_grad_()  # as the gather makes them
    weight = torch.randn(e * chs, chs, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(e * chs, dtype=torch.float64, requires_grad=True) if with_bias else None
    p = (hw - k) // stride + 1
    columns = slots * e * chs * k * k * p * p
    taken = 'gemm' if weight.numel() > columns else 'nchw' if weight.numel() > windows.numel() else 'channels-last'
    assert taken == branch  # the case exercises the branch it is named for
    inputs = (windows, weight) + ((bias,) if with_bias else ())

    def tuned(w, wt, *b):
        return kernels_cpu.expert_windows_conv(w, wt, b[0] if b else None, stride, e)

    def reference(w, wt, *b):
        return F.conv2d(w, wt, b[0] if b else None, stride, groups=e)

    _assert_same(_grads(tuned, inputs), _grads(reference, inputs))
    if not with_bias:  # the bias only comes with folded BatchNorm, in inference
        torch.autograd.gradcheck(tuned, inputs)


@pytest.mark.parametrize('slots,hw', [(2, 3), (40, 5)])  # one expert's run (sorted eval): GEMM / conv
def test_expert_windows_conv_tuned_equals_conv_for_one_expert(slots, hw):
    torch.manual_seed(0)
    windows = torch.randn(slots, 8, hw, hw, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 8, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(kernels_cpu.expert_windows_conv(windows, weight, bias, 1, 1),
                               F.conv2d(windows, weight, bias))
