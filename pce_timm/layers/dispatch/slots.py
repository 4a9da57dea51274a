"""Slot dispatch: halo windows in per-expert slots of a static capacity, one grouped conv, a weighted gather.

The training discipline (Switch-style capacity: a patch whose expert is full moves to a free slot of
another one), and the static eval one (compile / export / meta tensors, or ``eval_capacity_factor`` set),
whose sizes must not depend on routing. Only the capacity differs; the layer chooses it.

Shape legend: b batch, c/o in/out channels, h/w input map, ho/wo output map, n patches, e experts,
k top-k, t = b * n tokens, s slots per expert (capacity), wh/ww halo window, ph/pw output patch size,
m = b * ho * wo output pixels.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..experts import ConvExperts
from ..gather import gather_rows, gather_rows_top1, gather_windows
from ..patches import PatchGeometry, patch_geometry
from .plans import PlanCache, SparsePlan, remainder, sparse_plan
from .routing import Routing, assign_slots


def weighted_sum(gathered: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
    """Sum over choices of gathered rows [k, m, o] times their weights [k, m] -> [m, o]."""
    if gathered.shape[0] == 1:  # static: skip the reduction copy
        return gathered[0] * pixel_weight[0].unsqueeze(-1)
    return (gathered * pixel_weight.unsqueeze(-1)).sum(0)


def window_pixels(x: torch.Tensor, plan: SparsePlan, token_of_slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The flat input pixel read by every slot's halo window: token_of_slot [s, e] -> [s, wh, ww, e].

    ``num_tokens`` in ``token_of_slot`` marks an empty slot; empty slots and pixels outside the map read
    ``b * h * w`` (the zero row).
    """
    b, _, h, w = x.shape
    n = plan.window.shape[0]
    filled = token_of_slot < num_tokens
    token = token_of_slot.clamp(max=num_tokens - 1)
    pixel = plan.window[token % n]  # [s, e, wh, ww]
    inside = (pixel < h * w) & filled.unsqueeze(-1).unsqueeze(-1)
    pixel = torch.where(inside, (token // n).unsqueeze(-1).unsqueeze(-1) * (h * w) + pixel, b * h * w)
    return pixel.permute(0, 2, 3, 1)


def valid_outputs(plan: SparsePlan, token_of_slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Which output pixels of each slot are real: [s, e, ph, pw] (False for empty slots and padding)."""
    n = plan.window.shape[0]
    filled = token_of_slot < num_tokens  # [s, e]
    return plan.patch_inside[token_of_slot % n] & filled.unsqueeze(-1).unsqueeze(-1)


def output_rows(
        plan: SparsePlan,
        geometry: PatchGeometry,
        slot_of_assignment: torch.Tensor,
        assignment_of_slot: torch.Tensor,
        capacity: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index maps between expert-output rows and (choice, output pixel) rows.

    Expert outputs [s, e * o, ph, pw] (channels-last) are rows ``((slot * ph + i) * pw + j) * e + expert``
    of ``o`` values. Returns ``index`` [k, m]: the row each output pixel reads for each choice (0 where the
    choice was dropped; its weight is zeroed), and ``inverse`` [s * ph * pw * e]: the (choice, pixel) row
    that reads each expert-output row, ``k * m`` for none.
    """
    k, num_tokens = slot_of_assignment.shape
    e = assignment_of_slot.shape[0] // capacity
    n = plan.window.shape[0]
    ph, pw = geometry.out_patch_h, geometry.out_patch_w
    num_pixels = plan.pixel_token.shape[0]
    pixel_slot = slot_of_assignment[:, plan.pixel_token]  # [k, m]
    row = (remainder(pixel_slot, capacity) * (ph * pw) + plan.pixel_offset.view(1, -1)) * e + pixel_slot // capacity
    index = torch.where(pixel_slot < e * capacity, row, torch.zeros_like(row))

    assignment = assignment_of_slot.view(e, capacity).t()  # [s, e]
    filled = (assignment < k * num_tokens).unsqueeze(-1).unsqueeze(-1)
    token = remainder(assignment, num_tokens)
    patch = token % n
    pixel = (token // n).unsqueeze(-1).unsqueeze(-1) * (geometry.out_h * geometry.out_w) + plan.patch_pixel[patch]
    inverse = (assignment // num_tokens).unsqueeze(-1).unsqueeze(-1) * num_pixels + pixel  # [s, e, ph, pw]
    inverse = torch.where(filled & plan.patch_inside[patch], inverse, k * num_pixels)
    return index, inverse.permute(0, 2, 3, 1).reshape(-1)


class SparsePlanned(nn.Module):
    """What the sparse disciplines share: their patch size and a cache of :class:`~.plans.SparsePlan` per
    (geometry, batch, device); :meth:`_plan` builds it afresh under TorchScript, which cannot run the cache.

    ``forward``'s ``patch_size``, when given, replaces the one set at construction for that call (a layer whose
    patches are sized from its input map, ``PCEConv2d(patch_grid=...)``); the geometry, and so the plan's cache
    key, holds the size used.
    """

    def __init__(self, patch_size: Tuple[int, int]):
        super().__init__()
        self.patch_size = patch_size
        self.plans = PlanCache(sparse_plan)

    def _patch_size(self, patch_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        return self.patch_size if patch_size is None else patch_size

    def _plan(self, geometry: PatchGeometry, batch_size: int, device: torch.device) -> SparsePlan:
        if torch.jit.is_scripting():
            return sparse_plan(geometry, batch_size, device)
        return self.plans.get(geometry, batch_size, device)


class SlotDispatch(SparsePlanned):
    """Each patch through its k experts in slots: gather windows -> grouped conv -> weighted gather back.

    Its plan is the halo window of every patch and the token and patch offset of every output pixel.
    """

    def forward(self, x: torch.Tensor, routing: Routing, experts: ConvExperts, capacity: int,
                patch_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """[b, c, h, w] -> output pixel rows [b, ho, wo, o], with ``capacity`` slots per expert."""
        b, e, o = x.shape[0], experts.num_experts, experts.out_chs
        expert_indices, routing_weights = routing.expert_indices, routing.routing_weights
        num_tokens, k = expert_indices.shape
        g = patch_geometry(x.shape[2], x.shape[3], self._patch_size(patch_size), experts.kernel_size, experts.stride)
        plan = self._plan(g, b, x.device)
        slot_of_assignment, assignment_of_slot = assign_slots(expert_indices, e, capacity)  # [k, t], [e * s]
        token_of_slot = torch.where(  # [s, e]
            assignment_of_slot < k * num_tokens, remainder(assignment_of_slot, num_tokens), num_tokens)
        token_of_slot = token_of_slot.view(e, capacity).t()

        pixels = window_pixels(x, plan, token_of_slot, num_tokens)
        windows = gather_windows(x, pixels, slot_of_assignment, g)  # [s, e * c, wh, ww]
        valid: Optional[torch.Tensor] = None
        if experts.training and (capacity * e != k * num_tokens or g.out_h % g.out_patch_h != 0
                                 or g.out_w % g.out_patch_w != 0):
            valid = valid_outputs(plan, token_of_slot, num_tokens)
        y = experts.forward_windows(windows, valid)  # [s, e * o, ph, pw]

        index, inverse = output_rows(plan, g, slot_of_assignment, assignment_of_slot, capacity)
        index = index.reshape(-1)
        rows = y.permute(0, 2, 3, 1).reshape(-1, o)
        shape = (b, g.out_h, g.out_w, o)
        may_drop = capacity * e < k * num_tokens  # static: some choices may have found no slot
        if k == 1 and not may_drop:  # every weight is p / stop_grad(p) == 1: only its gradient matters
            return gather_rows_top1(rows, index, inverse, routing_weights[:, 0], plan.pixel_token).view(shape)
        gathered = gather_rows(rows, index, inverse).view(k, -1, o)
        pixel_weight = routing_weights.t().to(y.dtype)[:, plan.pixel_token]  # [k, m]
        if may_drop:  # dropped choices add nothing
            pixel_weight = pixel_weight * (slot_of_assignment[:, plan.pixel_token] < e * capacity).to(y.dtype)
        return weighted_sum(gathered, pixel_weight).view(shape)
