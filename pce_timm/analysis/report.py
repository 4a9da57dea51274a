"""Routing report: ``stats.json`` (a stable schema) and ``report.md`` (tables of the numbers + figures).

``stats.json`` schema, version 1 (:data:`SCHEMA_VERSION`)::

    {
      "schema_version": 1,
      "meta": {str: JSON value},           # free-form: model, checkpoint, dataset, split, ...
      "layers": {                          # one entry per PCE layer, in network order
        "<layer name>": {                  # pce_timm.analysis.stats.layer_summary / RoutingAccumulator.summary
          "num_experts": int, "top_k": int, "grid_size": [nh, nw] | null,
          "num_images": int, "num_patches": int,
          "usage_counts": [int] * e,       # top-1 choices per expert
          "usage_share": [float] * e,      # usage_counts / (num_images * num_patches)
          "usage_counts_all": [int] * e,   # all k choices per expert
          "usage_entropy": float,          # in [0, 1], 1 = balanced
          "imbalance": float | null,       # busiest / least used; null = infinite (an expert never chosen)
          "mean_router_entropy": float,    # nats
          "normalized_router_entropy": float,
          "mean_top_probability": float,
          "dead_experts": [int], "dead_threshold": float
        }
      },
      "routes": {                          # optional (pce_timm.analysis.routes)
        "reference_grid": [nh, nw], "layers": [str],
        "top_routes": [{"route": [int] * l, "count": int, "share": float}]
      },
      "clustering": {                      # optional
        "method": str, "features": str, "num_clusters": int, "purity": float, "nmi": float,
        "adjusted_rand": float
      }
    }

Non-finite floats are written as ``null`` (strict JSON); :func:`read_stats` turns a null ``imbalance`` back into
``inf``. Tensors and numpy values become plain lists and numbers.
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from ..utils import markdown_table

__all__ = ['SCHEMA_VERSION', 'build_stats', 'read_stats', 'write_report', 'write_stats']

SCHEMA_VERSION = 1
PathLike = Union[str, Path]

_LAYER_COLUMNS = (
    ('num_experts', 'experts'), ('top_k', 'top-k'), ('grid_size', 'grid'), ('num_images', 'images'),
    ('usage_entropy', 'usage entropy'), ('imbalance', 'imbalance'), ('mean_router_entropy', 'router entropy (nats)'),
    ('normalized_router_entropy', 'router entropy / log e'), ('mean_top_probability', 'mean top prob.'),
    ('dead_experts', 'dead experts'),
)
_CLUSTER_COLUMNS = (
    ('method', 'method'), ('features', 'features'), ('num_clusters', 'clusters'), ('purity', 'purity'),
    ('nmi', 'NMI'), ('adjusted_rand', 'adjusted Rand'),
)
_GLOSSARY = """\
- *usage entropy*: entropy of the top-1 usage shares / log e; 1 = every expert equally used, 0 = one expert.
- *imbalance*: busiest expert's top-1 count / least used one's; 1 = balanced, inf = an expert never chosen.
- *router entropy*: mean entropy of a patch's router distribution; 0 = certain, log e = uniform.
- *dead experts*: experts whose top-1 share is at or below the dead threshold.
- *route*: the top-1 experts one patch position takes through the layers, on the finest grid.
"""


def build_stats(
        layers: Mapping[str, Mapping[str, Any]],
        routes: Optional[Mapping[str, Any]] = None,
        clustering: Optional[Mapping[str, Any]] = None,
        meta: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Assemble the ``stats.json`` dict (schema above) from per-layer summaries and optional extras."""
    if not layers:
        raise ValueError('layers must hold at least one layer summary, got none')
    stats: Dict[str, Any] = {'schema_version': SCHEMA_VERSION, 'meta': dict(meta or {}), 'layers': dict(layers)}
    if routes is not None:
        stats['routes'] = dict(routes)
    if clustering is not None:
        stats['clustering'] = dict(clustering)
    return stats


def _plain(value: Any, strict: bool = True) -> Any:
    """Plain copy: tensors / arrays -> lists, numpy scalars -> Python; with ``strict`` non-finite floats -> None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _plain(value.tolist(), strict)
    if isinstance(value, np.generic):
        return _plain(value.item(), strict)
    if isinstance(value, float):
        return value if math.isfinite(value) or not strict else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v, strict) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, strict) for v in value]
    return value


def write_stats(path: PathLike, stats: Mapping[str, Any]) -> Path:
    """Write ``stats`` (see the module schema; ``schema_version`` is filled in) as strict JSON: the path."""
    if 'layers' not in stats or not isinstance(stats['layers'], Mapping):
        raise ValueError(f'stats must have a "layers" mapping (see build_stats), got keys {sorted(stats)}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {'schema_version': SCHEMA_VERSION, **_plain(stats)}
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + '\n')
    return path


def read_stats(path: PathLike) -> Dict[str, Any]:
    """Read a ``stats.json``; a null layer ``imbalance`` becomes ``float('inf')`` again."""
    stats = json.loads(Path(path).read_text())
    if stats.get('schema_version') != SCHEMA_VERSION:
        raise ValueError(f'{path}: schema_version must be {SCHEMA_VERSION}, got {stats.get("schema_version")!r}')
    for summary in stats['layers'].values():
        if 'imbalance' in summary and summary['imbalance'] is None:
            summary['imbalance'] = float('inf')
    return stats


def _cell(value: Any) -> str:
    if value is None:
        return '-'
    if isinstance(value, float):
        return 'inf' if math.isinf(value) else f'{value:.3f}'
    if isinstance(value, (list, tuple)):
        return ', '.join(str(v) for v in value) if value else '-'
    return str(value).replace('|', '\\|')


def _table(header: List[str], rows: List[List[Any]]) -> str:
    return markdown_table(header, [[_cell(v) for v in row] for row in rows]) + '\n'


def _layer_sections(layers: Mapping[str, Mapping[str, Any]]) -> List[str]:
    rows = []
    for name, s in layers.items():
        row = {**s, 'grid_size': 'x'.join(str(v) for v in s['grid_size']) if s.get('grid_size') else None}
        rows.append([name] + [row.get(key) for key, _ in _LAYER_COLUMNS])
    summary = _table(['layer'] + [label for _, label in _LAYER_COLUMNS], rows)
    num_experts = max(len(s.get('usage_share', [])) for s in layers.values())
    shares = _table(
        ['layer'] + [f'expert {e}' for e in range(num_experts)],
        [[name] + list(s.get('usage_share', [])) + [None] * (num_experts - len(s.get('usage_share', [])))
         for name, s in layers.items()])
    return ['## Layers\n', summary, '### Expert usage (share of top-1 assignments)\n', shares]


def _route_section(routes: Mapping[str, Any]) -> List[str]:
    grid = routes.get('reference_grid')
    intro = f"Routes through {', '.join(routes.get('layers', [])) or 'the layers'}"
    intro += f" on the {'x'.join(str(v) for v in grid)} reference grid.\n" if grid else '.\n'
    rows = [[rank + 1, ' -> '.join(str(e) for e in r['route']), r['count'], r['share']]
            for rank, r in enumerate(routes.get('top_routes', []))]
    return ['## Most frequent routes\n', intro, _table(['rank', 'route (expert per layer)', 'count', 'share'], rows)]


def _figure_section(output_dir: Path, figures: Mapping[str, PathLike]) -> List[str]:
    lines = ['## Figures\n']
    for name, path in figures.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f'figure {name!r} does not exist: {path}')
        relative = Path(os.path.relpath(Path(path).resolve(), output_dir.resolve())).as_posix()
        lines += [f'### {name}\n', f'![{name}]({relative})\n']
    return lines


def write_report(
        output_dir: PathLike,
        stats: Mapping[str, Any],
        figures: Optional[Mapping[str, PathLike]] = None,
        title: str = 'PCE routing report',
) -> Path:
    """Write ``stats.json`` and ``report.md`` (tables + embedded figures) into ``output_dir``: the report path.

    Args:
        output_dir: folder to write into (created).
        stats: the dict of :func:`build_stats` (schema in the module docstring).
        figures: caption -> image file (e.g. from :func:`~pce_timm.analysis.figures.save_figure`); linked
            relative to ``output_dir``, so keep them inside it for a portable report. Must exist.
        title: the report's heading.
    """
    output_dir = Path(output_dir)
    figure_lines = _figure_section(output_dir, figures or {})  # raises before anything is written
    write_stats(output_dir / 'stats.json', stats)
    plain = _plain(stats, strict=False)
    lines = [f'# {title}\n', 'Numbers: [stats.json](stats.json).\n']
    if plain.get('meta'):
        lines.append(_table(['key', 'value'], [[k, v] for k, v in plain['meta'].items()]))
    lines += _layer_sections(plain['layers'])
    if plain.get('routes'):
        lines += _route_section(plain['routes'])
    if plain.get('clustering'):
        clustering = plain['clustering']
        lines += ['## Images clustered by route\n',
                  _table([label for _, label in _CLUSTER_COLUMNS], [[clustering.get(k) for k, _ in _CLUSTER_COLUMNS]])]
    lines += figure_lines + ['## Glossary\n', _GLOSSARY]
    path = output_dir / 'report.md'
    path.write_text('\n'.join(lines))
    return path
