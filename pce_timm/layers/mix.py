"""The 1x1 mix after the experts, applied to pixel rows and written straight into an NCHW map.

The sparse path ends with its output as pixel rows [b, h * w, o] (channels last). A 1x1 conv is a matrix
product per pixel, and a matrix product can read its operand transposed for free, so ``W @ rows^T`` lands
directly in NCHW layout: no transposing copy forward, none backward, and the next layer gets the same
contiguous map a dense conv would have given it.
"""
from typing import Optional

import torch


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


def mix_pixels(rows: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], height: int, width: int):
    """A 1x1 conv on pixel rows: rows [b, h * w, c], conv weight [o, c, 1, 1] -> contiguous [b, o, h, w]."""
    weight = weight.reshape(weight.shape[0], -1).to(rows.dtype)
    if bias is not None:
        bias = bias.to(rows.dtype)
    b, o = rows.shape[0], weight.shape[0]
    needs_grad = rows.requires_grad or weight.requires_grad
    if torch.jit.is_scripting() or not (torch.is_grad_enabled() and needs_grad):
        return _mix_forward(rows, weight, bias).view(b, o, height, width)
    return _MixPixels.apply(rows, weight, bias).view(b, o, height, width)
