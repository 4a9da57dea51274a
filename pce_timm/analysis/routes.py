"""Routes through the network: which experts a patch position takes layer after layer, and image clusters.

A *route* is, for one image and one patch position, the tuple of top-1 experts that position takes through
the PCE layers, in layer order. Layers may cut their maps into different grids (a stride-2 stage halves
them), so every layer's grid is first mapped onto one *reference grid* -- by default the finest one (most
patches; the first such layer on ties) -- by nearest position: reference cell (i, j), whose centre sits at
((i + 0.5) / NH, (j + 0.5) / NW) of the map, reads the layer cell containing that point,
``(floor((i + 0.5) * nh / NH), floor((j + 0.5) * nw / NW))``. Mapping onto the finest grid repeats coarse
cells and loses nothing; a coarser reference samples the finer layers.

Shape legend: b images, n reference patches, l layers, e experts, f features.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from .stats import LayerRouting, order_by_probability, top1_experts

__all__ = [
    'cluster_images_by_route', 'cluster_purity', 'clustering_scores', 'finest_grid', 'grid_index_map',
    'route_counts', 'route_features', 'routes_from_layers',
]

FEATURE_KINDS = ('onehot', 'histogram')
CLUSTER_METHODS = ('kmeans', 'agglomerative')

Layers = Union[Mapping[str, LayerRouting], Sequence[LayerRouting]]


def _grid(grid_size: Sequence[int], name: str = 'grid_size') -> Tuple[int, int]:
    if len(grid_size) != 2 or any(int(s) < 1 for s in grid_size):
        raise ValueError(f'{name} must be (nh, nw) with both >= 1, got {tuple(grid_size)}')
    return int(grid_size[0]), int(grid_size[1])


def grid_index_map(src_grid: Tuple[int, int], dst_grid: Tuple[int, int]) -> torch.Tensor:
    """For every cell of ``dst_grid`` (row-major), the row-major index of the nearest ``src_grid`` cell: [n_dst].

    Nearest by cell centre, as described in the module docstring; identity when the grids are equal.
    """
    (sh, sw), (dh, dw) = _grid(src_grid, 'src_grid'), _grid(dst_grid, 'dst_grid')
    rows = ((torch.arange(dh, dtype=torch.float64) + 0.5) * sh / dh).floor().long().clamp(max=sh - 1)
    cols = ((torch.arange(dw, dtype=torch.float64) + 0.5) * sw / dw).floor().long().clamp(max=sw - 1)
    return (rows.unsqueeze(1) * sw + cols.unsqueeze(0)).reshape(-1)


def finest_grid(grid_sizes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The grid with the most patches; the first one on ties."""
    if len(grid_sizes) == 0:
        raise ValueError('grid_sizes must hold at least one (nh, nw), got an empty sequence')
    grids = [_grid(g) for g in grid_sizes]
    return max(grids, key=lambda g: g[0] * g[1])  # max() keeps the first of equal keys


def _layer_list(layers: Layers) -> List[LayerRouting]:
    layer_list = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
    if not layer_list:
        raise ValueError('layers must hold at least one layer, got none')
    return layer_list


def routes_from_layers(layers: Layers, reference_grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Every image's route at every reference-grid position: int64 [b, n, l].

    Args:
        layers: per layer (in network order), a dict with ``expert_indices`` [b, n_l, k] and ``grid_size``;
            when it also has ``router_probs`` the choices are first put in probability order.
        reference_grid: (nh, nw) to map every layer onto; default :func:`finest_grid` of the layers.
    """
    layer_list = _layer_list(layers)
    grids = [_grid(layer['grid_size']) for layer in layer_list]
    reference_grid = finest_grid(grids) if reference_grid is None else _grid(reference_grid, 'reference_grid')
    columns = []
    for layer, grid in zip(layer_list, grids, strict=True):
        expert_indices = layer['expert_indices'].detach().long().cpu()
        if expert_indices.dim() != 3 or expert_indices.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f'expert_indices must be [b, {grid[0] * grid[1]}, k] for grid_size {grid}, '
                f'got {tuple(expert_indices.shape)}')
        if layer.get('router_probs') is not None:
            expert_indices = order_by_probability(layer['router_probs'].detach().float().cpu(), expert_indices)
        columns.append(top1_experts(expert_indices)[:, grid_index_map(grid, reference_grid)])
    if len({c.shape[0] for c in columns}) != 1:
        raise ValueError(f'every layer must hold the same images, got batch sizes {[c.shape[0] for c in columns]}')
    return torch.stack(columns, dim=-1)


def route_counts(routes: torch.Tensor, top_n: Optional[int] = 10) -> List[Dict[str, Any]]:
    """The most frequent routes over all images and positions, most frequent first.

    Args:
        routes: [b, n, l] (or [m, l]) top-1 experts per layer.
        top_n: how many routes to return; None for all.

    Returns:
        ``[{'route': [e_1, ..., e_l], 'count': int, 'share': float}, ...]``, share of all (image, position)
        pairs; equal counts are ordered by route.
    """
    if routes.dim() < 2 or routes.numel() == 0:
        raise ValueError(f'routes must be a non-empty [..., l] tensor, got shape {tuple(routes.shape)}')
    if top_n is not None and top_n < 1:
        raise ValueError(f'top_n must be None or >= 1, got {top_n!r}')
    flat = routes.detach().long().cpu().reshape(-1, routes.shape[-1])
    unique, counts = torch.unique(flat, dim=0, return_counts=True)  # unique rows come sorted by route
    order = counts.sort(descending=True, stable=True).indices[:top_n]
    total = flat.shape[0]
    return [
        {'route': unique[i].tolist(), 'count': int(counts[i]), 'share': int(counts[i]) / total}
        for i in order.tolist()
    ]


def route_features(routes: torch.Tensor, num_experts: int, kind: str = 'onehot') -> np.ndarray:
    """Per-image features of the routes [b, n, l] for clustering: float32 [b, f].

    - ``'onehot'``: f = n * l * e, a one-hot expert per (position, layer). Squared Euclidean distance is
      twice the number of (position, layer) pairs where two images take different experts: *where* each
      expert is used matters.
    - ``'histogram'``: f = l * e, per layer the share of the image's reference cells that chose each expert
      (area-weighted; rows of one layer sum to 1): only *how much* each expert is used matters.

    ``num_experts`` is the largest e over the layers (unused columns are harmless).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f'kind must be one of {FEATURE_KINDS}, got {kind!r}')
    if routes.dim() != 3:
        raise ValueError(f'routes must be [b, n, l], got shape {tuple(routes.shape)}')
    if routes.numel() and int(routes.max()) >= num_experts:
        raise ValueError(f'routes hold expert {int(routes.max())}, beyond num_experts={num_experts}')
    one_hot = torch.nn.functional.one_hot(routes.detach().long().cpu(), num_experts).float()  # [b, n, l, e]
    if kind == 'histogram':
        return one_hot.mean(dim=1).reshape(routes.shape[0], -1).numpy()
    return one_hot.reshape(routes.shape[0], -1).numpy()


def cluster_images_by_route(
        route_features: np.ndarray,
        num_clusters: int,
        method: str = 'kmeans',
        seed: int = 0,
) -> np.ndarray:
    """Cluster images by their route features [b, f] (see :func:`route_features`): cluster ids int [b].

    ``'kmeans'`` is scikit-learn's KMeans (10 restarts, ``seed``); ``'agglomerative'`` is Ward linkage, which
    is deterministic and ignores ``seed``.
    """
    if method not in CLUSTER_METHODS:
        raise ValueError(f'method must be one of {CLUSTER_METHODS}, got {method!r}')
    features = np.asarray(route_features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f'route_features must be [b, f], got shape {features.shape}')
    if not 1 <= num_clusters <= features.shape[0]:
        raise ValueError(f'num_clusters must be in [1, {features.shape[0]}] (the number of images), got {num_clusters}')
    if method == 'kmeans':
        model = KMeans(n_clusters=num_clusters, n_init=10, random_state=seed)
    else:
        model = AgglomerativeClustering(n_clusters=num_clusters, linkage='ward')
    return model.fit_predict(features)


def _as_labels(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if array.size == 0:
        raise ValueError(f'{name} must be non-empty')
    return array


def cluster_purity(cluster_ids: Any, labels: Any) -> float:
    """Purity: the share of images whose class is the majority class of their cluster, in (0, 1]."""
    cluster_ids, labels = _as_labels(cluster_ids, 'cluster_ids'), _as_labels(labels, 'labels')
    if cluster_ids.shape != labels.shape:
        raise ValueError(f'cluster_ids and labels must have one entry per image, got {cluster_ids.size} '
                         f'and {labels.size}')
    table = contingency_matrix(labels, cluster_ids)  # [classes, clusters]
    return float(table.max(axis=0).sum() / table.sum())


def clustering_scores(cluster_ids: Any, labels: Any) -> Dict[str, float]:
    """Agreement of a clustering with the class labels: purity, NMI and adjusted Rand index (scikit-learn)."""
    purity = cluster_purity(cluster_ids, labels)
    cluster_ids, labels = _as_labels(cluster_ids, 'cluster_ids'), _as_labels(labels, 'labels')
    return {
        'num_clusters': int(np.unique(cluster_ids).size),
        'purity': purity,
        'nmi': float(normalized_mutual_info_score(labels, cluster_ids)),
        'adjusted_rand': float(adjusted_rand_score(labels, cluster_ids)),
    }
