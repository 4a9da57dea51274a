"""The two gathers of the sparse path, with backwards that are gathers too.

Autograd's backward of a row gather is a scatter-add, which on CPU runs several times slower than the
gather itself and would dominate a sparse PCE layer. Both gathers here have structure that makes their
backward a gather as well:

- :func:`gather_windows` (pixels -> halo windows in expert slots): each token sits in k slots, so the
  gradient of a token's window is the sum of k slot gradients (a gather), and overlapping windows are
  summed back into the image by ``F.fold`` (col2im), which runs at copy speed;
- :func:`gather_rows` (expert outputs -> output pixels): every expert-output row feeds at most one output
  row with a non-zero weight, so its gradient is one gathered row (the inverse map).

Under TorchScript, or when nothing needs a gradient, the same gathers run as plain ``F.embedding``.

Shape legend: b batch, c channels, h/w map, n patches (gh x gw), t = b * n tokens, k top-k, e experts,
s slots per expert, wh/ww halo window, ph/pw input patch size.
"""
from typing import List

import torch
import torch.nn.functional as F


def _image_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> pixel rows [b * h * w + 1, c]; the last row is zero (outside the map, empty slot)."""
    b, c, h, w = x.shape
    rows = x.new_zeros(b * h * w + 1, c)
    rows[:b * h * w].view(b, h, w, c).copy_(x.permute(0, 2, 3, 1))
    return rows


class _GatherWindows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, pixel_index, slot_of_assignment, geometry: List[int]):
        capacity, num_experts, ph, pw, before, after = geometry
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
        s, _, wh, ww = grad_windows.shape
        grad = grad_windows.permute(0, 2, 3, 1).reshape(s, wh, ww, e, c).permute(3, 0, 1, 2, 4)  # [e, s, ...]
        num_slots = e * capacity
        slot = slot_of_assignment.clamp(max=num_slots - 1)  # [k, t]
        token_grad = grad[slot // capacity, slot % capacity]  # [k, t, wh, ww, c]
        dropped = slot_of_assignment >= num_slots
        token_grad = token_grad.masked_fill(dropped.view(*dropped.shape, 1, 1, 1), 0).sum(0)
        gh, gw = (h + ph - 1) // ph, (w + pw - 1) // pw
        cols = token_grad.view(b, gh * gw, wh, ww, c).permute(0, 4, 2, 3, 1).reshape(b, c * wh * ww, gh * gw)
        image = F.fold(cols, (gh * ph + before + after, gw * pw + before + after), (wh, ww), stride=(ph, pw))
        return image[:, :, before:before + h, before:before + w], None, None, None


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
    if torch.jit.is_scripting() or not x.requires_grad:
        s, wh, ww, e = pixel_index.shape
        windows = F.embedding(pixel_index.reshape(-1), _image_rows(x))
        return windows.view(s, wh, ww, e * x.shape[1]).permute(0, 3, 1, 2)
    return _GatherWindows.apply(x, pixel_index, slot_of_assignment, geometry)


class _GatherRows(torch.autograd.Function):

    @staticmethod
    def forward(ctx, source, index, inverse):
        ctx.save_for_backward(inverse)
        ctx.num_rows = index.numel()
        return F.embedding(index, source)

    @staticmethod
    def backward(ctx, grad_out):
        (inverse,) = ctx.saved_tensors
        unused = inverse >= ctx.num_rows
        grad = F.embedding(inverse.clamp(max=ctx.num_rows - 1), grad_out.reshape(ctx.num_rows, -1))
        return grad.masked_fill(unused.unsqueeze(-1), 0), None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``source[index]`` for rows [r, d] and index [m], whose backward gathers through ``inverse`` [r].

    ``inverse[i]`` is the one output row that takes source row ``i`` with a gradient, or ``m`` for none.
    The caller guarantees that any other use of row ``i`` is multiplied by zero afterwards.
    """
    if torch.jit.is_scripting() or not source.requires_grad:
        return F.embedding(index, source)
    return _GatherRows.apply(source, index, inverse)
