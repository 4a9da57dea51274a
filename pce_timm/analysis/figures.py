"""Figures of routing: assignment maps, usage, position and class heat maps, history, expert galleries.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing here
touches the global backend or leaks figures; :func:`save_figure` renders it with Agg. Experts always get the
same colour (:func:`expert_colors`: tab10 up to 10 experts, tab20 up to 20, turbo beyond), in every figure.

Shape legend: b images, c channels, h/w pixels, n patches (= nh * nw), e experts, k top-k.
"""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import blended_transform_factory

from .stats import LayerRouting, order_by_probability

__all__ = [
    'expert_colors', 'plot_assignment_map', 'plot_assignment_overview', 'plot_class_usage', 'plot_expert_gallery',
    'plot_expert_usage', 'plot_position_usage', 'plot_routing_history', 'save_figure', 'top_patches_per_expert',
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]
HISTORY_METRICS = (
    ('usage_entropy', 'usage entropy (1 = balanced)'),
    ('imbalance', 'imbalance (busiest / least used; \u25b2 = inf)'),
    ('mean_router_entropy', 'mean router entropy (nats)'),
    ('dead_experts', 'dead experts'),
)
_TEXT_OUTLINE = [patheffects.withStroke(linewidth=2, foreground='black')]


def expert_colors(num_experts: int) -> np.ndarray:
    """One RGBA colour per expert, the same in every figure: float [e, 4]."""
    if num_experts < 1:
        raise ValueError(f'num_experts must be >= 1, got {num_experts!r}')
    if num_experts <= 20:
        cmap = matplotlib.colormaps['tab10' if num_experts <= 10 else 'tab20']
        return np.asarray([cmap(i) for i in range(num_experts)])
    return matplotlib.colormaps['turbo'](np.linspace(0.0, 1.0, num_experts))


def _expert_handles(num_experts: int) -> List[Patch]:
    return [Patch(color=color, label=f'expert {e}') for e, color in enumerate(expert_colors(num_experts))]


def _new_figure(figsize: Tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout='constrained')
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Union[str, Path], dpi: int = 120) -> Path:
    """Render ``fig`` with Agg to ``path`` (format from the suffix, e.g. .png), creating folders: the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _image_hwc(image: ArrayLike) -> np.ndarray:
    """An image [h, w], [c, h, w] (c = 1 or 3) or [h, w, c], values in [0, 1] -> [h, w] or [h, w, 3]."""
    array = _numpy(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f'image must be [h, w], [c, h, w] or [h, w, c] with c in (1, 3), got {array.shape}')
    if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
        raise ValueError(f'image values must be in [0, 1] (undo normalisation first), got '
                         f'[{array.min():.3g}, {array.max():.3g}]')
    return array.clip(0.0, 1.0)


def _gray(pixels: np.ndarray) -> np.ndarray:
    """Luminance (Rec. 601) of an [h, w, 3] image; [h, w] passes through."""
    return pixels @ np.array([0.299, 0.587, 0.114]) if pixels.ndim == 3 else pixels


def _draw_assignment(
        ax: Axes,
        image: ArrayLike,
        expert_indices: ArrayLike,
        confidence: ArrayLike,
        grid_size: Tuple[int, int],
        num_experts: int,
        max_alpha: float,
        annotate: Optional[bool],
) -> None:
    """Image (in gray, so the tint reads as an expert colour) with every patch tinted by its top-1 expert."""
    pixels = _gray(_image_hwc(image))
    h, w = pixels.shape[:2]
    nh, nw = grid_size
    experts = _numpy(expert_indices).astype(np.int64)
    experts = experts[:, 0] if experts.ndim == 2 else experts
    confidence = _numpy(confidence).reshape(-1)
    if experts.shape != (nh * nw,) or confidence.shape != (nh * nw,):
        raise ValueError(f'expert_indices [n(, k)] and confidence [n] need n = {nh * nw} for grid_size {grid_size}, '
                         f'got {experts.shape} and {confidence.shape}')
    if experts.min() < 0 or experts.max() >= num_experts:
        raise ValueError(f'expert_indices must lie in [0, {num_experts}), got [{experts.min()}, {experts.max()}]')
    overlay = expert_colors(num_experts)[experts].reshape(nh, nw, 4)
    overlay[..., 3] = max_alpha * confidence.clip(0.0, 1.0).reshape(nh, nw)
    ax.imshow(pixels, cmap='gray', vmin=0.0, vmax=1.0, extent=(0, w, h, 0), interpolation='nearest')
    ax.imshow(overlay, extent=(0, w, h, 0), interpolation='nearest')
    ax.hlines(np.linspace(0, h, nh + 1), 0, w, colors='white', linewidth=0.5, alpha=0.7)
    ax.vlines(np.linspace(0, w, nw + 1), 0, h, colors='white', linewidth=0.5, alpha=0.7)
    if annotate if annotate is not None else nh * nw <= 64:
        for idx, expert in enumerate(experts):
            row, col = divmod(idx, nw)
            ax.text((col + 0.5) * w / nw, (row + 0.5) * h / nh, str(expert), ha='center', va='center',
                    color='white', fontsize=8, path_effects=_TEXT_OUTLINE)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_assignment_map(
        image: ArrayLike,
        expert_indices: ArrayLike,
        confidence: ArrayLike,
        grid_size: Tuple[int, int],
        num_experts: int,
        title: Optional[str] = None,
        max_alpha: float = 0.6,
        annotate: Optional[bool] = None,
) -> Figure:
    """One image with the layer's patch grid coloured by the chosen expert.

    The image is drawn in gray so that a patch's colour is its expert's colour, never the image's.

    Args:
        image: [h, w] or [c, h, w] (c = 1 or 3), values in [0, 1]; the grid is spread evenly over it.
        expert_indices: chosen experts [n] (or [n, k]: the first choice is drawn), n = nh * nw row-major.
        confidence: the router's probability of that expert [n]; the tint's opacity is ``max_alpha * p``.
        grid_size: (nh, nw).
        num_experts: e, for the colours and legend.
        title: figure title.
        max_alpha: opacity of a fully confident patch.
        annotate: write the expert id in each patch; default when there are at most 64 patches.
    """
    fig = _new_figure((5.5, 4.5))
    ax = fig.subplots()
    _draw_assignment(ax, image, expert_indices, confidence, grid_size, num_experts, max_alpha, annotate)
    ax.set_title(title or f'expert assignment ({grid_size[0]}x{grid_size[1]} patches)')
    fig.legend(handles=_expert_handles(num_experts), loc='outside right upper', fontsize=8,
               title='expert\n(opacity =\nconfidence)', title_fontsize=8)
    return fig


def plot_assignment_overview(
        images: ArrayLike,
        layers: Mapping[str, LayerRouting],
        num_experts: Optional[int] = None,
        max_images: int = 4,
        row_labels: Optional[Sequence[str]] = None,
        max_alpha: float = 0.6,
) -> Figure:
    """Assignment maps of sample images (rows) through the PCE layers (columns).

    Args:
        images: [b, c, h, w] (or a sequence of images) in [0, 1]; the first ``max_images`` are drawn.
        layers: layer name -> dict with ``router_probs`` [b, n, e], ``expert_indices`` [b, n, k], ``grid_size``.
        num_experts: colours to use; default the largest e over the layers.
        max_images: rows to draw.
        row_labels: one label per drawn image (e.g. its class name); default ``image i``.
        max_alpha: opacity of a fully confident patch.
    """
    if not layers:
        raise ValueError('layers must hold at least one layer, got none')
    num_images = min(max_images, len(images))
    num_experts = num_experts or max(int(layer['router_probs'].shape[-1]) for layer in layers.values())
    fig = _new_figure((2.4 * len(layers) + 0.8, 2.3 * num_images + 0.8))
    axes = fig.subplots(num_images, len(layers), squeeze=False)
    for col, (name, layer) in enumerate(layers.items()):
        probs = layer['router_probs'].detach().float().cpu()
        indices = order_by_probability(probs, layer['expert_indices'].detach().long().cpu())
        confidence = probs.gather(-1, indices[..., :1]).squeeze(-1)
        nh, nw = layer['grid_size']
        for row in range(num_images):
            ax = axes[row, col]
            _draw_assignment(ax, images[row], indices[row], confidence[row], (nh, nw), num_experts, max_alpha,
                             annotate=nh * nw <= 16)
            if row == 0:
                ax.set_title(f'{name}\n{nh}x{nw} patches', fontsize=9)
            if col == 0:
                ax.set_ylabel(row_labels[row] if row_labels else f'image {row}')
    fig.suptitle('expert assignment per layer (opacity = router confidence)')
    fig.legend(handles=_expert_handles(num_experts), loc='outside lower center', ncols=min(num_experts, 8), fontsize=8)
    return fig


def _grid_shape(count: int, max_cols: int) -> Tuple[int, int]:
    cols = min(count, max_cols)
    return -(-count // cols), cols


def plot_expert_usage(usage: Mapping[str, ArrayLike], title: Optional[str] = None) -> Figure:
    """Share of top-1 assignments per expert, one bar chart per layer (small multiples).

    Args:
        usage: layer name -> usage counts (or shares) [e], e.g. ``layer_summary(...)['usage_counts']``.
        title: figure title.
    """
    if not usage:
        raise ValueError('usage must hold at least one layer, got none')
    rows, cols = _grid_shape(len(usage), 4)
    fig = _new_figure((3.2 * cols, 2.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, (name, counts) in zip(axes, usage.items(), strict=False):
        counts = _numpy(counts).reshape(-1)
        share = counts / max(counts.sum(), 1e-12)
        num_experts = share.size
        ax.bar(np.arange(num_experts), share, color=expert_colors(num_experts), edgecolor='black', linewidth=0.5)
        ax.axhline(1.0 / num_experts, color='gray', linestyle='--', linewidth=1, label='uniform')
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('expert')
        ax.set_ylabel('share of patches (top-1)')
        ax.set_xticks(np.arange(num_experts))
        ax.set_ylim(0, max(1.0 / num_experts, share.max()) * 1.15)
        ax.legend(fontsize=7, loc='upper right')
    for ax in axes[len(usage):]:
        ax.set_visible(False)
    fig.suptitle(title or 'expert usage per layer')
    return fig


def _color_spines(ax: Axes, color: Any, width: float = 3.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def plot_position_usage(position_usage: ArrayLike, title: Optional[str] = None, max_cols: int = 4) -> Figure:
    """Where each expert is chosen: one heat map per expert of the share of images choosing it there.

    Args:
        position_usage: [e, nh, nw] from :func:`~pce_timm.analysis.stats.usage_by_position`.
        title: figure title (e.g. the layer name).
        max_cols: heat maps per row.
    """
    usage = _numpy(position_usage)
    if usage.ndim != 3:
        raise ValueError(f'position_usage must be [e, nh, nw], got shape {usage.shape}')
    num_experts, nh, nw = usage.shape
    rows, cols = _grid_shape(num_experts, max_cols)
    fig = _new_figure((2.4 * cols + 1.0, 2.4 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = expert_colors(num_experts)
    image = None
    for e, ax in enumerate(axes.reshape(-1)):
        if e >= num_experts:
            ax.set_visible(False)
            continue
        image = ax.imshow(usage[e], cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
        ax.set_title(f'expert {e}', fontsize=9)
        _color_spines(ax, colors[e])
        ax.set_xticks(np.arange(nw) if nw <= 8 else [])
        ax.set_yticks(np.arange(nh) if nh <= 8 else [])
        if e % cols == 0:
            ax.set_ylabel('patch row')
        if e >= num_experts - cols:
            ax.set_xlabel('patch column')
    fig.colorbar(image, ax=axes, label='share of images choosing the expert', shrink=0.8)
    fig.suptitle(title or 'expert usage by patch position')
    return fig


def plot_class_usage(
        class_usage: ArrayLike,
        class_names: Optional[Sequence[str]] = None,
        title: Optional[str] = None,
) -> Figure:
    """Class x expert heat map: the share of each class's patches routed to each expert.

    Args:
        class_usage: [c, e] from :func:`~pce_timm.analysis.stats.usage_by_class` (rows sum to 1).
        class_names: c names for the rows; ticks are dropped beyond 50 classes.
        title: figure title.
    """
    usage = _numpy(class_usage)
    if usage.ndim != 2:
        raise ValueError(f'class_usage must be [c, e], got shape {usage.shape}')
    num_classes, num_experts = usage.shape
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f'class_names must name all {num_classes} classes, got {len(class_names)}')
    fig = _new_figure((max(4.0, 0.5 * num_experts + 2.5), min(12.0, max(3.0, 0.3 * num_classes + 1.5))))
    ax = fig.subplots()
    image = ax.imshow(usage, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto', interpolation='nearest')
    ax.set_xlabel('expert')
    ax.set_ylabel('class')
    ax.set_xticks(np.arange(num_experts))
    for label, color in zip(ax.get_xticklabels(), expert_colors(num_experts), strict=True):
        label.set_color(color)
        label.set_fontweight('bold')
    if num_classes <= 50:
        ax.set_yticks(np.arange(num_classes), labels=list(class_names) if class_names else None)
    if num_classes * num_experts <= 200:
        for (row, col), value in np.ndenumerate(usage):
            ax.text(col, row, f'{value:.2f}', ha='center', va='center', fontsize=7,
                    color='black' if value > 0.6 else 'white')
    fig.colorbar(image, ax=ax, label="share of the class's patches")
    ax.set_title(title or 'expert usage by class')
    return fig


def _history_value(metric: str, value: Any) -> float:
    if metric == 'dead_experts' and isinstance(value, (list, tuple)):
        return float(len(value))
    if metric == 'imbalance' and value is None:  # stats.json stores an infinite imbalance as null
        return float('inf')
    return float('nan') if value is None else float(value)


def _plot_metric(ax: Axes, epochs: np.ndarray, series: Dict[str, np.ndarray], metric: str, colors: np.ndarray) -> None:
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for i, ((name, values), color) in enumerate(zip(series.items(), colors, strict=True)):
        finite = np.where(np.isfinite(values), values, np.nan)
        ax.plot(epochs, finite, marker='o', markersize=3, color=color, label=name)
        if metric == 'imbalance' and np.isinf(values).any():  # markers near the top edge, one row per layer
            inf = np.isinf(values)
            ax.plot(epochs[inf], np.full(inf.sum(), 0.97 - 0.04 * i), linestyle='none', marker='^', color=color,
                    transform=top, clip_on=False)
    if metric == 'imbalance':
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
    if metric == 'dead_experts':
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if metric == 'usage_entropy':
        ax.set_ylim(-0.02, 1.05)


def plot_routing_history(history: Sequence[Mapping[str, Any]], title: Optional[str] = None) -> Figure:
    """Routing statistics over training epochs, one line per layer.

    Args:
        history: per epoch ``{'epoch': int, 'layers': {name: {'usage_entropy', 'imbalance',
            'mean_router_entropy', 'dead_experts'}}}``. ``dead_experts`` may be a list of ids (counted) or a
            number; an ``imbalance`` of ``inf`` or ``None`` (JSON) is drawn as a triangle at the top edge;
            missing values leave gaps.
        title: figure title.
    """
    if not history:
        raise ValueError('history must hold at least one epoch, got none')
    epochs = np.asarray([float(entry['epoch']) for entry in history])
    names = list(dict.fromkeys(name for entry in history for name in entry['layers']))
    colors = matplotlib.colormaps['viridis'](np.linspace(0.0, 0.85, len(names)))
    fig = _new_figure((10.0, 6.5))
    axes = fig.subplots(2, 2, sharex=True).reshape(-1)
    for ax, (metric, label) in zip(axes, HISTORY_METRICS, strict=True):
        series = {
            name: np.asarray([_history_value(metric, entry['layers'].get(name, {}).get(metric)) for entry in history])
            for name in names
        }
        _plot_metric(ax, epochs, series, metric, colors)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(label.split(' (')[0])
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel('epoch')
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside right upper', title='layer', fontsize=8)
    fig.suptitle(title or 'routing statistics over training')
    return fig


def top_patches_per_expert(
        images: ArrayLike,
        router_probs: torch.Tensor,
        grid_size: Tuple[int, int],
        top_n: int = 8,
) -> Tuple[List[List[np.ndarray]], List[List[float]]]:
    """The image patches each expert is most probable for, for :func:`plot_expert_gallery`.

    Args:
        images: [b, c, h, w] in [0, 1]; the layer's grid is spread evenly over each image.
        router_probs: [b, n, e] of one layer.
        grid_size: (nh, nw) of that layer.
        top_n: patches per expert.

    Returns:
        ``(patches, scores)``: per expert, up to ``top_n`` crops ([ph, pw] or [ph, pw, 3] arrays) and their
        router probabilities for that expert, highest first.
    """
    probs = router_probs.detach().float().cpu()
    b, n, num_experts = probs.shape
    nh, nw = grid_size
    if nh * nw != n or len(images) != b:
        raise ValueError(f'images ({len(images)}) and router_probs {tuple(probs.shape)} must share b, and '
                         f'grid_size {tuple(grid_size)} must give n patches')
    pixels = [_image_hwc(image) for image in images]
    patches, scores = [], []
    for e in range(num_experts):
        best = probs[..., e].reshape(-1).topk(min(top_n, b * n))
        crops = []
        for flat in best.indices.tolist():
            image, (row, col) = pixels[flat // n], divmod(flat % n, nw)
            h, w = image.shape[:2]
            crops.append(image[row * h // nh:(row + 1) * h // nh, col * w // nw:(col + 1) * w // nw])
        patches.append(crops)
        scores.append(best.values.tolist())
    return patches, scores


def plot_expert_gallery(
        patches_per_expert: Sequence[Sequence[ArrayLike]],
        scores: Optional[Sequence[Sequence[float]]] = None,
        max_per_expert: int = 8,
        title: Optional[str] = None,
) -> Figure:
    """Expert gallery: each row shows the image patches that most strongly choose one expert.

    Args:
        patches_per_expert: per expert, crops ([h, w] or [c, h, w] / [h, w, c] in [0, 1]), strongest first.
        scores: per expert, each crop's router probability, shown above it.
        max_per_expert: columns to draw.
        title: figure title.
    """
    num_experts = len(patches_per_expert)
    if num_experts == 0:
        raise ValueError('patches_per_expert must hold at least one expert, got none')
    cols = max(1, min(max_per_expert, max(len(p) for p in patches_per_expert)))
    fig = _new_figure((1.3 * cols + 1.2, 1.4 * num_experts + 0.6))
    axes = fig.subplots(num_experts, cols, squeeze=False)
    colors = expert_colors(num_experts)
    for e, row in enumerate(axes):
        for i, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i < len(patches_per_expert[e]):
                ax.imshow(_image_hwc(patches_per_expert[e][i]), cmap='gray', vmin=0.0, vmax=1.0)
                _color_spines(ax, colors[e])
                if scores is not None:
                    ax.set_title(f'p={scores[e][i]:.2f}', fontsize=7)
            else:
                ax.axis('off')
        row[0].axis('on')
        row[0].set_ylabel(f'expert {e}', color=colors[e], fontweight='bold')
        if not patches_per_expert[e]:
            row[0].text(0.5, 0.5, 'no patches', ha='center', va='center', transform=row[0].transAxes, fontsize=8)
    fig.suptitle(title or 'patches that most strongly choose each expert')
    return fig
