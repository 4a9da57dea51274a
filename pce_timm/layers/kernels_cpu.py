"""Tuned CPU implementations of the layer's memory-bound ops; the plain PyTorch versions are the reference.

Every op here has a reference implementation in its own module (``gather``, ``mix``, ``embed``) that runs on
every other device, under TorchScript, and on CPU inside :func:`reference_kernels`. Each selector there reads
:func:`use_cpu_kernels`; tests hold the two paths equal in values and gradients.

Why they exist (measured on CPU, where they are several times faster than the reference):

- autograd's backward of a row gather is a scatter-add, much slower than the gather itself; the gathers of
  the sparse path have structure that makes their backward a gather too (:func:`gather_windows`,
  :func:`gather_rows`, :func:`gather_rows_top1`), and overlapping halo windows are summed back by
  :func:`overlap_add` at copy speed where col2im / index_add are slower;
- ``avg_pool2d`` on an NCHW map is slower than reading the map (:func:`cell_mean` sums strided views);
- a 1x1 conv on pixel rows is a GEMM that can write NCHW directly (:func:`mix_pixels`);
- oneDNN's grouped conv over the experts' slots converts the whole [e * o, i, k, k] weight (and its gradient)
  to the input's channels-last layout on every call, and is slow on a few large-channel slots; where the
  weight is large next to the windows, NCHW windows or one batched GEMM per expert are faster
  (:func:`expert_windows_conv`).

Shape legend: b batch, c channels, h/w map, n patches (gh x gw), t = b * n tokens, k top-k, e experts,
s slots per expert, wh/ww halo window, ph/pw input patch size.
"""
import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .patches import PatchGeometry

_ENABLED = True


@torch.jit.unused  # TorchScript always takes the reference path
def use_cpu_kernels(x: torch.Tensor) -> bool:
    """Whether the tuned kernels run for a tensor: on CPU, unless :func:`reference_kernels` is active or the graph
    is being exported (torch.export, ``torch.jit.trace`` / ONNX), where the plain ops are what other runtimes
    take and no choice of form by size ties the graph to the example's batch size."""
    return _ENABLED and x.device.type == 'cpu' and not (torch.compiler.is_exporting() or torch.jit.is_tracing())


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within the block the reference implementations run on CPU too (for tests and A/B timings)."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = previous


def image_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> pixel rows [b * h * w + 1, c]; the last row is zero (outside the map, empty slot)."""
    b, c, h, w = x.shape
    rows = x.new_empty(b * h * w + 1, c)
    # One permuting copy. (Shifting each channel by 64 bytes first, against cache-set aliasing when the
    # channel stride is a multiple of 4 KiB, no longer pays with torch 2.14's copy kernel: one thread,
    # [32, 64, 32, 32] 3.9 -> 3.3 ms and [32, 64, 64, 64] 49 -> 31 ms without it.)
    rows[:b * h * w].view(b, h, w, c).copy_(x.permute(0, 2, 3, 1))
    rows[b * h * w].zero_()
    return rows


def overlap_add(tiles: torch.Tensor, stride: Tuple[int, int]) -> torch.Tensor:
    """Sum overlapping tiles back into one map: [b, gh, gw, wh, ww, c] -> [b, H, W, c] (channels last).

    Tile ``(i, j)`` lands at rows ``i * sh ..`` and columns ``j * sw ..``; H = (gh + rh - 1) * sh and
    W = (gw + rw - 1) * sw with ``rh = ceil(wh / sh)`` (what no tile covers is zero). This is ``F.fold``
    (col2im) for tiles that overlap only near their borders: one strided copy of the tiles' cores, then
    strided adds of the thin overlaps.
    """
    b, gh, gw, wh, ww, c = tiles.shape
    sh, sw = stride
    rh, rw = -(-wh // sh), -(-ww // sw)
    out = tiles.new_empty(b, gh + rh - 1, sh, gw + rw - 1, sw, c)
    out[:, gh:].zero_()
    out[:, :gh, :, gw:].zero_()
    by_row = tiles.permute(0, 1, 3, 2, 4, 5)  # [b, gh, wh, gw, ww, c]
    for i in range(rh):
        height = min(sh, wh - i * sh)
        for j in range(rw):
            width = min(sw, ww - j * sw)
            part = by_row[:, :, i * sh:i * sh + height, :, j * sw:j * sw + width]
            target = out[:, i:i + gh, :height, j:j + gw, :width]
            if i == 0 and j == 0:  # the cores tile the covered area exactly: copy, no zeroing needed
                target.copy_(part)
            else:
                target += part
    return out.view(b, (gh + rh - 1) * sh, (gw + rw - 1) * sw, c)


def _window_rows(slot_of_assignment: torch.Tensor, capacity: int, num_experts: int, wh: int, ww: int) -> torch.Tensor:
    """Row of every (choice, token, window pixel) in the windows seen as rows [s * wh * ww * e, c]: [k, t, wh, ww].

    Windows [s, e * c, wh, ww] in channels-last memory are rows ``((slot * wh + y) * ww + x) * e + expert``.
    Dropped choices point at row 0 (the caller zeroes them).
    """
    slot = slot_of_assignment.clamp(max=num_experts * capacity - 1)
    base = (slot % capacity) * (wh * ww * num_experts) + slot // capacity
    pixel = torch.arange(wh * ww, device=slot.device).view(wh, ww) * num_experts
    return base.unsqueeze(-1).unsqueeze(-1) + pixel


def _embed_windows(x: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    s, wh, ww, e = pixel_index.shape
    windows = F.embedding(pixel_index.reshape(-1), image_rows(x))
    return windows.view(s, wh, ww, e * x.shape[1]).permute(0, 3, 1, 2)


class _GatherWindows(torch.autograd.Function):
    """Each token sits in k slots, so its window's gradient is the sum of k slot gradients (a gather), and
    overlapping windows are summed back into the image by :func:`overlap_add`."""

    @staticmethod
    def forward(ctx, x, pixel_index, slot_of_assignment, geometry: PatchGeometry):
        ctx.save_for_backward(slot_of_assignment)
        ctx.geometry = geometry
        ctx.x_shape = x.shape
        ctx.capacity, ctx.num_experts = pixel_index.shape[0], pixel_index.shape[3]
        return _embed_windows(x, pixel_index)

    @staticmethod
    def backward(ctx, grad_windows):
        (slot_of_assignment,) = ctx.saved_tensors
        geometry, capacity, e = ctx.geometry, ctx.capacity, ctx.num_experts
        b, c, h, w = ctx.x_shape
        wh, ww = grad_windows.shape[2], grad_windows.shape[3]
        k, t = slot_of_assignment.shape
        rows = grad_windows.permute(0, 2, 3, 1).reshape(-1, c)  # a view when channels-last, as produced
        index = _window_rows(slot_of_assignment, capacity, e, wh, ww)
        token_grad = F.embedding(index.view(k, -1), rows)  # [k, t * wh * ww, c]
        if e * capacity < k * t:  # static: some choices may have been dropped and add nothing
            kept = (slot_of_assignment < e * capacity).to(token_grad.dtype)
            token_grad = token_grad * kept.view(k, t, 1).repeat_interleave(wh * ww, dim=1)
        token_grad = token_grad[0] if k == 1 else token_grad.sum(0)
        tiles = token_grad.view(b, geometry.grid_h, geometry.grid_w, wh, ww, c)
        image = overlap_add(tiles, (geometry.patch_h, geometry.patch_w))
        before = geometry.halo_before
        return image[:, before:before + h, before:before + w].permute(0, 3, 1, 2).contiguous(), None, None, None


def gather_windows(
        x: torch.Tensor,
        pixel_index: torch.Tensor,
        slot_of_assignment: Optional[torch.Tensor],
        geometry: PatchGeometry,
) -> torch.Tensor:
    """:func:`.gather.gather_windows` on CPU; without a slot map the backward is autograd's own."""
    if slot_of_assignment is None or not (torch.is_grad_enabled() and x.requires_grad):
        return _embed_windows(x, pixel_index)
    return _GatherWindows.apply(x, pixel_index, slot_of_assignment, geometry)


def _gather_through_inverse(grad_out: torch.Tensor, inverse: torch.Tensor, every_row_read: bool) -> torch.Tensor:
    """The source-row gradient of a row gather: ``grad_out`` [m, d] read back through ``inverse`` [r].

    Source rows that no output row reads (``inverse`` = m) get zero, unless the caller knows statically that
    every source row is read (``every_row_read``), which saves the masking pass.
    """
    num_rows = grad_out.shape[0]
    grad = F.embedding(inverse.clamp(max=num_rows - 1), grad_out)
    if every_row_read:
        return grad
    return grad.masked_fill((inverse >= num_rows).unsqueeze(-1), 0)


class _GatherRows(torch.autograd.Function):
    """Every source row feeds at most one output row with a non-zero weight: its gradient is one row."""

    @staticmethod
    def forward(ctx, source, index, inverse):
        ctx.save_for_backward(inverse)
        ctx.num_rows = index.numel()
        return F.embedding(index, source)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        return _gather_through_inverse(grad_out.reshape(ctx.num_rows, -1), inverse, False), None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """:func:`.gather.gather_rows` on CPU."""
    if not (torch.is_grad_enabled() and source.requires_grad):
        return F.embedding(index, source)
    return _GatherRows.apply(source, index, inverse)


class _GatherRowsTop1(torch.autograd.Function):
    """Top-1 rows times weights of exactly 1: the forward skips the multiply, the backward gives each token
    the sum over its pixels of ``grad . row``, which is what the product would have given."""

    @staticmethod
    def forward(ctx, source, index, inverse, token_weight, pixel_token):
        out = F.embedding(index, source)
        ctx.save_for_backward(out, inverse, pixel_token)
        ctx.num_tokens = token_weight.shape[0]
        ctx.weight_dtype = token_weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, inverse, pixel_token = ctx.saved_tensors
        grad_out = grad_out.reshape(out.shape)
        grad_source = None
        if ctx.needs_input_grad[0]:
            # every output row reads its own source row (nothing is dropped in top-1), so with as many source
            # rows as output rows each source row is read exactly once; otherwise some (empty slots) are not
            grad_source = _gather_through_inverse(grad_out, inverse, inverse.shape[0] == out.shape[0])
        grad_weight = None
        if ctx.needs_input_grad[3]:
            pixel_grad = (grad_out * out).sum(-1, dtype=ctx.weight_dtype)  # float32 sums also under autocast
            grad_weight = pixel_grad.new_zeros(ctx.num_tokens).index_add_(0, pixel_token, pixel_grad)
        return grad_source, None, None, grad_weight, None


def gather_rows_top1(
        source: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
        token_weight: torch.Tensor,
        pixel_token: torch.Tensor,
) -> torch.Tensor:
    """:func:`.gather.gather_rows_top1` on CPU (called only when something needs a gradient)."""
    return _GatherRowsTop1.apply(source, index, inverse, token_weight, pixel_token)


def _mix_forward(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    b, o = rows.shape[0], weight.shape[0]
    weight = weight.unsqueeze(0).expand(b, -1, -1)
    if bias is None:
        return torch.bmm(weight, rows.transpose(1, 2))
    return torch.baddbmm(bias.view(1, o, 1), weight, rows.transpose(1, 2))


class _MixPixels(torch.autograd.Function):

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return _mix_forward(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight = ctx.saved_tensors
        grad_rows = None
        if ctx.needs_input_grad[0]:  # bmm reads the transposed view as is; matmul would copy it first
            grad_rows = torch.bmm(grad_out.transpose(1, 2), weight.unsqueeze(0).expand(grad_out.shape[0], -1, -1))
        grad_weight = torch.bmm(grad_out, rows).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias


def mix_pixels(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``W @ rows^T`` per image: rows [b, m, c], weight [o, c] -> [b, o, m], written in NCHW order.

    A matrix product reads its operand transposed for free, so neither direction makes a transposing copy.
    """
    if not (torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)):
        return _mix_forward(rows, weight, bias)
    return _MixPixels.apply(rows, weight, bias)


def _cell_sum(x: torch.Tensor, cell: Tuple[int, int]) -> torch.Tensor:
    """Sum over non-overlapping ``cell`` blocks: [b, c, h, w] -> a new [b, c, h / ch, w / cw] (sizes divide)."""
    b, c, h, w = x.shape
    ch, cw = cell
    rows = x.view(b, c, h // ch, ch, w)
    if ch == 1:
        acc = x if cw > 1 else x.clone()  # the column step below makes the new tensor
    elif ch <= 3:  # a few strided adds beat a reduction kernel over a short dim
        acc = rows[:, :, :, 0] + rows[:, :, :, 1]
        for i in range(2, ch):
            acc += rows[:, :, :, i]
    else:
        acc = rows.sum(3)
    if cw == 1:
        return acc
    cols = acc.view(b, c, h // ch, w // cw, cw)
    out = cols[..., 0] + cols[..., 1]
    for j in range(2, cw):
        out += cols[..., j]
    return out


class _CellMean(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, cell: Tuple[int, int]):
        ctx.cell = cell
        return _cell_sum(x, cell).mul_(1.0 / (cell[0] * cell[1]))

    @staticmethod
    def backward(ctx, grad_out):
        ch, cw = ctx.cell
        b, c, gh, gw = grad_out.shape
        grad = grad_out * (1.0 / (ch * cw))
        grad = grad.unsqueeze(-1).expand(b, c, gh, gw, cw).reshape(b, c, gh, 1, gw * cw)
        return grad.expand(b, c, gh, ch, gw * cw).reshape(b, c, gh * ch, gw * cw), None


def cell_mean(x: torch.Tensor, cell: Tuple[int, int]) -> torch.Tensor:
    """:func:`.embed.cell_mean` on CPU: strided sums forward, a broadcast backward."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _cell_sum(x, cell).mul_(1.0 / (cell[0] * cell[1]))
    return _CellMean.apply(x, cell)


def expert_windows_conv(
        windows: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        stride: int,
        num_experts: int,
) -> torch.Tensor:
    """``F.conv2d(windows, weight, bias, stride, groups=num_experts)`` (no padding), in whichever form is
    fastest on CPU for its sizes: windows [s, e * i, wh, ww], weight [e * o, i, k, k] -> [s, e * o, ph, pw].

    - weight larger than the experts' im2col columns (a few slots of a wide stage: 7 x 7 maps at 512
      channels): the columns (``F.unfold``) times each expert's weight as one batched GEMM, which reads the
      weight as it is stored;
    - else weight larger than the windows: the grouped conv on NCHW windows (one copy of the windows instead
      of converting the weight to channels-last and its gradient back);
    - else the grouped conv as given (channels-last windows from the gather; its oneDNN kernel is then faster
      than on NCHW).
    """
    e = num_experts
    s, _, wh, ww = windows.shape
    eo, i, k, _ = weight.shape
    ph, pw = (wh - k) // stride + 1, (ww - k) // stride + 1
    if weight.numel() > s * e * i * k * k * ph * pw:
        cols = F.unfold(windows, k, stride=stride).view(s, e, i * k * k, ph * pw)
        out = torch.einsum('eoc,secp->seop', weight.reshape(e, eo // e, i * k * k), cols)
        if bias is not None:
            out = out + bias.view(e, eo // e, 1)
        return out.reshape(s, eo, ph, pw)
    if weight.numel() > windows.numel():
        windows = windows.contiguous()
    return F.conv2d(windows, weight, bias, stride, groups=e)
