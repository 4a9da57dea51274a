"""The 1x1 mix after the experts, applied to the sparse path's pixel rows [b, h * w, o] (channels last).

On CPU the tuned kernel (:func:`.kernels_cpu.mix_pixels`) computes ``W @ rows^T`` so the result lands in a
contiguous NCHW map with no transposing copy forward or backward; elsewhere (and under TorchScript) the
reference is the 1x1 conv on the rows seen as an NCHW map.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels_cpu


def mix_pixels(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], height: int, width: int):
    """A 1x1 conv on pixel rows: rows [b, h * w, c], conv weight [o, c, 1, 1] -> [b, o, h, w]."""
    b, o = rows.shape[0], weight.shape[0]
    if torch.jit.is_scripting() or not kernels_cpu.use_cpu_kernels(rows):
        return F.conv2d(rows.view(b, height, width, -1).permute(0, 3, 1, 2), weight, bias)
    weight = weight.reshape(o, -1).to(rows.dtype)
    if bias is not None:
        bias = bias.to(rows.dtype)
    return kernels_cpu.mix_pixels(rows, weight, bias).view(b, o, height, width)
