"""Routing analysis, interpretability and expert surgery for PCE models.

    stats = RoutingAccumulator(num_experts, grid_size, num_classes)   # streaming per-layer statistics
    report = analyze_model(model, loader, 'analysis', num_images=512, num_classes=10)   # stats.json + figures
    prune_experts(model, min_usage=0.02, usage=usage_from_stats('analysis/stats.json'))   # expert surgery

- :mod:`.stats`: usage, balance and entropy of routing; :class:`RoutingAccumulator` streams them.
- :mod:`.routes`: the experts a patch position takes through the layers, and images clustered by route.
- :mod:`.figures`: assignment maps, usage / position / class heat maps, history, expert galleries.
- :mod:`.report`: ``stats.json`` (schema version 1) and ``report.md``.
- :mod:`.analyze`: all of the above for a model and a data loader, in one pass.
- :mod:`.surgery`: remove rarely used experts or duplicate busy ones, recorded so saved models rebuild.
"""
from ..layers import pce_layers  # the one lookup of a model's PCE layers (README: pce_timm.analysis.pce_layers)
from .analyze import analyze_model
from .figures import (
    expert_colors,
    plot_assignment_map,
    plot_assignment_overview,
    plot_class_usage,
    plot_expert_gallery,
    plot_expert_usage,
    plot_position_usage,
    plot_routing_history,
    save_figure,
    top_patches_per_expert,
)
from .report import SCHEMA_VERSION, build_stats, read_stats, write_report, write_stats
from .routes import (
    cluster_images_by_route,
    cluster_purity,
    clustering_scores,
    finest_grid,
    grid_index_map,
    route_counts,
    route_features,
    routes_from_layers,
)
from .stats import (
    LayerRouting,
    RoutingAccumulator,
    dead_experts,
    imbalance,
    layer_summary,
    mean_router_entropy,
    order_by_probability,
    top1_experts,
    usage_by_class,
    usage_by_position,
    usage_counts,
    usage_entropy,
)
from .surgery import (
    collect_usage,
    evaluate_surgery,
    evaluate_top1,
    expert_counts,
    format_surgery_table,
    prune_experts,
    reinforce_experts,
    usage_from_stats,
)

__all__ = [
    # one-pass analysis
    'analyze_model', 'pce_layers',
    # statistics
    'LayerRouting', 'RoutingAccumulator', 'dead_experts', 'imbalance', 'layer_summary', 'mean_router_entropy',
    'order_by_probability', 'top1_experts', 'usage_by_class', 'usage_by_position', 'usage_counts', 'usage_entropy',
    # routes and clustering
    'cluster_images_by_route', 'cluster_purity', 'clustering_scores', 'finest_grid', 'grid_index_map',
    'route_counts', 'route_features', 'routes_from_layers',
    # figures
    'expert_colors', 'plot_assignment_map', 'plot_assignment_overview', 'plot_class_usage', 'plot_expert_gallery',
    'plot_expert_usage', 'plot_position_usage', 'plot_routing_history', 'save_figure', 'top_patches_per_expert',
    # report
    'SCHEMA_VERSION', 'build_stats', 'read_stats', 'write_report', 'write_stats',
    # expert surgery
    'collect_usage', 'evaluate_surgery', 'evaluate_top1', 'expert_counts', 'format_surgery_table',
    'prune_experts', 'reinforce_experts', 'usage_from_stats',
]
