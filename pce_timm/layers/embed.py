"""Patch embeddings for routing: CoordConv 1x1 projection, then spatial pyramid pooling per patch."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels_cpu
from .patches import coord_channels, grid_size, pad_to_grid


def cell_mean(x: torch.Tensor, cell: Tuple[int, int]) -> torch.Tensor:
    """``F.avg_pool2d(x, cell)`` for a map whose sides are multiples of ``cell`` (strided sums on CPU)."""
    if cell[0] == 1 and cell[1] == 1:
        return x
    if torch.jit.is_scripting() or not kernels_cpu.use_cpu_kernels(x):
        return F.avg_pool2d(x, cell)
    return kernels_cpu.cell_mean(x, cell)


def _is_exporting() -> bool:
    """Inside torch.export or ``torch.jit.trace`` (the TorchScript-based ONNX exporter)."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def pooling_matrix(size: int, level: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The [level, size] matrix that averages ``size`` values into ``level`` cells as ``F.adaptive_avg_pool1d``
    does: cell ``i`` is the mean of ``floor(i * size / level) .. ceil((i + 1) * size / level)``, which overlap
    when ``level`` does not divide ``size``."""
    i = torch.arange(level, device=device).view(level, 1)
    start = torch.div(i * size, level, rounding_mode='floor')
    end = torch.div((i + 1) * size + level - 1, level, rounding_mode='floor')
    j = torch.arange(size, device=device).view(1, size)
    inside = (j >= start) & (j < end)
    return inside.to(dtype) / (end - start).to(dtype)


def adaptive_avg_pool2d_matmul(x: torch.Tensor, level: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, level)`` as two products with :func:`pooling_matrix`: [..., h, w] -> [..., L, L].

    The same cells (up to float rounding) from ops every exporter takes with any batch size: the TorchScript ONNX
    exporter cannot export adaptive pooling whose output does not divide its input, nor any adaptive pooling on
    a dynamic-batch input.
    """
    rows = pooling_matrix(x.shape[-2], level, x.device, x.dtype)
    cols = pooling_matrix(x.shape[-1], level, x.device, x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())


class PatchEmbedSPP(nn.Module):
    """Embed every patch of a feature map into one vector: D = ``embed_chs`` x sum(level^2).

    The patch [C + 4, ph, pw] (features plus the 4 coordinate channels of :func:`coord_channels`) goes
    through a 1x1 conv to ``embed_chs`` channels, then average pooling at each pyramid level (1, 2, 4 ->
    1 + 4 + 16 = 21 cells). The 1x1 conv is applied to the whole map at once and the coordinate part is
    added from a precomputed map, so no [C + 4]-channel copy of the input is ever made; when the patch
    divides into the finest level's cells, the input is averaged over those cells before the conv.
    """

    def __init__(
            self,
            in_chs: int,
            embed_chs: int = 8,
            levels: Sequence[int] = (1, 2, 4),
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if embed_chs < 1:
            raise ValueError(f'embed_chs must be >= 1, got {embed_chs}')
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f'levels must be a non-empty list of positive ints, got {levels}')
        self.in_chs = in_chs
        self.levels: List[int] = list(levels)
        self.proj = nn.Conv2d(in_chs + 4, embed_chs, kernel_size=1, **dd)
        self.embed_dim = embed_chs * sum(level * level for level in self.levels)

    def forward(self, x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
        """Map [b, c, h, w] -> patch embeddings [b, n, D] (patches row-major, as :func:`patchify`)."""
        b, _, h, w = x.shape
        (gh, gw), (ph, pw) = grid_size(h, w, patch_size), patch_size
        finest = max(self.levels)
        if all(finest % level == 0 for level in self.levels) and ph % finest == 0 and pw % finest == 0:
            cells = self._finest_cells(x, (gh, gw), (ph, pw), finest)
        else:
            cells = self._pixels(x, (gh, gw), (ph, pw))
        c = cells.shape[1]
        cells = cells.reshape(b, c, gh, cells.shape[2] // gh, gw, cells.shape[3] // gw)
        cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, cells.shape[3], cells.shape[5])
        if _is_exporting():
            pooled = [adaptive_avg_pool2d_matmul(cells, level).flatten(1) for level in self.levels]
        else:
            pooled = [F.adaptive_avg_pool2d(cells, level).flatten(1) for level in self.levels]
        return torch.cat(pooled, dim=1).reshape(b, gh * gw, self.embed_dim)

    def _pixels(self, x: torch.Tensor, grid: Tuple[int, int], patch_size: Tuple[int, int]) -> torch.Tensor:
        """The projected map with coordinates [b, C', gh * ph, gw * pw] (the padding holds only coordinates)."""
        weight = self.proj.weight
        y = F.conv2d(x, weight[:, :self.in_chs])
        y = pad_to_grid(y, patch_size)
        coords = coord_channels(grid, patch_size, x.device).to(y.dtype)
        return y + F.conv2d(coords.unsqueeze(0), weight[:, self.in_chs:], self.proj.bias)

    def _finest_cells(self, x: torch.Tensor, grid: Tuple[int, int], patch_size: Tuple[int, int], finest: int):
        """:meth:`_pixels` averaged over the cells of the finest pyramid level: [b, C', gh * L, gw * L].

        Averaging and the 1x1 projection are both linear, so pooling the input first gives the same cells
        while the projection runs on ``(ph / L) * (pw / L)`` times fewer pixels.
        """
        cell = (patch_size[0] // finest, patch_size[1] // finest)
        weight = self.proj.weight
        y = F.conv2d(cell_mean(pad_to_grid(x, patch_size), cell), weight[:, :self.in_chs])
        coords = F.avg_pool2d(coord_channels(grid, patch_size, x.device).to(y.dtype).unsqueeze(0), cell)
        return y + F.conv2d(coords, weight[:, self.in_chs:], self.proj.bias)
