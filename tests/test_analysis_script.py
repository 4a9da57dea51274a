"""scripts/analyze_routing.py end to end: a tiny PCE-ResNet run folder on scikit-learn's digits.

The numbers in stats.json must agree with each other and with an independent count of the same images; every
figure must be a real PNG that report.md links; a run's routing_history must be plotted.
"""
import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import timm
import torch

from pce_timm.analysis import collect_usage, read_stats
from pce_timm.data import create_dataset_transform, create_loader, dataset_info, load_image_dataset
from pce_timm.train.checkpoint import save_model_dir
from pce_timm.train.models import load_model
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 40
LAYERS = ['layer2.0.conv1', 'layer3.0.conv1']  # one block per stage: two PCE layers, on 4x4 and 2x2 grids


def _load_script():
    return load_module_from_path(ROOT / 'scripts' / 'analyze_routing.py', 'pce_analyze_routing_script')


def _history():
    return [{'epoch': epoch, 'phase': 'router', 'layers': {
        name: {'usage_entropy': 0.5 + 0.1 * epoch, 'imbalance': None if epoch == 1 else 3.0 - epoch,
               'mean_router_entropy': 1.0 - 0.2 * epoch, 'dead_experts': [1] if epoch == 1 else [],
               'usage_share': [0.25] * 4, 'usage_counts': [1, 1, 1, 1]}
        for name in LAYERS}} for epoch in (1, 2, 3)]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A training-run-like folder: model/ (timm Hub format) and results.json with a routing_history."""
    run = tmp_path_factory.mktemp('run')
    info = dataset_info('digits')
    torch.manual_seed(0)  # the same untrained model whatever ran before
    model = timm.create_model('pce_resnet18', layers=(1, 1, 1, 1), stem_type='cifar', pce_stages=(1, 2), patch_size=1,
                              channels=[8, 16, 32, 64], stem_width=8, num_classes=10, in_chans=1, top_k=1)
    save_model_dir(model, run / 'model', data_config={k: info[k] for k in ('input_size', 'mean', 'std', 'crop_pct')})
    (run / 'results.json').write_text(json.dumps({'model_dir': 'model', 'routing_history': _history()}))
    return run


@pytest.fixture(scope='module')
def analysis(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('analysis')
    _load_script().main(['--model', str(run_dir), '--dataset', 'digits', '--output-dir', str(out),
                         '--num-images', str(NUM_IMAGES), '--batch-size', '16', '--device', 'cpu', '--no-progress'])
    return out


def test_stats_numbers_are_consistent(analysis, run_dir):
    stats = read_stats(analysis / 'stats.json')
    assert list(stats['layers']) == LAYERS
    assert stats['meta']['num_images'] == NUM_IMAGES and stats['meta']['dataset'] == 'digits'
    for name, layer in stats['layers'].items():
        patches = NUM_IMAGES * layer['num_patches']
        assert layer['num_images'] == NUM_IMAGES and layer['top_k'] == 1
        assert layer['grid_size'][0] * layer['grid_size'][1] == layer['num_patches']
        assert sum(layer['usage_counts']) == patches, name
        assert layer['usage_counts_all'] == layer['usage_counts']  # top-1: every choice is the first
        assert sum(layer['usage_share']) == pytest.approx(1.0)
        assert 0.0 <= layer['usage_entropy'] <= 1.0 and 0.0 < layer['mean_top_probability'] <= 1.0
        assert layer['dead_experts'] == [e for e, c in enumerate(layer['usage_counts']) if c == 0]
        assert len(layer['specialisation']) == 4
        assert sum(s['patches'] for s in layer['specialisation']) == patches
    assert [stats['layers'][name]['grid_size'] for name in LAYERS] == [[4, 4], [2, 2]]
    grid = stats['routes']['reference_grid']
    assert grid == [4, 4] and stats['routes']['layers'] == LAYERS
    assert sum(r['count'] for r in stats['routes']['top_routes']) <= NUM_IMAGES * grid[0] * grid[1]
    assert 1 <= stats['clustering']['num_clusters'] <= 10 and 0 < stats['clustering']['purity'] <= 1

    # an independent count over the same images (same loader arguments as the script) agrees
    model = load_model(str(run_dir))
    loader = create_loader(load_image_dataset('digits', 'test'), create_dataset_transform(model),
                           batch_size=16, max_samples=NUM_IMAGES, seed=0)
    counts = collect_usage(model, loader)
    assert {name: c.tolist() for name, c in counts.items()} == {
        name: layer['usage_counts'] for name, layer in stats['layers'].items()}


def test_figures_are_pngs_linked_by_the_report(analysis):
    figures = sorted((analysis / 'figures').glob('*.png'))
    names = {path.name for path in figures}
    assert {'usage.png', 'assignments.png', 'history.png'} <= names
    for layer in LAYERS:
        assert {f'{layer}_{kind}.png' for kind in ('position', 'class', 'gallery', 'assignments')} <= names
    for path in figures:
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and path.stat().st_size > 5_000, path.name
        assert mpimg.imread(path)[..., :3].var() > 1e-4, f'{path.name} is blank'
    report = (analysis / 'report.md').read_text()
    links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report)
    assert sorted(links) == sorted(f'figures/{name}' for name in names)
    assert '### routing over training' in report and '[stats.json](stats.json)' in report


def test_routing_history_found_from_run_model_and_checkpoint_folders(run_dir, tmp_path):
    script = _load_script()
    assert script.routing_history(str(run_dir)) == _history()
    assert script.routing_history(f'local-dir:{run_dir / "model"}') == _history()
    checkpoint = run_dir / 'checkpoints' / 'checkpoint_0'
    checkpoint.mkdir(parents=True)
    assert script.routing_history(str(checkpoint)) == _history()
    assert script.routing_history(str(tmp_path)) is None  # a folder of no run
    assert script.routing_history('pce_resnet18') is None  # a timm name


def test_script_rejects_bad_arguments(capsys):
    script = _load_script()
    for flag in ('--num-images', '--num-clusters'):
        with pytest.raises(SystemExit):
            script.parse_args(['--model', 'x', '--dataset', 'digits', '--output-dir', 'o', flag, '0'])
        assert f'{flag} must be >= 1' in capsys.readouterr().err


def test_analysis_of_a_model_without_pce_layers_fails_clearly(tmp_path):
    from pce_timm.analysis import analyze_model

    with pytest.raises(ValueError, match='no PCE layers'):
        analyze_model(torch.nn.Conv2d(1, 1, 1), [], tmp_path, num_images=1, num_classes=2)
