"""Per-sample records of accuracy, loss and routing that survive ``accelerator.gather_for_metrics``.

Everything is recorded per sample (a row per image), so gathering across processes and dropping the
duplicated samples of the last, padded batch keeps the numbers exact: top-1 / top-5 / loss over the whole
split, and per PCE layer the top-1 expert counts (usage), the mean router entropy and, for expert choice,
the expert loads and the fraction of patches no expert picked.

Shape legend: b batch, n patches, e experts.
"""
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from pce_timm.layers import PCEConv2d
from pce_timm.layers.routing_stats import (
    dead_experts,
    dropped_patches,
    imbalance,
    json_number,
    layer_top1,
    router_entropy_from_logits,
    usage_entropy,
)

__all__ = ['sample_records', 'routing_records', 'MetricMeter', 'summarize_usage']


def sample_records(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> Dict[str, torch.Tensor]:
    """Per-sample loss (fp32 CE), top-1 and top-k (k = min(5, classes)) hits as float tensors [b]."""
    logits = logits.float()
    loss = F.cross_entropy(logits, target, reduction='none')
    topk = logits.topk(min(5, num_classes), dim=-1).indices
    hits = topk == target.unsqueeze(1)
    return {'loss': loss, 'top1': hits[:, 0].float(), 'top5': hits.any(1).float()}


def routing_records(layers: Dict[str, PCEConv2d]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per sample and PCE layer: top-1 expert counts [b, e] and mean router entropy over patches [b].

    Expert choice layers (a recorded ``last_expert_mask``) count every expert's load instead (the patches it
    picked, [b, e]) and add ``dropped``, the fraction of the image's patches no expert picked [b].
    """
    records = {}
    for name, layer in layers.items():
        logits = layer.last_router_logits
        if logits is None:
            continue
        logits = logits.detach().float()
        record = {'entropy': router_entropy_from_logits(logits).mean(1)}  # [b]
        mask = layer.last_expert_mask
        if mask is not None:
            record['counts'] = mask.detach().float().sum(1)  # [b, e]
            record['dropped'] = dropped_patches(mask.detach()).float().mean(1)  # [b]
        else:
            first = layer_top1(logits, layer.last_expert_indices, layer.soft)  # [b, n]
            record['counts'] = F.one_hot(first, layer.num_experts).sum(1).float()  # [b, e]
        records[name] = record
    return records


def summarize_usage(counts: torch.Tensor, mean_entropy: float,
                    dropped_fraction: Optional[float] = None) -> Dict[str, Any]:
    """Statistics of one layer from its total top-1 counts [e], as ``results.json`` stores them.

    Returns:
        ``usage_entropy`` (entropy of the usage shares / log e: 1 = perfectly even), ``imbalance`` (most / least
        used expert; ``None`` when an expert is unused, since JSON has no infinity), ``dead_experts`` (indices of
        unused experts), ``mean_router_entropy`` (mean per-patch entropy of the routing distribution, nats),
        ``usage_share`` (fraction of patches per expert) and ``usage_counts``; with ``dropped_fraction`` (expert
        choice: the patches no expert picked) also that. The formulas are those of
        :mod:`pce_timm.layers.routing_stats`.
    """
    counts = counts.double()
    share = counts / counts.sum().clamp(min=1)
    ratio = json_number(imbalance(counts))
    out = {
        'usage_entropy': round(usage_entropy(counts), 6),
        'imbalance': None if ratio is None else round(ratio, 6),
        'mean_router_entropy': round(mean_entropy, 6),
        'dead_experts': dead_experts(counts),
        'usage_share': [round(s, 6) for s in share.tolist()],
        'usage_counts': [int(c) for c in counts.tolist()],
    }
    if dropped_fraction is not None:
        out['dropped_fraction'] = round(dropped_fraction, 6)
    return out


class MetricMeter:
    """Accumulates gathered per-sample records; :meth:`compute` returns the split's metrics."""

    def __init__(self):
        self.count = 0
        self.sums: Dict[str, float] = {}
        self.routing_counts: Dict[str, torch.Tensor] = {}
        self.routing_entropy: Dict[str, float] = {}
        self.routing_dropped: Dict[str, float] = {}

    def update(self, samples: Dict[str, torch.Tensor], routing: Optional[Dict[str, Dict[str, torch.Tensor]]] = None):
        self.count += int(samples['loss'].numel())
        for key, value in samples.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.double().sum())
        for name, record in (routing or {}).items():
            counts = record['counts'].double().sum(0).cpu()
            self.routing_counts[name] = self.routing_counts.get(name, 0) + counts
            self.routing_entropy[name] = self.routing_entropy.get(name, 0.0) + float(record['entropy'].double().sum())
            if 'dropped' in record:
                dropped = float(record['dropped'].double().sum())
                self.routing_dropped[name] = self.routing_dropped.get(name, 0.0) + dropped

    def compute(self) -> Dict[str, Any]:
        n = max(self.count, 1)
        out: Dict[str, Any] = {
            'top1': round(100.0 * self.sums.get('top1', 0.0) / n, 4),
            'top5': round(100.0 * self.sums.get('top5', 0.0) / n, 4),
            'loss': round(self.sums.get('loss', 0.0) / n, 6),
            'num_samples': self.count,
        }
        out['routing'] = {
            name: summarize_usage(counts, self.routing_entropy[name] / n,
                                  self.routing_dropped[name] / n if name in self.routing_dropped else None)
            for name, counts in self.routing_counts.items()}
        return out


def routing_summary(routing: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Model-level summary of per-layer statistics: means over layers, total dead experts (and, with expert
    choice layers, their largest dropped fraction)."""
    if not routing:
        return {}
    layers: List[Dict[str, Any]] = list(routing.values())
    imbalances = [r['imbalance'] for r in layers]
    out = {
        'mean_usage_entropy': round(sum(r['usage_entropy'] for r in layers) / len(layers), 6),
        'max_imbalance': None if any(i is None for i in imbalances) else max(imbalances),
        'dead_experts': sum(len(r['dead_experts']) for r in layers),
    }
    dropped = [r['dropped_fraction'] for r in layers if 'dropped_fraction' in r]
    if dropped:
        out['max_dropped_fraction'] = max(dropped)
    return out
