"""Soft dispatch: every expert on every pixel, summed with each pixel's patch weights.

Shape legend: b batch, c/o in/out channels, h/w input map, ho/wo output map, n patches, e experts,
t = b * n tokens.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..experts import ConvExperts
from ..patches import PatchGeometry, patch_geometry
from .plans import PlanCache, SoftPlan, soft_plan
from .routing import Routing


class SoftDispatch(nn.Module):
    """``top_k=None``: every expert's Conv-BN-ReLU over the whole map, summed with the patch weights.

    The experts run one by one into one output (:meth:`~pce_timm.layers.experts.ConvExperts.forward_weighted`),
    the same function as one conv with e * o channels followed by the weighted sum, without its e-times-larger
    product.

    Its plan is the patch of every output pixel, which spreads the patch weights [t, e] over the map.
    """

    def __init__(self, patch_size: Tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.plans = PlanCache(soft_plan)

    def forward(self, x: torch.Tensor, routing: Routing, experts: ConvExperts,
                patch_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """[b, c, h, w] -> [b, o, ho, wo]; ``patch_size`` replaces the constructor's for this call when given."""
        b, e = x.shape[0], experts.num_experts
        expert_indices, routing_weights = routing.expert_indices, routing.routing_weights
        size = self.patch_size if patch_size is None else patch_size
        geometry = patch_geometry(x.shape[2], x.shape[3], size, experts.kernel_size, experts.stride)
        plan = self._plan(geometry, b, x.device)
        weights = torch.zeros_like(routing_weights).scatter(1, expert_indices, routing_weights)  # [t, e] by id
        n = weights.shape[0] // b
        weight_map = weights.to(x.dtype).reshape(b, n, e).index_select(1, plan.patch_of_pixel)  # [b, ho*wo, e]
        weight_map = weight_map.permute(2, 0, 1).reshape(e, b, 1, geometry.out_h, geometry.out_w)
        return experts.forward_weighted(x, weight_map)

    def _plan(self, geometry: PatchGeometry, batch_size: int, device: torch.device) -> SoftPlan:
        if torch.jit.is_scripting():
            return soft_plan(geometry, batch_size, device)
        return self.plans.get(geometry, batch_size, device)
