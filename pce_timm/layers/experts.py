"""E stacked Conv(k x k) - BatchNorm - ReLU experts.

All experts live in one weight [e, o, i, k, k] and one BatchNorm over e * o channels, so expert ``j`` owns
channels ``j * o .. (j + 1) * o``. All three ways of running them use the same parameters:

- dense: one conv with e * o output channels over the whole map (every expert on every pixel;
  :class:`.dispatch.SoftDispatch`);
- windows: one grouped conv (groups = e) over per-expert buffers of halo windows [c, e * i, wh, ww]
  (:class:`.dispatch.SlotDispatch`);
- sorted (eval only): expert j's own conv over its run of halo windows, sorted by expert
  (:class:`.dispatch.SortedDispatch`).

Every expert takes part in every training forward, so every parameter always has a gradient (DDP needs no
``find_unused_parameters`` for routing). Shape legend: b batch, e experts, i/o in/out channels, c slots.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels_cpu


class _ExpertsBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose width is a TorchScript attribute, not a constant.

    The dispatch modules take a layer's experts as an argument typed ``ConvExperts``. TorchScript gives modules
    with different constants different types, and BatchNorm's ``num_features`` is one of its constants, so
    experts of different widths would need different types and a scripted model with several PCE widths fails
    to compile. With the width as an attribute every ``ConvExperts`` (same eps and momentum) shares one type.
    Same parameters, buffers, state-dict keys and arithmetic as ``nn.BatchNorm2d``.
    """

    __constants__ = [name for name in nn.BatchNorm2d.__constants__ if name != 'num_features']


def expert_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
                groups: int) -> torch.Tensor:
    """The experts' conv (``groups`` experts side by side): on halo windows (no padding) on CPU in its fastest
    form for the sizes (:func:`.kernels_cpu.expert_windows_conv`), else ``F.conv2d``."""
    if torch.jit.is_scripting() or padding != 0 or not kernels_cpu.use_cpu_kernels(x):
        return F.conv2d(x, weight, bias, stride, padding, groups=groups)
    return kernels_cpu.expert_windows_conv(x, weight, bias, stride, groups)


def eval_expert_conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        running_mean: Optional[torch.Tensor],
        running_var: Optional[torch.Tensor],
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        eps: float,
        stride: int,
        padding: int,
) -> torch.Tensor:
    """One expert's conv (weight [o, i, k, k]) and eval-mode BatchNorm (its channels' statistics), before the ReLU.

    Folding BatchNorm into the conv costs a pass over the expert's weight; normalising the output, a pass over
    the output. Whichever is smaller is done: at 7 x 7 patches of a 512-channel stage the weight is far larger
    than a batch's outputs (folding all experts of ``pce_resnet18_e8`` on every forward cost ~6% of its
    inference time), on large maps the output is. Without running statistics the batch's are used, as
    ``nn.BatchNorm2d`` does.
    """
    k = weight.shape[-1]
    out_pixels = ((x.shape[2] + 2 * padding - k) // stride + 1) * ((x.shape[3] + 2 * padding - k) // stride + 1)
    fold = x.shape[0] * out_pixels * weight.shape[0] > weight.numel()
    if fold and running_mean is not None and running_var is not None:  # (inline: TorchScript refines Optionals)
        scale = torch.rsqrt(running_var + eps)
        if bn_weight is not None:
            scale = scale * bn_weight
        shift = -running_mean * scale
        if bn_bias is not None:
            shift = shift + bn_bias
        folded = weight * scale.to(weight.dtype).view(-1, 1, 1, 1)
        return expert_conv(x, folded, shift.to(weight.dtype), stride, padding, 1)
    y = expert_conv(x, weight, None, stride, padding, 1)
    use_batch_stats = running_mean is None and running_var is None
    return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, use_batch_stats, 0.0, eps)


@torch.library.custom_op('pce_timm::sorted_experts', mutates_args=())
def sorted_experts(
        windows: torch.Tensor,
        expert_of_window: torch.Tensor,
        weight: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        bn_weight: Optional[torch.Tensor],
        bn_bias: Optional[torch.Tensor],
        eps: float,
        stride: int,
) -> torch.Tensor:
    """Eval Conv-BN-ReLU of every expert on its run of sorted halo windows: [a, i, wh, ww] -> rows [a, ph, pw, o].

    :meth:`ConvExperts.forward_sorted` (the same arithmetic) with the run lengths counted from
    ``expert_of_window`` [a] (sorted) inside the op, and the result as contiguous output pixel rows: its
    output shape and layout are static, so a ``torch.compile`` graph (fullgraph) holds the exact eval path as
    one call where the graph itself could not size the runs. Weight [e, o, i, k, k]; BatchNorm statistics and
    affine parameters [e * o].
    """
    e, o, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    a, ph, pw = windows.shape[0], (windows.shape[2] - k) // stride + 1, (windows.shape[3] - k) // stride + 1
    rows = windows.new_empty(a, ph, pw, o)
    counts = torch.bincount(expert_of_window, minlength=e).tolist()
    start = 0
    for j, count in enumerate(counts):
        if count > 0:
            channels = slice(j * o, (j + 1) * o)
            y = eval_expert_conv(
                windows[start:start + count], weight[j], running_mean[channels], running_var[channels],
                None if bn_weight is None else bn_weight[channels], None if bn_bias is None else bn_bias[channels],
                eps, stride, 0)
            rows[start:start + count].copy_(y.permute(0, 2, 3, 1))
        start += count
    return rows.relu_()


@sorted_experts.register_fake
def _sorted_experts_fake(windows, expert_of_window, weight, running_mean, running_var, bn_weight, bn_bias, eps,
                         stride):
    k = weight.shape[-1]
    return windows.new_empty(windows.shape[0], (windows.shape[2] - k) // stride + 1,
                             (windows.shape[3] - k) // stride + 1, weight.shape[1])


class ConvExperts(nn.Module):

    def __init__(
            self,
            num_experts: int,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            eps: float = 1e-5,
            momentum: float = 0.1,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.num_experts = num_experts
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.momentum = momentum
        self.weight = nn.Parameter(torch.empty(num_experts, out_chs, in_chs, kernel_size, kernel_size, **dd))
        self.bn = _ExpertsBatchNorm(num_experts * out_chs, eps=eps, momentum=momentum, **dd)
        self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` with the 5-D weight passed to ``fn`` as its 4-D conv view [e * o, i, k, k].

        ``module.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D tensor, and a 5-D tensor
        cannot take a 4-D memory format. Seen as the conv weight it is, each expert's weight becomes channels-last
        (what oneDNN's channels-last convs read) while the parameter keeps its shape and state-dict key.
        Every other conversion (device, dtype, ``to_empty``, ``share_memory``) is the same on either view.
        """
        shape = self.weight.shape

        def fn_on_conv_view(t: torch.Tensor) -> torch.Tensor:
            if t.dim() != 5 or t.shape != shape:
                return fn(t)
            return fn(t.reshape(-1, *shape[2:])).view(shape)

        return super()._apply(fn_on_conv_view, recurse)

    def reset_parameters(self) -> None:
        for expert_weight in self.weight.data:  # each expert initialised like a standalone conv
            nn.init.kaiming_uniform_(expert_weight, a=math.sqrt(5))

    @torch.jit.export  # called by the dispatch modules, which get the experts as an argument
    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on the whole map: [b, i, h, w] -> [b, e * o, ho, wo]."""
        return self._conv_bn_relu(x, padding=self.kernel_size // 2, groups=1, valid=None)

    @torch.jit.export
    def forward_weighted(self, x: torch.Tensor, weight_map: torch.Tensor) -> torch.Tensor:
        """Every expert on the whole map, summed with per-pixel weights: [b, i, h, w] -> [b, o, ho, wo].

        Args:
            weight_map: expert j's weight at every output pixel, [e, b, 1, ho, wo].

        The same function (and gradients, and BatchNorm statistics) as :meth:`forward_dense` followed by
        ``sum_j weight_map[j] * y_j``, computed expert by expert: each expert's conv, its channels of the
        BatchNorm, ReLU, and an in-place multiply-add into one output, so no [b, e * o, ho, wo] product (64 MiB
        for a 32-image batch of 64 x 32 x 32 maps and 8 experts) is ever allocated. Products that large are
        fresh page-faulting mappings on every step under glibc malloc; the per-expert ones are what E dense
        blocks allocate.
        """
        k = self.kernel_size
        weights = weight_map.unbind(0)
        if not self.training and not torch.is_grad_enabled():  # inference: no autograd, all in place
            out = torch.zeros(0)  # replaced by the first expert's product
            for j in range(self.num_experts):
                y = F.relu(self._eval_expert(x, j, k // 2), inplace=True)
                w = weights[j].to(y.dtype)
                out = y.mul_(w) if j == 0 else out.addcmul_(y, w)
            return out
        factor = self._batch_norm_step()
        out = torch.zeros(0)
        for j in range(self.num_experts):
            y = F.conv2d(x, self.weight[j], None, self.stride, k // 2)
            y = F.relu(self._expert_batch_norm(y, j, factor), inplace=True)
            w = weights[j].to(y.dtype)
            out = y * w if j == 0 else out.addcmul_(y, w)
        return out

    @torch.jit.export
    def forward_windows(self, windows: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Each expert on its own slots of halo windows: [c, e * i, wh, ww] -> [c, e * o, ph, pw].

        Args:
            windows: expert j's buffer is channels ``j * i .. (j + 1) * i``.
            valid: which output pixels are real [c, e, ph, pw] (not an empty slot, not the padding past the
                map's edge), for the batch statistics of BatchNorm; None promises all are, which allows the
                fused BatchNorm.
        """
        return self._conv_bn_relu(windows, padding=0, groups=self.num_experts, valid=valid)

    @torch.jit.export
    def forward_sorted(self, windows: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Eval: each expert on its own run of halo windows, sorted by expert: [a, i, wh, ww] -> [a, o, ph, pw].

        Expert j takes the next ``counts[j]`` windows; its BatchNorm uses the running statistics (see
        :meth:`_eval_expert`).
        """
        if self.training:
            raise RuntimeError('forward_sorted uses BatchNorm running statistics: call it in eval mode')
        outs: List[torch.Tensor] = []
        start = 0
        for j, count in enumerate(counts):
            if count > 0:
                outs.append(self._eval_expert(windows[start:start + count], j, 0))
            start += count
        return F.relu(torch.cat(outs), inplace=True)

    def _eval_expert(self, x: torch.Tensor, expert: int, padding: int) -> torch.Tensor:
        """Expert ``expert``'s conv and eval-mode BatchNorm (running statistics), before the ReLU: see
        :func:`eval_expert_conv`."""
        running_mean, running_var, weight, bias = self._expert_bn_slices(expert)
        return eval_expert_conv(x, self.weight[expert], running_mean, running_var, weight, bias, self.bn.eps,
                                self.stride, padding)

    def _expert_bn_slices(self, expert: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                                      Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Expert ``expert``'s slices of ``self.bn``: running mean, running var, weight, bias (views, so running
        statistics update in place; each None where the BatchNorm has none)."""
        bn, o = self.bn, self.out_chs
        channels = slice(expert * o, (expert + 1) * o)
        running_mean, running_var = bn.running_mean, bn.running_var  # None without track_running_stats
        if running_mean is not None:
            running_mean = running_mean[channels]
        if running_var is not None:
            running_var = running_var[channels]
        weight = bn.weight[channels] if bn.weight is not None else None
        bias = bn.bias[channels] if bn.bias is not None else None
        return running_mean, running_var, weight, bias

    @torch.jit.export  # called by SortedDispatch only under torch.compile; TorchScript runs forward_sorted
    @torch.jit.unused
    def forward_sorted_op(self, windows: torch.Tensor, expert_of_window: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_sorted` as one opaque op (``torch.ops.pce_timm.sorted_experts``), for traced graphs:
        [a, i, wh, ww] -> output pixel rows [a, ph, pw, o].

        ``expert_of_window`` [a] is the expert of every window, in order (sorted, so each expert's windows form
        one run); the run lengths are read from it inside the op, so a ``torch.compile`` graph holds the exact,
        data-dependent eval with static shapes around it. Eval without gradients only (the op has no backward).
        """
        bn = self.bn
        if self.training or bn.running_mean is None or bn.running_var is None:
            raise RuntimeError('forward_sorted_op needs eval mode and BatchNorm running statistics')
        return torch.ops.pce_timm.sorted_experts(
            windows, expert_of_window, self.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps,
            self.stride)

    def _conv_bn_relu(self, x: torch.Tensor, padding: int, groups: int, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """The experts' conv (``groups`` = 1: all experts on x; e: expert j on channel group j), BN, ReLU."""
        if not self.training and not torch.is_grad_enabled():  # inference: BatchNorm folded into the conv
            weight, bias = self._folded_weight()
            return F.relu(self._conv(x, weight, bias, padding, groups), inplace=True)
        weight = self.weight.reshape(-1, self.in_chs, self.kernel_size, self.kernel_size)
        y = self._conv(x, weight, None, padding, groups)
        if valid is None or not self.training:
            return F.relu(self.bn(y), inplace=True)
        return F.relu(self._masked_batch_norm(y, valid), inplace=True)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int,
              groups: int) -> torch.Tensor:
        """The experts' conv (``groups`` experts side by side): see :func:`expert_conv`."""
        return expert_conv(x, weight, bias, self.stride, padding, groups)

    def _batch_norm_step(self) -> float:
        """What ``nn.BatchNorm2d.forward`` does before normalising: count the batch while training and return
        the running statistics' update factor (cumulative average when ``momentum`` is None)."""
        bn = self.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.num_batches_tracked is not None:  # None without track_running_stats
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum
            factor = 1.0 / float(bn.num_batches_tracked) if momentum is None else momentum
        return factor

    def _expert_batch_norm(self, y: torch.Tensor, expert: int, factor: float) -> torch.Tensor:
        """``self.bn`` on expert ``expert``'s output channels only (its slice of the statistics and affine
        parameters; running statistics are updated in place through the slice), after :meth:`_batch_norm_step`."""
        bn = self.bn
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        running_mean, running_var, weight, bias = self._expert_bn_slices(expert)
        return F.batch_norm(y, running_mean, running_var, weight, bias, use_batch_stats, factor, self.bn.eps)

    def _folded_weight(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Conv weight [e * o, i, k, k] and bias [e * o] equal to conv followed by eval-mode BatchNorm."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        bias = -bn.running_mean * scale
        if bn.bias is not None:
            bias = bias + bn.bias
        weight = self.weight.reshape(-1, self.in_chs, self.kernel_size, self.kernel_size)
        return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), bias.to(weight.dtype)

    def _masked_batch_norm(self, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchNorm whose statistics count only valid output pixels.

        Experts with no valid pixel this step keep their running statistics.
        """
        c, e, o = y.shape[0], self.num_experts, self.out_chs
        mask = valid.to(y.dtype).view(c, e, 1, y.shape[2], y.shape[3])
        y_masked = (y.view(c, e, o, y.shape[2], y.shape[3]) * mask).view(y.shape)
        count = mask.sum(dim=(0, 2, 3, 4)).repeat_interleave(o)  # [e * o]
        denom = count.clamp(min=1)
        mean = y_masked.sum(dim=(0, 2, 3)) / denom
        var = ((y_masked * y).sum(dim=(0, 2, 3)) / denom - mean * mean).clamp(min=0)
        bn = self.bn
        if bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None:
            with torch.no_grad():
                seen = count > 0
                unbiased = var * count / (count - 1).clamp(min=1)
                running_mean = (1 - self.momentum) * bn.running_mean + self.momentum * mean.float()
                running_var = (1 - self.momentum) * bn.running_var + self.momentum * unbiased.float()
                bn.running_mean.copy_(torch.where(seen, running_mean, bn.running_mean))
                bn.running_var.copy_(torch.where(seen, running_var, bn.running_var))
                bn.num_batches_tracked.add_(1)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
