"""Cosine-router keys set outside the gradient: K-Means on real patch embeddings before training, and EMA
updates towards the embeddings routed to each key (the ``ema`` routing of :mod:`.schedule`'s phases).

Both are deterministic for the same inputs, so every process computes the same keys.
"""
from typing import Dict, Iterable, List

import torch
import torch.nn as nn

from pce_timm.layers import CosineRouter, pce_layers
from pce_timm.layers.routing_stats import layer_top1
from pce_timm.progress import progress_bar

__all__ = ['init_router_keys', 'fit_router_keys', 'ema_update_keys']


@torch.no_grad()
def ema_update_keys(model: nn.Module, decay: float, gather=None) -> int:
    """Move every cosine router's keys towards the embeddings routed to them in the last forward.

    Call after the optimizer step. ``gather`` (e.g. ``accelerator.gather``) collects embeddings and choices
    from every process first, so all replicas apply the same update and stay identical.

    Returns:
        The number of layers updated.
    """
    count = 0
    for layer in pce_layers(model).values():
        if not isinstance(layer.router, CosineRouter) or layer.last_embeddings is None:
            continue
        embeddings = layer.last_embeddings.detach().float()
        choices = layer_top1(layer.last_router_logits, layer.last_expert_indices, layer.soft).detach()
        if gather is not None:
            embeddings, choices = gather(embeddings.contiguous()), gather(choices.contiguous())
        layer.router.ema_update(embeddings.reshape(-1, embeddings.shape[-1]), choices.reshape(-1), decay)
        count += 1
    return count


@torch.no_grad()
def init_router_keys(model: nn.Module, batches: Iterable[torch.Tensor], seed: int = 0) -> Dict[str, int]:
    """Fit every cosine router's keys by K-Means over patch embeddings of real images.

    The model runs in eval mode on ``batches`` (input tensors); each PCE layer's ``last_embeddings`` are
    collected and passed to ``router.init_keys``. Deterministic for fixed batches and seed, so every process
    computing it on the same batches gets the same keys.

    Returns:
        Layer name -> number of embeddings the keys were fitted to.
    """
    layers = {n: m for n, m in pce_layers(model).items() if isinstance(m.router, CosineRouter)}
    if not layers:
        return {}
    collected: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    was_training = model.training
    modes = {name: layer.routing_mode for name, layer in layers.items()}
    model.eval()
    try:
        for x in batches:
            model(x)
            for name, layer in layers.items():
                emb = layer.last_embeddings
                collected[name].append(emb.reshape(-1, emb.shape[-1]).float().cpu())
    finally:
        model.train(was_training)
        for name, layer in layers.items():
            layer.set_routing_mode(modes[name])
    fitted = {}
    for i, (name, layer) in enumerate(layers.items()):
        embeddings = torch.cat(collected[name])
        layer.router.init_keys(embeddings, seed=seed + i)
        fitted[name] = embeddings.shape[0]
    return fitted


def fit_router_keys(model: nn.Module, loader, num_batches: int, seed: int, device, progress: bool) -> Dict[str, int]:
    """K-Means-initialise cosine-router keys from ``num_batches`` real training batches (same on every rank)."""
    if not any(hasattr(m.router, 'init_keys') for m in pce_layers(model).values()):
        return {}
    batches = []
    for i, (x, _) in enumerate(progress_bar(loader, total=min(num_batches, len(loader)), desc='key init (K-Means)',
                                    disable=not progress, leave=False)):
        if i >= num_batches:
            break
        batches.append(x.to(device))
    return init_router_keys(model, batches, seed=seed)
