"""Sorted (exact) eval dispatch: every patch through exactly its chosen experts, each expert on its own run.

Shape legend: b batch, c/o in/out channels, ho/wo output map, e experts, k top-k, t tokens,
a = k * t assignments (choice-major), ph/pw output patch size.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..experts import ConvExperts
from ..gather import gather_windows
from ..patches import patch_geometry
from .plans import is_tracing
from .routing import Routing
from .slots import SparsePlanned, weighted_sum, window_pixels


class SortedDispatch(SparsePlanned):
    """Eval, eager and TorchScript: the assignments sorted by expert, each expert convolving its run.

    Run lengths are read from the routing (``.tolist()``); there is no capacity, so no patch moves to another
    expert and an image's output never depends on its batch. Under ``torch.compile`` (eval without gradients)
    the experts' runs are one custom op (:func:`~pce_timm.layers.experts.sorted_experts`), which counts them
    inside, so the graph around it keeps static shapes. Its plan is the one of :class:`~.slots.SlotDispatch`.
    """

    def forward(self, x: torch.Tensor, routing: Routing, experts: ConvExperts,
                patch_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """[b, c, h, w] -> output pixel rows [b, ho, wo, o]."""
        b, e, o = x.shape[0], experts.num_experts, experts.out_chs
        expert_indices, routing_weights = routing.expert_indices, routing.routing_weights
        num_tokens, k = expert_indices.shape
        g = patch_geometry(x.shape[2], x.shape[3], self._patch_size(patch_size), experts.kernel_size, experts.stride)
        plan = self._plan(g, b, x.device)
        chosen = expert_indices.t().reshape(-1)  # [a], choice-major: assignment = choice * t + token
        order = torch.argsort(chosen, stable=True)
        pixels = window_pixels(x, plan, (order % num_tokens).unsqueeze(1), num_tokens)  # [a, wh, ww, 1]
        windows = gather_windows(x, pixels, None, g)
        if is_tracing():  # the run lengths are counted inside one opaque op: static shapes for the graph
            rows = experts.forward_sorted_op(windows, chosen[order]).view(-1, o)  # [a * ph * pw, o]
        else:
            counts: List[int] = torch.bincount(chosen, minlength=e).tolist()
            rows = experts.forward_sorted(windows, counts).permute(0, 2, 3, 1).reshape(-1, o)  # from [a, o, ph, pw]
        position = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=x.device))
        choice = torch.arange(k, device=x.device).view(k, 1) * num_tokens
        patch_area = g.out_patch_h * g.out_patch_w
        index = position[choice + plan.pixel_token] * patch_area + plan.pixel_offset.view(1, -1)  # [k, m]
        gathered = F.embedding(index, rows)  # [k, m, o]
        shape = (b, g.out_h, g.out_w, o)
        if k == 1 and not (torch.is_grad_enabled() and routing_weights.requires_grad):
            return gathered[0].view(shape)  # top-1 weights are exactly 1
        pixel_weight = routing_weights.t().to(rows.dtype)[:, plan.pixel_token]  # [k, m]
        return weighted_sum(gathered, pixel_weight).view(shape)
