"""Run a model over a dataset split and write the routing analysis: stats.json, figures and report.md.

One pass over ``num_images`` images collects, for every PCE layer: streaming usage statistics (overall, by
patch position, by class), each image's top-1 expert per patch (for routes), the router probabilities of
the first images (for assignment maps and expert galleries) and the mean activation of the patches each
expert took (specialisation). A training run's ``routing_history`` (``results.json``) adds a figure of the
same statistics over the epochs.

Output folder::

    stats.json      every number (schema in :mod:`.report`)
    report.md       tables + the figures below, linked relatively
    figures/        usage.png, assignments.png, history.png (with a history), and per layer
                    <layer>_position.png, <layer>_class.png, <layer>_gallery.png, <layer>_assignments.png
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.data import resolve_data_config

from ..layers import PCEConv2d, pce_layers
from ..progress import progress_bar
from .figures import (
    plot_assignment_overview,
    plot_class_usage,
    plot_expert_gallery,
    plot_expert_usage,
    plot_position_usage,
    plot_routing_history,
    save_figure,
    top_patches_per_expert,
)
from .report import build_stats, write_report
from .routes import (
    cluster_images_by_route,
    clustering_scores,
    finest_grid,
    route_counts,
    route_features,
    routes_from_layers,
)
from .stats import RoutingAccumulator

__all__ = ['analyze_model']


class _LayerRecorder:
    """Collects one layer's routing over batches (see the module docstring for what is kept)."""

    def __init__(self, layer: PCEConv2d, num_classes: int, keep_images: int):
        self.layer = layer
        self.num_classes = num_classes
        self.keep_images = keep_images
        self.accumulator: Optional[RoutingAccumulator] = None
        self.top1: List[torch.Tensor] = []
        self.kept_probs: List[torch.Tensor] = []
        self.kept_indices: List[torch.Tensor] = []
        self.activation_sum = torch.zeros(layer.num_experts, dtype=torch.float64)
        self.activation_sq = torch.zeros(layer.num_experts, dtype=torch.float64)
        self.activation_count = torch.zeros(layer.num_experts, dtype=torch.float64)
        self.handle = layer.register_forward_hook(self._on_forward)

    def _on_forward(self, module: PCEConv2d, inputs: Any, output: torch.Tensor) -> None:
        self._patch_activation = output.detach().float().abs().mean(1).cpu()  # [b, ho, wo]

    def update(self, labels: torch.Tensor, seen: int) -> None:
        routing = self.layer.routing_stats()
        probs, indices, grid = routing['router_probs'], routing['expert_indices'], routing['grid_size']
        if self.accumulator is None:
            self.accumulator = RoutingAccumulator(self.layer.num_experts, grid, self.num_classes)
        self.accumulator.update(probs, indices, labels)
        top1 = indices[..., 0].cpu()
        self.top1.append(top1)
        room = self.keep_images - seen
        if room > 0:
            self.kept_probs.append(probs[:room].cpu())
            self.kept_indices.append(indices[:room].cpu())
        self._add_activations(top1, grid)

    def _add_activations(self, top1: torch.Tensor, grid: Sequence[int]) -> None:
        activation = self._patch_activation
        b, ho, wo = activation.shape
        ph, pw = -(-ho // grid[0]), -(-wo // grid[1])
        padded = torch.nn.functional.pad(activation, (0, grid[1] * pw - wo, 0, grid[0] * ph - ho))
        per_patch = padded.view(b, grid[0], ph, grid[1], pw).mean((2, 4)).reshape(b, -1).double()
        one_hot = torch.nn.functional.one_hot(top1.reshape(-1), self.layer.num_experts).double()
        self.activation_sum += one_hot.t() @ per_patch.reshape(-1)
        self.activation_sq += one_hot.t() @ per_patch.reshape(-1).pow(2)
        self.activation_count += one_hot.sum(0)

    def specialisation(self) -> List[Dict[str, Optional[float]]]:
        count = self.activation_count.clamp(min=1)
        mean = self.activation_sum / count
        std = (self.activation_sq / count - mean.pow(2)).clamp(min=0).sqrt()
        return [{'patches': int(n), 'mean_activation': float(m) if n else None,
                 'std_activation': float(s) if n else None}
                for n, m, s in zip(self.activation_count.tolist(), mean.tolist(), std.tolist(), strict=True)]

    def routing(self) -> Dict[str, Any]:
        """All images' top-1 routing (for routes) as a LayerRouting-shaped dict."""
        top1 = torch.cat(self.top1)
        return {'expert_indices': top1.unsqueeze(-1), 'grid_size': self.accumulator.grid_size}


def _denormalize(images: torch.Tensor, data_config: Dict[str, Any]) -> torch.Tensor:
    mean = torch.tensor(data_config['mean']).view(1, -1, 1, 1)
    std = torch.tensor(data_config['std']).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


@torch.no_grad()
def analyze_model(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        output_dir: Union[str, Path],
        num_images: int,
        num_classes: int,
        class_names: Optional[Sequence[str]] = None,
        num_clusters: Optional[int] = None,
        sample_images: int = 6,
        gallery_images: int = 256,
        history: Optional[Sequence[Dict[str, Any]]] = None,
        meta: Optional[Dict[str, Any]] = None,
        progress: bool = True,
) -> Path:
    """Analyse the routing of ``model`` on up to ``num_images`` images of ``loader``; returns report.md's path.

    Args:
        model: any model with PCE layers; run in eval mode on the device of its parameters.
        loader: ``(images, labels)`` batches, normalised as the model expects (its ``pretrained_cfg``).
        output_dir: folder for stats.json, report.md and figures/ (created).
        num_images: images to route (fewer if the loader runs out).
        num_classes: classes of the labels, for the class x expert statistics.
        class_names: row labels of the class figures.
        num_clusters: images are clustered by route into this many clusters (at most the number of images);
            default ``num_classes``, or the number of images if smaller.
        sample_images: images drawn in the assignment maps.
        gallery_images: images searched for each expert's gallery patches.
        history: a training run's ``routing_history``, plotted over epochs.
        meta: free-form entries of stats.json's ``meta`` (model, dataset, ...).
        progress: show a progress bar.
    """
    layers = pce_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no PCE layers to analyse (looked for PCEConv2d modules)')
    for name, value in (('num_images', num_images), ('num_classes', num_classes), ('sample_images', sample_images),
                        ('gallery_images', gallery_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    output_dir = Path(output_dir)
    keep = max(sample_images, gallery_images)
    recorders = {name: _LayerRecorder(layer, num_classes, keep) for name, layer in layers.items()}
    was_training, tracking = model.training, {name: layer.track_routing for name, layer in layers.items()}
    labels_seen, kept_images, seen = [], [], 0
    device = next(model.parameters()).device
    model.eval()
    try:
        for layer in layers.values():
            layer.track_routing = True  # the recorders read each forward's routing from the layers
        with progress_bar(total=num_images, desc='routing', unit='img', disable=not progress) as bar:
            for images, labels in loader:
                images, labels = images[:num_images - seen], labels[:num_images - seen]
                model(images.to(device))
                for recorder in recorders.values():
                    recorder.update(labels, seen)
                if seen < keep:
                    kept_images.append(images[:keep - seen].cpu())
                labels_seen.append(labels.cpu())
                seen += len(labels)
                bar.update(len(labels))
                if seen >= num_images:
                    break
    finally:
        model.train(was_training)
        for name, recorder in recorders.items():
            recorder.handle.remove()
            layers[name].track_routing = tracking[name]
    if seen == 0:
        raise ValueError('the loader gave no images to analyse')
    labels_all = torch.cat(labels_seen)
    display = _denormalize(torch.cat(kept_images), resolve_data_config(model=model))
    return _write_outputs(
        recorders, display, labels_all, output_dir, output_dir / 'figures', class_names,
        num_clusters or min(num_classes, seen), sample_images, history, {**(meta or {}), 'num_images': seen})


def _write_outputs(recorders, display, labels, output_dir, figure_dir, class_names, num_clusters, sample_images,
                   history, meta) -> Path:
    figures, summaries = {}, {}
    for name, recorder in recorders.items():
        summary = recorder.accumulator.summary()
        summary['specialisation'] = recorder.specialisation()
        summaries[name] = summary
        figures[f'{name}: usage by position'] = save_figure(
            plot_position_usage(recorder.accumulator.position_usage(), title=f'{name}: where each expert works'),
            figure_dir / f'{name}_position.png')
        figures[f'{name}: usage by class'] = save_figure(
            plot_class_usage(recorder.accumulator.class_usage(), class_names, title=f'{name}: classes per expert'),
            figure_dir / f'{name}_class.png')
        probs = torch.cat(recorder.kept_probs)
        patches, scores = top_patches_per_expert(display[:len(probs)], probs, recorder.accumulator.grid_size)
        figures[f'{name}: expert gallery'] = save_figure(
            plot_expert_gallery(patches, scores, title=f'{name}: patches that most strongly choose each expert'),
            figure_dir / f'{name}_gallery.png')
    usage = {name: summary['usage_counts'] for name, summary in summaries.items()}
    figures['expert usage'] = save_figure(plot_expert_usage(usage), figure_dir / 'usage.png')
    sample = {name: {'router_probs': torch.cat(r.kept_probs)[:sample_images],
                     'expert_indices': torch.cat(r.kept_indices)[:sample_images],
                     'grid_size': r.accumulator.grid_size} for name, r in recorders.items()}
    row_labels = [class_names[int(label)] if class_names else str(int(label)) for label in labels[:sample_images]]
    figures['assignment maps'] = save_figure(
        plot_assignment_overview(display[:sample_images], sample, max_images=sample_images, row_labels=row_labels),
        figure_dir / 'assignments.png')
    for name in recorders:  # one picture per layer too
        figures[f'{name}: assignment maps'] = save_figure(
            plot_assignment_overview(display[:sample_images], {name: sample[name]}, max_images=sample_images,
                                     row_labels=row_labels), figure_dir / f'{name}_assignments.png')
    if history:
        figures['routing over training'] = save_figure(plot_routing_history(history), figure_dir / 'history.png')

    routes = routes_from_layers({name: r.routing() for name, r in recorders.items()})
    num_experts = max(r.layer.num_experts for r in recorders.values())
    cluster_ids = cluster_images_by_route(route_features(routes, num_experts, kind='histogram'), num_clusters)
    stats = build_stats(
        summaries,
        routes={'layers': list(recorders), 'reference_grid': list(finest_grid([r.accumulator.grid_size
                                                                                for r in recorders.values()])),
                'top_routes': route_counts(routes, top_n=10)},
        clustering={'method': 'kmeans', 'features': 'histogram', 'num_clusters': num_clusters,
                    **clustering_scores(cluster_ids, labels.numpy())},
        meta=meta)
    return write_report(output_dir, stats, figures)
