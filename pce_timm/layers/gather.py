"""The gathers of the sparse path: pixels -> halo windows in expert slots, expert outputs -> output pixels.

Each op is a selector: the tuned CPU kernel (:mod:`.kernels_cpu`, whose backwards are gathers too) on CPU,
otherwise the plain reference below (``F.embedding`` with autograd's own backward), which also runs under
TorchScript and, on CPU, inside :func:`.kernels_cpu.reference_kernels`.

Shape legend: b batch, c channels, h/w map, t tokens, k top-k, e experts, s slots per expert, wh/ww halo
window, m gathered rows, r source rows, d row width.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels_cpu
from .patches import PatchGeometry


def gather_windows_reference(x: torch.Tensor, pixel_index: torch.Tensor) -> torch.Tensor:
    """The windows of :func:`gather_windows` as one ``F.embedding`` with autograd's backward."""
    s, wh, ww, e = pixel_index.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    rows = torch.cat([rows, rows.new_zeros(1, x.shape[1])])
    windows = F.embedding(pixel_index.reshape(-1), rows)
    return windows.view(s, wh, ww, e * x.shape[1]).permute(0, 3, 1, 2)


def gather_windows(
        x: torch.Tensor,
        pixel_index: torch.Tensor,
        slot_of_assignment: Optional[torch.Tensor],
        geometry: PatchGeometry,
) -> torch.Tensor:
    """Halo windows of the patches in every expert slot: [s, e * c, wh, ww] in channels-last memory.

    Args:
        x: the input map [b, c, h, w].
        pixel_index: for every slot, window pixel and expert, the flat pixel ``(b * h + y) * w + x`` it reads,
            ``b * h * w`` for zero (outside the map, or an empty slot): [s, wh, ww, e].
        slot_of_assignment: the slot of every (choice, token) [k, t] (``e * s`` = dropped), which lets the CPU
            backward gather instead of scatter; None: autograd's backward (eval, where it is rare).
        geometry: the layer's patch geometry on ``x``.
    """
    if torch.jit.is_scripting() or not kernels_cpu.use_cpu_kernels(x):
        return gather_windows_reference(x, pixel_index)
    return kernels_cpu.gather_windows(x, pixel_index, slot_of_assignment, geometry)


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``source[index]`` for rows [r, d] and index [m].

    ``inverse`` [r] is the one output row that takes source row ``i`` with a gradient (``m`` for none); the
    caller guarantees that any other use of row ``i`` is multiplied by zero afterwards, so the CPU backward
    gathers through it.
    """
    if torch.jit.is_scripting() or not kernels_cpu.use_cpu_kernels(source):
        return F.embedding(index, source)
    return kernels_cpu.gather_rows(source, index, inverse)


def gather_rows_top1(
        source: torch.Tensor,
        index: torch.Tensor,
        inverse: torch.Tensor,
        token_weight: torch.Tensor,
        pixel_token: torch.Tensor,
) -> torch.Tensor:
    """Top-1 output rows ``source[index] * token_weight[pixel_token]`` where every weight is exactly 1.

    A top-1 routing weight is ``p / stop_grad(p)``: 1 in value, with the router's gradient, so without a
    gradient the product is skipped. ``source`` [r, d]; ``index`` [m]; ``inverse`` [r] as for
    :func:`gather_rows`; ``token_weight`` [t]; ``pixel_token`` [m].
    """
    if not torch.jit.is_scripting():
        if not (torch.is_grad_enabled() and (source.requires_grad or token_weight.requires_grad)):
            return F.embedding(index, source)  # times weights of exactly 1
        if kernels_cpu.use_cpu_kernels(source):
            return kernels_cpu.gather_rows_top1(source, index, inverse, token_weight, pixel_token)
    return F.embedding(index, source) * token_weight[pixel_token].unsqueeze(-1).to(source.dtype)
