"""Loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts", as in DeepSeek-V3): the bias update after every optimizer step.

Every PCE layer with ``balance='bias'`` keeps a per-expert ``balance_bias`` buffer [e] that is added to the
scores choosing its experts (never to the mixing weights; see :class:`pce_timm.layers.PCEConv2d`). After an
update each such layer moves it from the loads of its last forward, by the layer's ``bias_update`` rule:

- ``'proportional'``: ``bias_update_rate * clamp((mean_load - load) / mean_load, -1, 1)``. The step
  shrinks with the expert's relative over- or under-load, so the bias settles where the loads balance and
  moves there only by the sampling noise of one step's loads;
- ``'sign'`` (the default; Wang et al.; DeepSeek-V3): ``bias_update_rate * sign(mean_load - load)``. Every expert
  moves by the full rate every update, balanced or not, so with few choices per step (noisy loads) the bias keeps
  wandering by about the rate and ends wherever the last updates left it.

Either way experts that took more than their share become less attractive, starved ones more, and no step is
larger than the rate. Loads are summed over processes first (``reduce``), so every process applies the same
update and the buffers stay identical.

Shape legend: b batch, n patches, e experts, k top-k.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from pce_timm.layers import BIAS_UPDATES, PCEConv2d, pce_layers

__all__ = ['ReduceFn', 'bias_step', 'last_loads', 'update_balance_bias', 'uses_balance_bias']

ReduceFn = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes (e.g. accelerate's reduce)


def uses_balance_bias(model: nn.Module) -> bool:
    """Whether any PCE layer of ``model`` balances by the bias (so the training step must update it)."""
    return any(layer.balance == 'bias' for layer in pce_layers(model).values())


def last_loads(layer: PCEConv2d) -> Optional[torch.Tensor]:
    """The load of every expert in ``layer``'s last forward: all k choices of every patch counted, float [e].

    None before the first forward (or with ``track_routing=False``).
    """
    indices = layer.last_expert_indices  # [b, n, k]
    if indices is None:
        return None
    one_hot = torch.zeros(indices.numel(), layer.num_experts, device=indices.device)
    return one_hot.scatter_(1, indices.reshape(-1, 1), 1.0).sum(0)


def bias_step(load: torch.Tensor, rate: float, rule: str) -> torch.Tensor:
    """The bias change [e] of one update from the loads [e] (summed over processes), by ``rule`` (see above)."""
    mean = load.mean()
    if rule == 'sign':
        return rate * torch.sign(mean - load)
    if rule == 'proportional':
        return rate * ((mean - load) / mean.clamp_min(1e-12)).clamp(-1.0, 1.0)
    raise ValueError(f"bias_update must be one of {BIAS_UPDATES}, got {rule!r}")


@torch.no_grad()
def update_balance_bias(model: nn.Module, reduce: Optional[ReduceFn] = None) -> Dict[str, torch.Tensor]:
    """One loss-free balancing step for every PCE layer with ``balance='bias'``, outside the autograd graph.

    ``bias += bias_step(load, bias_update_rate, bias_update)`` from the loads of the layer's last forward. With
    several processes pass ``reduce``, a function that sums a tensor over them (``lambda t:
    accelerator.reduce(t, 'sum')``); all layers' loads go through it in one call. When ``reduce`` is None and
    ``torch.distributed`` is initialised, its ``all_reduce`` is used.

    Returns the loads (summed over processes) of the layers updated, by layer name.
    """
    layers = {name: layer for name, layer in pce_layers(model).items() if layer.balance == 'bias'}
    loads = {name: last_loads(layer) for name, layer in layers.items()}
    loads = {name: load for name, load in loads.items() if load is not None}
    if not loads:
        return {}
    names = list(loads)
    flat = torch.cat([loads[name] for name in names])
    if reduce is not None:
        flat = reduce(flat)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat)
    out, start = {}, 0
    for name in names:
        layer = layers[name]
        load = flat[start:start + layer.num_experts]
        start += layer.num_experts
        step = bias_step(load, layer.bias_update_rate, layer.bias_update)
        layer.balance_bias.add_(step.to(layer.balance_bias))
        out[name] = load
    return out
