"""Patch embeddings for routing: CoordConv 1x1 projection, then spatial pyramid pooling per patch."""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .patches import coord_channels, grid_size


class PatchEmbedSPP(nn.Module):
    """Embed every patch of a feature map into one vector: D = ``embed_chs`` x sum(level^2).

    The patch [C + 4, ph, pw] (features plus the 4 coordinate channels of :func:`coord_channels`) goes
    through a 1x1 conv to ``embed_chs`` channels, then average pooling at each pyramid level (1, 2, 4 ->
    1 + 4 + 16 = 21 cells). The 1x1 conv is applied to the whole map at once and the coordinate part is
    added from a precomputed map, so no [C + 4]-channel copy of the input is ever made.
    """

    def __init__(self, in_chs: int, embed_chs: int = 8, levels: Sequence[int] = (1, 2, 4)):
        super().__init__()
        if embed_chs < 1:
            raise ValueError(f'embed_chs must be >= 1, got {embed_chs}')
        if not levels or any(level < 1 for level in levels):
            raise ValueError(f'levels must be a non-empty list of positive ints, got {levels}')
        self.in_chs = in_chs
        self.levels: List[int] = list(levels)
        self.proj = nn.Conv2d(in_chs + 4, embed_chs, kernel_size=1)
        self.embed_dim = embed_chs * sum(level * level for level in self.levels)

    def forward(self, x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
        """Map [b, c, h, w] -> patch embeddings [b, n, D] (patches row-major, as :func:`patchify`)."""
        b, _, h, w = x.shape
        (gh, gw), (ph, pw) = grid_size(h, w, patch_size), patch_size
        weight = self.proj.weight
        y = F.conv2d(x, weight[:, :self.in_chs])
        y = F.pad(y, (0, gw * pw - w, 0, gh * ph - h))
        coords = coord_channels((gh, gw), (ph, pw), x.device).to(y.dtype)
        y = y + F.conv2d(coords.unsqueeze(0), weight[:, self.in_chs:], self.proj.bias)
        c = y.shape[1]
        y = y.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, ph, pw)
        pooled = [F.adaptive_avg_pool2d(y, level).flatten(1) for level in self.levels]
        return torch.cat(pooled, dim=1).reshape(b, gh * gw, self.embed_dim)
