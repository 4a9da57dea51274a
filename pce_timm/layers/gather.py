"""The two gathers of the sparse path, with backwards that are gathers too.

Autograd's backward of a row gather is a scatter-add, which on CPU runs several times slower than the
gather itself and would dominate a sparse PCE layer. Both gathers here have structure that makes their
backward a gather as well:

- :func:`gather_windows` (pixels -> halo windows in expert slots): each token sits in k slots, so the
  gradient of a token's window is the sum of k slot gradients (a gather), and overlapping windows are
  summed back into the image by :func:`overlap_add`, which runs at copy speed;
- :func:`gather_rows` (expert outputs -> output pixels): every expert-output row feeds at most one output
  row with a non-zero weight, so its gradient is one gathered row (the inverse map).

Under TorchScript, or when nothing needs a gradient, the same gathers run as plain ``F.embedding``.

Shape legend: b batch, c channels, h/w map, n patches (gh x gw), t = b * n tokens, k top-k, e experts,
s slots per expert, wh/ww halo window, ph/pw input patch size.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F


def _image_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> pixel rows [b * h * w + 1, c]; the last row is zero (outside the map, empty slot)."""
    b, c, h, w = x.shape
    rows = x.new_empty(b * h * w + 1, c)
    source = x.permute(0, 2, 3, 1)
    if x.is_contiguous() and (h * w * x.element_size()) % 4096 == 0:
        # Each row reads c values h * w apart; at a multiple of 4 KiB (32x32 or 64x64 float maps) they all
        # fall into the same cache sets and the copy runs 2-3x slower. Shifting every channel by 64 bytes
        # first (one fast contiguous copy) avoids it.
        shifted = x.new_empty(b, c, h * w + 16)
        shifted[:, :, :h * w].copy_(x.view(b, c, h * w))
        source = shifted[:, :, :h * w].view(b, c, h, w).permute(0, 2, 3, 1)
    rows[:b * h * w].view(b, h, w, c).copy_(source)
    rows[b * h * w].zero_()
    return rows


def overlap_add(tiles: torch.Tensor, stride: Tuple[int, int]) -> torch.Tensor:
    """Sum overlapping tiles back into one map: [b, gh, gw, wh, ww, c] -> [b, H, W, c] (channels last).

    Tile ``(i, j)`` lands at rows ``i * sh ..`` and columns ``j * sw ..``; H = (gh + rh - 1) * sh and
    W = (gw + rw - 1) * sw with ``rh = ceil(wh / sh)`` (what no tile covers is zero). This is ``F.fold``
    (col2im) for tiles that overlap only near their borders: one strided copy of the tiles' cores, then
    strided adds of the thin overlaps, which on CPU runs at copy speed where col2im is several times slower.
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


class _GatherWindows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, pixel_index, slot_of_assignment, geometry: List[int]):
        s, wh, ww, e = pixel_index.shape
        windows = F.embedding(pixel_index.reshape(-1), _image_rows(x))
        ctx.save_for_backward(slot_of_assignment)
        ctx.geometry = geometry
        ctx.x_shape = x.shape
        return windows.view(s, wh, ww, e * x.shape[1]).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad_windows):
        (slot_of_assignment,) = ctx.saved_tensors
        capacity, e, ph, pw, before, after = ctx.geometry
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
        gh, gw = (h + ph - 1) // ph, (w + pw - 1) // pw
        image = overlap_add(token_grad.view(b, gh, gw, wh, ww, c), (ph, pw))
        return image[:, before:before + h, before:before + w].permute(0, 3, 1, 2).contiguous(), None, None, None


def gather_windows(
        x: torch.Tensor,
        pixel_index: torch.Tensor,
        slot_of_assignment: torch.Tensor,
        geometry: List[int],
) -> torch.Tensor:
    """Halo windows of the patches in every expert slot: [s, e * c, wh, ww] in channels-last memory.

    Args:
        x: the input map [b, c, h, w].
        pixel_index: for every slot, window pixel and expert, the flat pixel ``(b * h + y) * w + x`` it reads,
            ``b * h * w`` for zero (outside the map, or an empty slot): [s, wh, ww, e].
        slot_of_assignment: the slot of every (choice, token) [k, t] (``e * s`` = dropped), for the backward.
        geometry: ``[capacity, num_experts, ph, pw, halo_before, halo_after]``.
    """
    if torch.jit.is_scripting() or not (torch.is_grad_enabled() and x.requires_grad):
        return gather_windows_plain(x, pixel_index)
    return _GatherWindows.apply(x, pixel_index, slot_of_assignment, geometry)


def gather_windows_plain(x: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    """The windows of :func:`gather_windows` with autograd's own backward: pixel_index [s, wh, ww, e] -> [s, e * c,
    wh, ww] in channels-last memory. For gathers whose backward is rare (no grad, eval) or has no slot map."""
    s, wh, ww, e = pixel_index.shape
    windows = F.embedding(pixel_index.reshape(-1), _image_rows(x))
    return windows.view(s, wh, ww, e * x.shape[1]).permute(0, 3, 1, 2)


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
    """``source[index]`` for rows [r, d] and index [m], whose backward gathers through ``inverse`` [r].

    ``inverse[i]`` is the one output row that takes source row ``i`` with a gradient, or ``m`` for none.
    The caller guarantees that any other use of row ``i`` is multiplied by zero afterwards.
    """
    if torch.jit.is_scripting() or not (torch.is_grad_enabled() and source.requires_grad):
        return F.embedding(index, source)
    return _GatherRows.apply(source, index, inverse)


class _GatherRowsTop1(torch.autograd.Function):

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
    """Top-1 output rows ``source[index] * token_weight[pixel_token]`` where every weight is exactly 1.

    A top-1 routing weight is ``p / stop_grad(p)``: 1 in value, with the router's gradient. The forward
    therefore skips the multiply, and the backward gives each token the sum over its pixels of
    ``grad . row``, which is what the product would have given. Under TorchScript the product is taken
    (for its gradient). ``source`` [r, d]; ``index`` [m]; ``inverse`` [r] as for :func:`gather_rows`;
    ``token_weight`` [t]; ``pixel_token`` [m].
    """
    if torch.jit.is_scripting():
        return F.embedding(index, source) * token_weight[pixel_token].unsqueeze(-1).to(source.dtype)
    if not (torch.is_grad_enabled() and (source.requires_grad or token_weight.requires_grad)):
        return F.embedding(index, source)  # times weights of exactly 1
    return _GatherRowsTop1.apply(source, index, inverse, token_weight, pixel_token)
