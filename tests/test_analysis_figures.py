"""Routing figures and report: every figure renders to a non-blank PNG, the report links existing files."""
import json
import re

import matplotlib.image as mpimg
import pytest
import torch
from matplotlib.figure import Figure

from pce_timm.analysis.figures import (
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
from pce_timm.analysis.report import build_stats, read_stats, write_report
from pce_timm.analysis.routes import route_counts, routes_from_layers
from pce_timm.analysis.stats import layer_summary, usage_by_class, usage_by_position, usage_counts

NUM_EXPERTS = 4
NUM_IMAGES = 4


def _layer(nh: int, nw: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(NUM_IMAGES, nh * nw, NUM_EXPERTS, generator=gen)).softmax(-1)
    return {'router_probs': probs, 'expert_indices': probs.topk(2, dim=-1).indices, 'grid_size': (nh, nw)}


@pytest.fixture(scope='module')
def routing():
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing='ij')
    images = torch.stack([torch.stack([rows, cols * (i + 1) / NUM_IMAGES, 1 - rows]) for i in range(NUM_IMAGES)])
    layers = {'stage1.pce': _layer(4, 4, seed=0), 'stage2.pce': _layer(2, 2, seed=1)}
    return images, layers


def _assert_png(path, min_bytes: int = 5_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels[..., :3].var() > 1e-3, 'image is blank'


def _history():
    return [
        {'epoch': epoch, 'layers': {
            'stage1.pce': {'usage_entropy': 0.5 + 0.1 * epoch, 'imbalance': float('inf') if epoch == 0 else 4 - epoch,
                           'mean_router_entropy': 1.2 - 0.2 * epoch, 'dead_experts': [3] if epoch == 0 else []},
            'stage2.pce': {'usage_entropy': 0.7, 'imbalance': None, 'mean_router_entropy': 0.9, 'dead_experts': 1},
        }}
        for epoch in range(3)
    ]


def _make_figure(name: str, images, layers) -> Figure:
    layer = layers['stage1.pce']
    if name == 'assignment':
        confidence = layer['router_probs'].max(-1).values
        return plot_assignment_map(images[0], layer['expert_indices'][0], confidence[0], (4, 4), NUM_EXPERTS,
                                   title='stage1.pce, image 0')
    if name == 'overview':
        return plot_assignment_overview(images, layers, max_images=2)
    if name == 'usage':
        return plot_expert_usage({n: usage_counts(lr['expert_indices'], NUM_EXPERTS) for n, lr in layers.items()})
    if name == 'positions':
        return plot_position_usage(usage_by_position(layer['expert_indices'], (4, 4), NUM_EXPERTS), 'stage1.pce')
    if name == 'classes':
        class_usage = usage_by_class(layer['expert_indices'], torch.tensor([0, 1, 1, 0]), NUM_EXPERTS, 2)
        return plot_class_usage(class_usage, class_names=['cat', 'dog'])
    if name == 'history':
        return plot_routing_history(_history())
    patches, scores = top_patches_per_expert(images, layer['router_probs'], (4, 4), top_n=3)
    return plot_expert_gallery(patches, scores)


@pytest.mark.parametrize('name', ['assignment', 'overview', 'usage', 'positions', 'classes', 'history', 'gallery'])
def test_figure_renders_to_png(routing, tmp_path, name):
    images, layers = routing
    fig = _make_figure(name, images, layers)
    assert isinstance(fig, Figure)
    _assert_png(save_figure(fig, tmp_path / f'{name}.png'))


def test_expert_colors_are_distinct():
    for num_experts in (1, 4, 12, 32):
        colors = expert_colors(num_experts)
        assert colors.shape == (num_experts, 4)
        assert len({tuple(c) for c in colors.round(4)}) == num_experts


def test_gallery_patches_are_strongest():
    probs = torch.zeros(2, 4, 2)
    probs[..., 0] = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.3, 0.8, 0.4, 0.6]])
    probs[..., 1] = 1 - probs[..., 0]
    images = torch.rand(2, 3, 8, 8)
    patches, scores = top_patches_per_expert(images, probs, (2, 2), top_n=2)
    assert scores[0] == pytest.approx([0.9, 0.8]) and scores[1] == pytest.approx([0.9, 0.8])
    assert torch.allclose(torch.as_tensor(patches[0][1]), images[1, :, :4, 4:].permute(1, 2, 0))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match='image'):
        plot_assignment_map(torch.randn(3, 8, 8) * 5, torch.zeros(4).long(), torch.ones(4), (2, 2), 2)
    with pytest.raises(ValueError, match='grid_size'):
        plot_assignment_map(torch.rand(8, 8), torch.zeros(4).long(), torch.ones(4), (3, 3), 2)


def test_report_links_existing_files(routing, tmp_path):
    images, layers = routing
    figures = {name: save_figure(_make_figure(name, images, layers), tmp_path / 'figures' / f'{name}.png', dpi=60)
               for name in ('usage', 'classes')}
    summaries = {name: layer_summary(**lr) for name, lr in layers.items()}
    summaries['stage2.pce']['imbalance'] = float('inf')  # strict JSON: written as null, read back as inf
    routes = {'reference_grid': [4, 4], 'layers': list(layers), 'top_routes': route_counts(routes_from_layers(layers))}
    stats = build_stats(summaries, routes=routes, meta={'model': 'pce_test'})
    report = write_report(tmp_path, stats, figures)

    text = report.read_text()
    links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', text)
    assert len(links) == len(figures)
    for link in links:
        _assert_png(tmp_path / link)
    assert 'stage1.pce' in text and '| inf |' in text
    raw = json.loads((tmp_path / 'stats.json').read_text())
    assert raw['schema_version'] == 1 and raw['layers']['stage2.pce']['imbalance'] is None
    assert read_stats(tmp_path / 'stats.json')['layers']['stage2.pce']['imbalance'] == float('inf')
    with pytest.raises(FileNotFoundError, match='missing'):
        write_report(tmp_path / 'other', stats, {'missing': tmp_path / 'nope.png'})
