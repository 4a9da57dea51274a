"""Deformable attention for global context after the experts are mixed (after DAT, Xia et al. 2022).

Every pixel attends to a small set of points sampled from the whole map. The points start on a coarse
reference grid and move by offsets predicted from the queries, so each image chooses where to look;
sampling is bilinear (``grid_sample``), which keeps the module differentiable and shape-static.

Shape legend: b batch, c channels, h/w map size, m = gh * gw sampled points, nh heads, d head dim.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class DeformableAttention2d(nn.Module):

    def __init__(
            self,
            dim: int,
            num_heads: int = 4,
            ref_stride: int = 4,
            offset_range: float = 2.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        """
        Args:
            dim: channels in and out.
            num_heads: attention heads; must divide ``dim``.
            ref_stride: one reference point per ``ref_stride x ref_stride`` pixels.
            offset_range: how far (in reference-grid cells) a point may move from its reference.
            device, dtype: where and in which dtype to build the parameters (timm's factory kwargs).
        """
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f'attn_heads must be >= 1 and divide dim={dim}, got {num_heads}')
        if ref_stride < 1:
            raise ValueError(f'ref_stride must be >= 1, got {ref_stride}')
        self.num_heads = num_heads
        self.ref_stride = ref_stride
        self.offset_range = offset_range
        self.q = nn.Conv2d(dim, dim, 1, **dd)
        self.kv = nn.Conv2d(dim, 2 * dim, 1, **dd)
        self.offset = nn.Sequential(
            nn.Conv2d(dim, dim, ref_stride + 1, stride=ref_stride, padding=ref_stride // 2, groups=dim, **dd),
            nn.GELU(),
            nn.Conv2d(dim, 2, 1, bias=False, **dd),
        )
        self.proj = nn.Conv2d(dim, dim, 1, **dd)
        nn.init.zeros_(self.offset[2].weight)  # start exactly on the reference grid
        nn.init.zeros_(self.proj.weight)  # and as a no-op residual branch
        nn.init.zeros_(self.proj.bias)

    def sample_points(self, q: torch.Tensor) -> torch.Tensor:
        """Where to sample, in ``grid_sample`` coordinates [-1, 1]: [b, gh, gw, 2] (x, y)."""
        offsets = self.offset(q)  # [b, 2, gh, gw]
        b, _, gh, gw = offsets.shape
        ys = (torch.arange(gh, device=q.device, dtype=q.dtype) * 2 + 1) / gh - 1
        xs = (torch.arange(gw, device=q.device, dtype=q.dtype) * 2 + 1) / gw - 1
        ref = torch.stack([xs.view(1, gw).expand(gh, gw), ys.view(gh, 1).expand(gh, gw)], dim=-1)
        cell = torch.tensor([2.0 / gw, 2.0 / gh], device=q.device, dtype=q.dtype)
        shift = torch.tanh(offsets.permute(0, 2, 3, 1)) * self.offset_range * cell
        return (ref.unsqueeze(0) + shift).clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(x)
        points = self.sample_points(q)
        sampled = F.grid_sample(x, points, mode='bilinear', padding_mode='zeros', align_corners=False)
        k, v = self.kv(sampled).flatten(2).chunk(2, dim=1)  # [b, c, m] each
        nh, d = self.num_heads, c // self.num_heads
        q = q.reshape(b, nh, d, h * w).transpose(-1, -2)  # [b, nh, hw, d]
        k = k.reshape(b, nh, d, -1).transpose(-1, -2)  # [b, nh, m, d]
        v = v.reshape(b, nh, d, -1).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, nh, hw, d]
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj(out)
