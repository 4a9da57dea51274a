"""Plans: the static index maps a dispatch needs, built once per (geometry, batch, device) and cached.

A plan depends only on sizes (a :class:`~pce_timm.layers.patches.PatchGeometry` and the batch size), never
on routing, so one built for an input shape serves every later forward with that shape. Inside
``torch.compile`` / ``torch.export`` tracing and under TorchScript plans are built fresh (the traced graph
then holds the index computation, and no traced tensor leaks into the cache).

Shape legend: b batch, n = gh * gw patches, t = b * n tokens, wh/ww halo window, ho/wo output map,
ph/pw output patch size.
"""
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Tuple

import torch

from ..patches import PatchGeometry, pixel_patch_index, window_index


def is_exporting() -> bool:
    """Inside torch.export, where the graph has no module state to write routing results to."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_exporting()


def is_tracing() -> bool:
    """Inside torch.compile, torch.export or ``torch.jit.trace`` (which the TorchScript-based ONNX exporter runs),
    where sizes must not depend on tensor values."""
    if torch.jit.is_scripting():
        return False
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def remainder(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """``x % divisor`` for an integer tensor and a size that may be the batch's (a symbolic size in a dynamic-batch
    export, which the ONNX exporter cannot turn into ``remainder.Scalar``): there it is ``x - floor(x / d) * d``."""
    if not is_exporting():
        return x % divisor
    return x - torch.div(x, divisor, rounding_mode='floor') * divisor


class SoftPlan(NamedTuple):
    patch_of_pixel: torch.Tensor  # [ho * wo] the patch of every output pixel


class SparsePlan(NamedTuple):
    window: torch.Tensor  # [n, wh, ww] flat input pixel of every halo-window pixel (h * w = outside the map)
    pixel_token: torch.Tensor  # [b * ho * wo] the token (image * n + patch) of every output pixel
    pixel_offset: torch.Tensor  # [b * ho * wo] its offset ``i * pw + j`` inside its output patch
    patch_pixel: torch.Tensor  # [n, ph, pw] flat output pixel ``y * wo + x`` of every output-patch pixel
    patch_inside: torch.Tensor  # [n, ph, pw] whether that pixel is on the map (False: padding past the edge)


def soft_plan(geometry: PatchGeometry, batch_size: int, device: torch.device) -> SoftPlan:
    out_patch = (geometry.out_patch_h, geometry.out_patch_w)
    return SoftPlan(pixel_patch_index(geometry.out_h, geometry.out_w, out_patch, device)[0].reshape(-1))


def sparse_plan(geometry: PatchGeometry, batch_size: int, device: torch.device) -> SparsePlan:
    g = geometry
    ho, wo, ph, pw, n = g.out_h, g.out_w, g.out_patch_h, g.out_patch_w, g.grid_h * g.grid_w
    window = window_index(g.height, g.width, (g.patch_h, g.patch_w), g.kernel_size, g.stride, device)
    patch_of_pixel, offset = pixel_patch_index(ho, wo, (ph, pw), device)
    pixel_token = (torch.arange(batch_size, device=device).view(-1, 1, 1) * n + patch_of_pixel).reshape(-1)
    patch = torch.arange(n, device=device).view(n, 1, 1)
    y = (patch // g.grid_w) * ph + torch.arange(ph, device=device).view(1, ph, 1)  # [n, ph, 1]
    x = (patch % g.grid_w) * pw + torch.arange(pw, device=device).view(1, 1, pw)  # [n, 1, pw]
    return SparsePlan(window, pixel_token, offset.reshape(-1).repeat(batch_size), y * wo + x, (y < ho) & (x < wo))


class PlanCache:
    """A small LRU of plans keyed by (geometry, batch size, device, inference mode).

    Inference mode is part of the key because tensors made under ``torch.inference_mode`` cannot be saved
    for a later backward (``F.embedding`` saves its indices).
    """

    def __init__(self, build: Callable[[PatchGeometry, int, torch.device], NamedTuple], max_size: int = 8):
        self.build = build
        self.max_size = max_size
        self._plans: Dict[Tuple, NamedTuple] = OrderedDict()

    def get(self, geometry: PatchGeometry, batch_size: int, device: torch.device):
        if is_tracing():
            return self.build(geometry, batch_size, device)
        key = (geometry, batch_size, device, torch.is_inference_mode_enabled())
        plan = self._plans.pop(key, None)  # pop and re-insert: most recently used last (each step atomic)
        if plan is None:
            plan = self.build(geometry, batch_size, device)
        self._plans[key] = plan
        while len(self._plans) > self.max_size:
            try:
                self._plans.popitem(last=False)
            except KeyError:  # emptied meanwhile by another thread (nn.DataParallel replicas share the cache)
                break
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)

    def __deepcopy__(self, memo) -> 'PlanCache':  # a copied layer starts with an empty cache
        return PlanCache(self.build, self.max_size)
