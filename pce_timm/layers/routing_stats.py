"""Routing statistics: the one home of the formulas behind ``PCEConv2d.routing_stats``, the routing analysis
(:mod:`pce_timm.analysis.stats`) and the training / evaluation metrics (:mod:`pce_timm.train.metrics`).

Shape legend: b images, n patches, e experts, k top-k. ``expert_indices`` list each patch's chosen experts
most probable first (for soft routing too), so ``expert_indices[..., 0]`` is the top-1 choice.

In memory an expert that is never used makes :func:`imbalance` ``float('inf')``; JSON has no infinity, so the
files written from these numbers (``stats.json``, ``results.json``) store it as ``null``, converted where
they are written (:func:`json_number`).
"""
import math
from typing import List, Optional

import torch


def _check_experts(num_experts: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f'num_experts must be an int >= 1, got {num_experts!r}')


def _check_indices(expert_indices: torch.Tensor, num_experts: int) -> None:
    if expert_indices.dim() != 3:
        raise ValueError(f'expert_indices must be [b, n, k], got shape {tuple(expert_indices.shape)}')
    if expert_indices.numel() and (expert_indices.min() < 0 or expert_indices.max() >= num_experts):
        raise ValueError(
            f'expert_indices must lie in [0, {num_experts}), got values in '
            f'[{int(expert_indices.min())}, {int(expert_indices.max())}]')


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f'{name} must be a fraction in [0, 1], got {value!r}')


def _check_counts(counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f'counts must be non-negative with a positive sum, got {counts.tolist()}')
    return counts


def top1_experts(expert_indices: torch.Tensor) -> torch.Tensor:
    """The most probable chosen expert of every patch: [b, n, k] -> [b, n]."""
    return expert_indices[..., 0]


def layer_top1(router_logits: torch.Tensor, expert_indices: torch.Tensor, soft: bool) -> torch.Tensor:
    """A layer's top-1 expert per patch [b, n] from its last forward: ``router_logits`` [b, n, e] and
    ``expert_indices`` [b, n, k].

    Soft routing takes the logits' argmax; sparse routing its first choice (the most probable one).
    """
    return router_logits.argmax(-1) if soft else top1_experts(expert_indices)


def order_by_probability(router_probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """Reorder each patch's chosen experts [b, n, k] by router probability, most probable first.

    A stable sort: input already in contract order comes back unchanged, ties included.
    """
    chosen_probs = router_probs.gather(-1, expert_indices)
    order = chosen_probs.sort(dim=-1, descending=True, stable=True).indices
    return expert_indices.gather(-1, order)


def usage_counts(expert_indices: torch.Tensor, num_experts: int, all_choices: bool = False) -> torch.Tensor:
    """How often each expert was chosen: [b, n, k] -> int64 [e].

    Args:
        expert_indices: chosen experts [b, n, k], most probable first.
        num_experts: e.
        all_choices: count all k choices of every patch instead of only the top-1 choice.
    """
    _check_experts(num_experts)
    _check_indices(expert_indices, num_experts)
    chosen = expert_indices if all_choices else top1_experts(expert_indices)
    return torch.bincount(chosen.reshape(-1).long().cpu(), minlength=num_experts)


def _check_mask(expert_mask: torch.Tensor) -> None:
    if expert_mask.dim() != 3 or expert_mask.dtype != torch.bool:
        raise ValueError(f'expert_mask must be a bool [b, n, e] tensor, got {expert_mask.dtype} '
                         f'{tuple(expert_mask.shape)}')


def expert_load(expert_mask: torch.Tensor) -> torch.Tensor:
    """Expert choice: how many patches each expert processed, from which experts picked each patch
    [b, n, e] (bool) -> int64 [e]. Every expert picks the same number per image, so it is flat by construction."""
    _check_mask(expert_mask)
    return expert_mask.reshape(-1, expert_mask.shape[-1]).long().sum(0).cpu()


def dropped_patches(expert_mask: torch.Tensor) -> torch.Tensor:
    """Expert choice: which patches no expert picked (no expert output): [b, n, e] (bool) -> bool [b, n]."""
    _check_mask(expert_mask)
    return ~expert_mask.any(-1)


def dropped_fraction(expert_mask: torch.Tensor) -> float:
    """Expert choice: the fraction of patches no expert picked, from [b, n, e] (bool); 0 = none dropped."""
    dropped = dropped_patches(expert_mask)
    return float(dropped.double().mean()) if dropped.numel() else 0.0


def usage_entropy(counts: torch.Tensor) -> float:
    """Entropy of the usage distribution divided by log(e), in [0, 1]: 1 = perfectly balanced, 0 = one expert.

    With a single expert the usage is trivially balanced and the result is 1.0.
    """
    counts = _check_counts(counts)
    if counts.numel() == 1:
        return 1.0
    share = counts / counts.sum()
    return float(torch.special.entr(share).sum() / math.log(counts.numel()))


def router_entropy(router_probs: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of every patch's router distribution: [..., e] -> [...], in the input's dtype.

    0 = routed with certainty; log(e) = uniform. ``entr(0) = 0``, so experts of probability 0 add nothing.
    """
    return torch.special.entr(router_probs).sum(-1)


def router_entropy_from_logits(router_logits: torch.Tensor) -> torch.Tensor:
    """:func:`router_entropy` of ``softmax(router_logits)``: [..., e] -> [...], through ``log_softmax``.

    For code that holds the logits (the training / evaluation metrics): ``log_softmax`` keeps the log of
    tiny probabilities exact where ``log(softmax)`` would round them.
    """
    log_probs = router_logits.log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def normalize_entropy(entropy: float, num_experts: int) -> float:
    """An entropy in nats over ``num_experts`` outcomes divided by log(e), in [0, 1].

    A single expert (log(1) = 0) leaves no choice to be uncertain about: 0.0.
    """
    return entropy / math.log(num_experts) if num_experts > 1 else 0.0


def mean_router_entropy(router_probs: torch.Tensor, normalize: bool = False) -> float:
    """Mean over patches of :func:`router_entropy` (float64), from [b, n, e] (or [..., e]).

    0 = every patch is routed with certainty; log(e) (or 1 with ``normalize``, see :func:`normalize_entropy`)
    = uniform router.
    """
    if router_probs.dim() < 1 or router_probs.numel() == 0:
        raise ValueError(f'router_probs must be a non-empty [..., e] tensor, got shape {tuple(router_probs.shape)}')
    entropy = float(router_entropy(router_probs.double()).mean())
    return normalize_entropy(entropy, router_probs.shape[-1]) if normalize else entropy


def imbalance(counts: torch.Tensor) -> float:
    """Busiest expert's count over the least used one's: 1 = balanced.

    Returns ``float('inf')`` when some expert is never used (its count is 0); such experts are also what
    :func:`dead_experts` lists with the default threshold. Stored as ``null`` in JSON (:func:`json_number`).
    """
    counts = _check_counts(counts)
    least = counts.min()
    return float(counts.max() / least) if least > 0 else float('inf')


def dead_experts(counts: torch.Tensor, threshold: float = 0.0) -> List[int]:
    """Experts whose share of the assignments is at or below ``threshold`` (0.0: never used)."""
    _check_threshold('threshold', threshold)
    counts = _check_counts(counts)
    share = counts / counts.sum()
    return [int(i) for i in torch.nonzero(share <= threshold).flatten()]


def json_number(value: float) -> Optional[float]:
    """``value``, or None for inf / nan: how the JSON files store a non-finite statistic (an infinite
    :func:`imbalance`)."""
    return value if math.isfinite(value) else None
