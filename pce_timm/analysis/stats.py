"""Routing statistics: pure functions of routing tensors, and a streaming accumulator.

What a PCE layer exposes after a forward (the data contract these functions work from):

- ``router_probs`` [b, n, e]: softmax over the experts for every patch (patches in row-major grid order);
- ``expert_indices`` [b, n, k]: the chosen experts, most probable first (``k == e`` for soft routing);
- ``grid_size`` (nh, nw): the patch grid, ``n == nh * nw``.

Shape legend: b images, n patches (= nh * nw), e experts, k top-k, c classes.

"Usage" counts top-1 choices (``expert_indices[..., 0]``) unless ``all_choices=True``: the top-1 choice is
the expert that dominates a patch, and it is defined for soft and sparse routing alike. Functions given only
``expert_indices`` trust the "most probable first" order; those also given ``router_probs`` restore it with
:func:`order_by_probability`, so soft routing that lists experts in index order is still analysed correctly.
"""
from typing import Any, Dict, Optional, Sequence, Tuple, TypedDict

import torch

from ..layers.routing_stats import (  # noqa: F401  (re-exported: the analysis API)
    _check_counts,
    _check_experts,
    _check_indices,
    _check_threshold,
    dead_experts,
    imbalance,
    mean_router_entropy,
    normalize_entropy,
    order_by_probability,
    router_entropy,
    top1_experts,
    usage_counts,
    usage_entropy,
)

__all__ = [
    'LayerRouting', 'RoutingAccumulator', 'dead_experts', 'imbalance', 'layer_summary', 'mean_router_entropy',
    'order_by_probability', 'top1_experts', 'usage_by_class', 'usage_by_position', 'usage_counts', 'usage_entropy',
]


class LayerRouting(TypedDict):
    """One layer's routing after a forward, as exposed by a PCE layer."""
    router_probs: torch.Tensor  # [b, n, e]
    expert_indices: torch.Tensor  # [b, n, k]
    grid_size: Tuple[int, int]  # (nh, nw)


def _check_grid(grid_size: Sequence[int], num_patches: int) -> Tuple[int, int]:
    nh, nw = (int(s) for s in grid_size)
    if nh < 1 or nw < 1 or nh * nw != num_patches:
        raise ValueError(f'grid_size must be (nh, nw) with nh * nw == {num_patches} patches, got {tuple(grid_size)}')
    return nh, nw


def _position_counts(top1: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-1 choices [b, n] -> int64 counts [e, n]: how many images chose expert e at patch position n."""
    num_patches = top1.shape[1]
    flat = top1.long().cpu() * num_patches + torch.arange(num_patches)  # expert-major index e * n + position
    return torch.bincount(flat.reshape(-1), minlength=num_experts * num_patches).view(num_experts, num_patches)


def usage_by_position(
        expert_indices: torch.Tensor,
        grid_size: Tuple[int, int],
        num_experts: int,
) -> torch.Tensor:
    """Fraction of images whose patch at each grid position chose each expert (top-1): float [e, nh, nw].

    Summed over experts, every position gives 1.
    """
    _check_experts(num_experts)
    _check_indices(expert_indices, num_experts)
    nh, nw = _check_grid(grid_size, expert_indices.shape[1])
    if expert_indices.shape[0] == 0:
        raise ValueError('expert_indices holds no images (b == 0)')
    counts = _position_counts(top1_experts(expert_indices), num_experts)
    return (counts.double() / expert_indices.shape[0]).float().view(num_experts, nh, nw)


def _check_labels(labels: torch.Tensor, num_images: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().cpu().flatten()
    if labels.numel() != num_images:
        raise ValueError(f'labels must hold one class per image ({num_images}), got {labels.numel()}')
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]')
    return labels


def _class_counts(top1: torch.Tensor, labels: torch.Tensor, num_experts: int, num_classes: int) -> torch.Tensor:
    """Top-1 choices [b, n] and labels [b] -> int64 counts [c, e] of patches of class c routed to expert e."""
    flat = labels.unsqueeze(1) * num_experts + top1.long().cpu()
    return torch.bincount(flat.reshape(-1), minlength=num_classes * num_experts).view(num_classes, num_experts)


def _row_fractions(counts: torch.Tensor) -> torch.Tensor:
    totals = counts.sum(dim=-1, keepdim=True).double()
    return (counts.double() / totals.clamp(min=1)).float()


def usage_by_class(
        expert_indices: torch.Tensor,
        labels: torch.Tensor,
        num_experts: int,
        num_classes: int,
) -> torch.Tensor:
    """Share of each class's patches routed to each expert (top-1): float [c, e].

    Rows sum to 1; a class with no images in ``labels`` gets a row of zeros.

    Args:
        expert_indices: chosen experts [b, n, k], most probable first.
        labels: class of every image [b], in [0, num_classes).
        num_experts: e.
        num_classes: c.
    """
    _check_experts(num_experts)
    _check_indices(expert_indices, num_experts)
    labels = _check_labels(labels, expert_indices.shape[0], num_classes)
    return _row_fractions(_class_counts(top1_experts(expert_indices), labels, num_experts, num_classes))


def _summary(
        counts: torch.Tensor,
        counts_all: torch.Tensor,
        entropy_sum: float,
        top_prob_sum: float,
        num_images: int,
        num_patches: int,
        top_k: int,
        grid_size: Optional[Tuple[int, int]],
        dead_threshold: float,
) -> Dict[str, Any]:
    """The scalar summary shared by :func:`layer_summary` and :class:`RoutingAccumulator`."""
    num_experts = counts.numel()
    num_tokens = num_images * num_patches
    mean_entropy = entropy_sum / num_tokens
    return {
        'num_experts': num_experts,
        'top_k': top_k,
        'grid_size': [int(s) for s in grid_size] if grid_size is not None else None,
        'num_images': num_images,
        'num_patches': num_patches,
        'usage_counts': [int(c) for c in counts],
        'usage_share': [float(c) / num_tokens for c in counts],
        'usage_counts_all': [int(c) for c in counts_all],
        'usage_entropy': usage_entropy(counts),
        'imbalance': imbalance(counts),
        'mean_router_entropy': mean_entropy,
        'normalized_router_entropy': normalize_entropy(mean_entropy, num_experts),
        'mean_top_probability': top_prob_sum / num_tokens,
        'dead_experts': dead_experts(counts, dead_threshold),
        'dead_threshold': float(dead_threshold),
    }


def _check_routing(router_probs: torch.Tensor, expert_indices: torch.Tensor) -> None:
    if router_probs.dim() != 3 or router_probs.shape[:2] != expert_indices.shape[:2]:
        raise ValueError(
            f'router_probs must be [b, n, e] matching expert_indices [b, n, k], got '
            f'{tuple(router_probs.shape)} and {tuple(expert_indices.shape)}')
    if router_probs.shape[0] * router_probs.shape[1] == 0:
        raise ValueError(f'routing holds no patches: router_probs has shape {tuple(router_probs.shape)}')
    _check_indices(expert_indices, router_probs.shape[-1])


def _top_probability(router_probs: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
    """Probability of each patch's top-1 choice: [b, n]."""
    return router_probs.gather(-1, expert_indices[..., :1]).squeeze(-1)


def layer_summary(
        router_probs: torch.Tensor,
        expert_indices: torch.Tensor,
        grid_size: Optional[Tuple[int, int]] = None,
        dead_threshold: float = 0.0,
) -> Dict[str, Any]:
    """Every scalar statistic of one layer's routing, as a JSON-serialisable dict.

    Keys: ``num_experts``, ``top_k``, ``grid_size`` ([nh, nw] or None), ``num_images``, ``num_patches`` (per
    image), ``usage_counts`` / ``usage_share`` (top-1, per expert), ``usage_counts_all`` (all k choices),
    ``usage_entropy``, ``imbalance`` (may be ``inf``), ``mean_router_entropy`` (nats),
    ``normalized_router_entropy``, ``mean_top_probability``, ``dead_experts`` and ``dead_threshold``.

    Args:
        router_probs: router softmax [b, n, e].
        expert_indices: chosen experts [b, n, k]; reordered by probability first (:func:`order_by_probability`).
        grid_size: (nh, nw), checked against n and recorded when given.
        dead_threshold: usage share at or below which an expert counts as dead.
    """
    _check_routing(router_probs, expert_indices)
    _check_threshold('dead_threshold', dead_threshold)
    if grid_size is not None:
        _check_grid(grid_size, router_probs.shape[1])
    num_images, num_patches, num_experts = router_probs.shape
    router_probs = router_probs.detach().float().cpu()
    expert_indices = order_by_probability(router_probs, expert_indices.detach().long().cpu())
    return _summary(
        counts=usage_counts(expert_indices, num_experts),
        counts_all=usage_counts(expert_indices, num_experts, all_choices=True),
        entropy_sum=mean_router_entropy(router_probs) * num_images * num_patches,
        top_prob_sum=float(_top_probability(router_probs, expert_indices).double().sum()),
        num_images=num_images,
        num_patches=num_patches,
        top_k=expert_indices.shape[-1],
        grid_size=grid_size,
        dead_threshold=dead_threshold,
    )


class RoutingAccumulator:
    """Streams one layer's routing statistics over many batches, keeping only counts and sums.

    Memory is O(e * n + c * e) whatever the number of images. After any number of :meth:`update` calls,
    :meth:`summary`, :meth:`position_usage` and :meth:`class_usage` equal :func:`layer_summary`,
    :func:`usage_by_position` and :func:`usage_by_class` on all the batches concatenated.

    Example::

        acc = RoutingAccumulator(num_experts=4, grid_size=(4, 4), num_classes=10)
        for images, labels in loader:
            model(images)
            routing = layer.routing_stats()
            acc.update(routing['router_probs'], routing['expert_indices'], labels)
        stats = acc.summary()
    """

    def __init__(
            self,
            num_experts: int,
            grid_size: Tuple[int, int],
            num_classes: Optional[int] = None,
            dead_threshold: float = 0.0,
    ):
        _check_experts(num_experts)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f'num_classes must be None or an int >= 1, got {num_classes!r}')
        nh, nw = (int(s) for s in grid_size)
        if nh < 1 or nw < 1:
            raise ValueError(f'grid_size must be (nh, nw) with both >= 1, got {tuple(grid_size)}')
        _check_threshold('dead_threshold', dead_threshold)
        self.num_experts = num_experts
        self.grid_size = (nh, nw)
        self.num_patches = nh * nw
        self.num_classes = num_classes
        self.dead_threshold = dead_threshold
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.counts = torch.zeros(self.num_experts, dtype=torch.long)
        self.counts_all = torch.zeros(self.num_experts, dtype=torch.long)
        self.position_counts = torch.zeros(self.num_experts, self.num_patches, dtype=torch.long)
        self.class_counts = None
        if self.num_classes is not None:
            self.class_counts = torch.zeros(self.num_classes, self.num_experts, dtype=torch.long)
        self.entropy_sum = 0.0
        self.top_prob_sum = 0.0
        self.num_images = 0
        self.top_k: Optional[int] = None

    def update(
            self,
            router_probs: torch.Tensor,
            expert_indices: torch.Tensor,
            labels: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch: router_probs [b, n, e], expert_indices [b, n, k], labels [b] (if num_classes)."""
        _check_routing(router_probs, expert_indices)
        b, n, e = router_probs.shape
        if (n, e) != (self.num_patches, self.num_experts):
            raise ValueError(
                f'router_probs must be [b, {self.num_patches}, {self.num_experts}] for this accumulator, '
                f'got {tuple(router_probs.shape)}')
        if self.top_k is not None and expert_indices.shape[-1] != self.top_k:
            raise ValueError(
                f'expert_indices must keep top_k={self.top_k} across batches, got {expert_indices.shape[-1]}')
        if (labels is None) != (self.class_counts is None):
            raise ValueError(f'labels must be given exactly when num_classes is set (num_classes={self.num_classes})')
        router_probs = router_probs.detach().float().cpu()
        expert_indices = order_by_probability(router_probs, expert_indices.detach().long().cpu())
        top1 = top1_experts(expert_indices)
        self.counts += usage_counts(expert_indices, e)
        self.counts_all += usage_counts(expert_indices, e, all_choices=True)
        self.position_counts += _position_counts(top1, e)
        if self.class_counts is not None:
            self.class_counts += _class_counts(top1, _check_labels(labels, b, self.num_classes), e, self.num_classes)
        self.entropy_sum += float(router_entropy(router_probs.double()).sum())
        self.top_prob_sum += float(_top_probability(router_probs, expert_indices).double().sum())
        self.num_images += b
        self.top_k = expert_indices.shape[-1]

    def _check_seen(self) -> None:
        if self.num_images == 0:
            raise RuntimeError('RoutingAccumulator has seen no images: call update() first')

    def summary(self) -> Dict[str, Any]:
        """The same JSON-serialisable dict as :func:`layer_summary` on everything seen so far."""
        self._check_seen()
        return _summary(
            counts=self.counts,
            counts_all=self.counts_all,
            entropy_sum=self.entropy_sum,
            top_prob_sum=self.top_prob_sum,
            num_images=self.num_images,
            num_patches=self.num_patches,
            top_k=self.top_k,
            grid_size=self.grid_size,
            dead_threshold=self.dead_threshold,
        )

    def position_usage(self) -> torch.Tensor:
        """Fraction of images choosing each expert at each position: float [e, nh, nw]."""
        self._check_seen()
        return (self.position_counts.double() / self.num_images).float().view(self.num_experts, *self.grid_size)

    def class_usage(self) -> torch.Tensor:
        """Share of each class's patches routed to each expert: float [c, e] (zero rows for unseen classes)."""
        self._check_seen()
        if self.class_counts is None:
            raise RuntimeError('class_usage needs labels: create the accumulator with num_classes')
        return _row_fractions(self.class_counts)
