"""The GPU campaign configs (scripts/configs/sweeps/cifar10_factors.yaml, tiny_imagenet_factors.yaml), smoke-tested
on CPU with the cells' own options and tiny overrides (widths 8-64, one epoch of a few steps, no launcher).

The data is written in the Hub repos' parquet layout: ``uoft-cs/cifar10`` (``plain_text/{train,test}-00000-of-00001
.parquet``, columns ``img`` / ``label``, the 10 class names) and ``zh-plus/tiny-imagenet``
(``data/{train,valid}-00000-of-00001-<hash>.parquet``, columns ``image`` / ``label``, 200 WordNet ids, JPEGs of
which a few are grayscale), a few dozen images per class. Every cell's recipe is checked and its model built on the
meta device; two cells (dense, and PCE upcycled from it) x one seed of CIFAR-10 really train and evaluate through
the sweep. ``slow``: the same as subprocesses and on Tiny-ImageNet, the whole grid of both, a cell on 2 accelerate
processes.
"""
import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

from pce_timm.data import dataset_info, load_image_dataset
from pce_timm.data.registry import CIFAR10_CLASSES, get_dataset_spec
from pce_timm.layers import pce_layers
from pce_timm.sweep import Cell, load_sweep_config, run_recipe, run_sweep, subprocess_runner
from pce_timm.train import parse_args
from pce_timm.train.checkpoint import save_model_dir
from pce_timm.train.models import create_train_model
from pce_timm.train.recipe import HOLDOUT_SPLIT
from pce_timm.utils import load_module_from_path

pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / 'scripts' / 'configs' / 'sweeps'
# WordNet-id-shaped class names in sorted order, as the Hub's ClassLabel holds Tiny-ImageNet's 200 classes
TINY_IMAGENET_CLASSES = tuple(f'n0{1443537 + 7919 * i:07d}' for i in range(200))
HUB_LAYOUTS = {  # dataset -> (sweep config, image column, class names, image format, {split: file})
    'cifar10': ('cifar10_factors.yaml', 'img', CIFAR10_CLASSES, 'PNG', {
        'train': 'plain_text/train-00000-of-00001.parquet', 'test': 'plain_text/test-00000-of-00001.parquet'}),
    'tiny-imagenet': ('tiny_imagenet_factors.yaml', 'image', TINY_IMAGENET_CLASSES, 'JPEG', {
        'train': 'data/train-00000-of-00001-1359597a978bc4fa.parquet',
        'valid': 'data/valid-00000-of-00001-70d52db3c749a935.parquet'}),
}
def _grids(stage1: int, stage2: int):
    """The patch grid of every PCE layer (the first conv of each block of stages 1 and 2)."""
    return {f'layer{stage}.{block}.conv1': (grid, grid) for stage, grid in ((2, stage1), (3, stage2))
            for block in (0, 1)}


ROUTING_GRIDS = {  # dataset -> cell -> the grid of every PCE layer at the dataset's size
    'cifar10': {'pce base': _grids(4, 4), 'fine patches (2 px)': _grids(8, 4)},  # 16 and 8 px maps
    'tiny-imagenet': {'pce base': _grids(4, 4), 'fine patches (2 px)': _grids(16, 8)},  # 32 and 16 px maps
}
PER_CLASS = {'train': 20, 'test': 4, 'valid': 1}
TINY = {'epochs': 1, 'max_train_samples': 64, 'max_eval_samples': 32, 'batch_size': 16, 'eval_batch_size': 64,
        'workers': 0, 'mixed_precision': 'no', 'log_with': ['csv'], 'progress': False, 'key_init_batches': 1,
        'checkpoint_every': 1, 'checkpoint_limit': 1}
TINY_WIDTHS = {'channels': [8, 16, 32, 64], 'stem_width': 8}


def write_hub_parquet(root: Path, dataset: str, seed: int = 0) -> Path:
    """``dataset``'s splits as its Hub repo lays them out, with ``PER_CLASS`` random images per class."""
    _, image_column, names, fmt, files = HUB_LAYOUTS[dataset]
    rng = np.random.default_rng(seed)
    size = 32 if dataset == 'cifar10' else 64
    features = datasets.Features({image_column: datasets.Image(), 'label': datasets.ClassLabel(names=list(names))})
    for split, file in files.items():
        images, labels = [], []
        for i in range(PER_CLASS[split] * len(names)):
            label = i % len(names)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            pixels[: size // 2, :, label % 3] = 255 - 5 * (label % 40)  # some class signal
            image = Image.fromarray(pixels)
            if fmt == 'JPEG' and i % 50 == 7:
                image = image.convert('L')  # Tiny-ImageNet holds some grayscale JPEGs
            buffer = io.BytesIO()
            image.save(buffer, format=fmt)
            images.append({'bytes': buffer.getvalue(), 'path': None})
            labels.append(label)
        path = root / file
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({image_column: images, 'label': labels}, features=features).to_parquet(str(path))
    return root


@pytest.fixture(scope='module')
def hub_data(tmp_path_factory):
    """dataset -> a folder holding its Hub-layout parquet files."""
    return {name: write_hub_parquet(tmp_path_factory.mktemp(name.replace('-', '_')), name) for name in HUB_LAYOUTS}


def _shrink_phases(phases, factor: float):
    return [{**p, 'epochs': p['epochs'] * factor} if p.get('epochs') is not None else dict(p) for p in phases]


def tiny_sweep(dataset: str, data_dir: Path, cells=None, seeds=(0,), launcher=()):
    """The dataset's sweep config with every cell's options kept and ``TINY`` overrides: the phases (of the recipe
    and of cells that set their own) scaled to the one epoch, the widths cut, the data read from ``data_dir``."""
    cfg = load_sweep_config(SWEEPS / HUB_LAYOUTS[dataset][0])
    recipe = yaml.safe_load(cfg.recipe.read_text())
    factor = TINY['epochs'] / recipe['epochs']
    options = {**cfg.options, **TINY, 'data_dir': str(data_dir), 'phases': _shrink_phases(recipe['phases'], factor),
               'model_kwargs': {**recipe.get('model_kwargs', {}), **TINY_WIDTHS}}
    chosen = [c for c in cfg.cells if cells is None or c.name in cells]
    shrunk = tuple(Cell(c.name, c.kind, {**c.options, **({'phases': _shrink_phases(c.options['phases'], factor)}
                                                         if 'phases' in c.options else {})}) for c in chosen)
    return dataclasses.replace(cfg, cells=shrunk, seeds=tuple(seeds), options=options, launcher=tuple(launcher))


# ---------------------------------------------------------------------------------------------------------
# the configs and the data layout


@pytest.mark.parametrize('dataset', list(HUB_LAYOUTS))
def test_the_grid_is_the_fashion_mnist_campaigns(dataset):
    cfg = load_sweep_config(SWEEPS / HUB_LAYOUTS[dataset][0])
    names = [c.name for c in cfg.cells]
    fmnist = [c.name for c in load_sweep_config(SWEEPS / 'fmnist_factors.yaml').cells]
    # the one-factor cells; Fashion-MNIST's round 2 combines the winners it measured (and controls them), a GPU
    # user combines theirs
    assert names == [n for n in fmnist if not n.startswith(('winners:', 'control:'))] and len(fmnist) == 21
    assert len(names) == 17 and names[0] == 'dense' and cfg.cells[0].kind == 'dense'
    assert cfg.cells[0].options == {'pce_stages': []}
    assert [c.name for c in cfg.cells if c.kind == 'dense'] == ['dense', 'dense continued']
    assert cfg.seeds == (0, 1, 2) and cfg.val_fraction == 0.1 and cfg.test_split == 'test'
    assert cfg.launcher[:2] == ('accelerate', 'launch') and '--num_processes' in cfg.launcher
    upcycled = next(c for c in cfg.cells if c.name == 'upcycled from dense')
    assert upcycled.options == {'model': '{runs}/dense/seed_{seed}'}
    continued = next(c for c in cfg.cells if c.name == 'dense continued')  # the upcycled cell's control
    assert continued.options == {'pce_stages': [], 'model': '{runs}/dense/seed_{seed}'}
    recipe = yaml.safe_load(cfg.recipe.read_text())
    assert recipe['dataset'] == dataset and recipe['stem_type'] == 'cifar' and recipe['pce_stages'] == [1, 2]
    for cell in cfg.cells:  # cells that set their own phases keep the recipe's epochs per phase
        if 'phases' in cell.options:
            fixed = [p['epochs'] for p in cell.options['phases'] if 'epochs' in p]
            assert fixed == [p['epochs'] for p in recipe['phases'] if 'epochs' in p][:len(fixed)], cell.name


@pytest.mark.parametrize('dataset', list(HUB_LAYOUTS))
@pytest.mark.parametrize('where', ['data_dir', 'hub cache'])
def test_the_hub_layout_loads_with_its_splits_and_classes(dataset, where, hub_data, tmp_path, monkeypatch, caplog):
    """From --data-dir, and (what `hf download <repo> --repo-type dataset` leaves) from the Hub cache offline."""
    data_dir = hub_data[dataset]
    if where == 'hub cache':
        hub_id = get_dataset_spec(dataset).hub_id
        shutil.copytree(data_dir, tmp_path / 'hub' / f'datasets--{hub_id.replace("/", "--")}' / 'snapshots' / 'abc')
        monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
        data_dir = None
    cache = str(tmp_path / 'datasets_cache')
    train = load_image_dataset(dataset, 'train', data_dir=data_dir, cache_dir=cache)
    test = load_image_dataset(dataset, 'test', data_dir=data_dir, cache_dir=cache)
    names = HUB_LAYOUTS[dataset][2]
    assert train.column_names == ['image', 'label'] and train.features['label'].names == list(names)
    assert (len(train), len(test)) == (20 * len(names), (4 if dataset == 'cifar10' else 1) * len(names))
    assert train['label'][:3] == [0, 1, 2] and isinstance(test[0]['image'], Image.Image)
    assert 'do not match' not in caplog.text  # the Hub's class names are taken as they are, without a warning


# ---------------------------------------------------------------------------------------------------------
# every cell builds; two cells train and evaluate through the sweep


@pytest.mark.parametrize('dataset', list(HUB_LAYOUTS))
def test_every_cell_recipe_checks_and_builds(dataset, hub_data, tmp_path):
    """The trainer's recipe check on every cell at the recipe's full widths: parse_args checks every value and the
    phases and builds the model on the meta device at the dataset's size. The upcycled cell finds the dense cell's
    run of its seed (its model built as the dense run would build it, untrained). The base and fine-patch models
    run one image: every PCE layer routes the grid the recipe promises."""
    cfg = tiny_sweep(dataset, hub_data[dataset])
    recipe = yaml.safe_load(cfg.recipe.read_text())
    cfg = dataclasses.replace(cfg, options={**cfg.options, 'model_kwargs': recipe['model_kwargs']})
    for cell in cfg.cells:
        path = tmp_path / f'{cell.folder}.yaml'
        path.write_text(yaml.safe_dump(run_recipe(cfg, cell, 0, tmp_path), sort_keys=False))
        args = parse_args(['--config', str(path), '--output-dir', str(tmp_path / cell.folder)])
        assert args.data.dataset == dataset and args.seed == 0 and args.data.val_fraction == 0.1, cell.name
        assert (args.model.pce_stages == []) == (cell.kind == 'dense'), cell.name
        if cell.name == 'dense':
            info = dataset_info(dataset)
            model = create_train_model(args.model, info['num_classes'], info['in_chans'])
            save_model_dir(model, tmp_path / 'runs' / 'dense' / 'seed_0' / 'model')
        if cell.name == 'upcycled from dense':
            assert args.model.name == str((tmp_path / 'runs' / 'dense' / 'seed_0').resolve())
        if cell.name in ROUTING_GRIDS[dataset]:  # the grids the recipe comments promise, at the dataset's size
            info = dataset_info(dataset)
            model = create_train_model(args.model, info['num_classes'], info['in_chans']).eval()
            with torch.no_grad():
                model(torch.zeros(1, *info['input_size']))
            grids = {name: layer.last_grid_size for name, layer in pce_layers(model).items()}
            assert grids == ROUTING_GRIDS[dataset][cell.name], cell.name


def in_process_runner(command, log: Path) -> int:
    """The sweep's ``python scripts/<train|evaluate>.py ...`` commands run in this process: the same argv and log,
    without the ~5 s interpreter and torch start-up of each (the slow tests run the real subprocesses)."""
    script = Path(command[1])
    module = load_module_from_path(script, f'pce_sweep_recipes_{script.stem}')
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open('a') as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        AcceleratorState._reset_state(True)  # a process-wide singleton: each run builds its own
        return module.main(command[2:])


@pytest.mark.parametrize('dataset, runner', [
    ('cifar10', in_process_runner),
    pytest.param('cifar10', subprocess_runner, marks=pytest.mark.slow),
    pytest.param('tiny-imagenet', in_process_runner, marks=pytest.mark.slow),
])
def test_two_cells_train_and_evaluate_through_the_sweep(dataset, runner, hub_data, tmp_path):
    """dense and PCE upcycled from it, seed 0, through train.py and evaluate.py as on a GPU machine."""
    cfg = tiny_sweep(dataset, hub_data[dataset], cells=('dense', 'upcycled from dense'))
    summary = run_sweep(cfg, tmp_path, runner=runner, progress=False)
    assert [c['name'] for c in summary['cells']] == ['dense', 'upcycled from dense']
    for cell in summary['cells']:
        assert cell['seeds'] == [0] and len(cell['values']) == len(cell['val_values']) == 1
        assert 0 <= cell['mean'] <= 100 and cell['params'] > 0 and cell['gmacs'] > 0
    run = tmp_path / 'runs' / 'upcycled_from_dense' / 'seed_0'
    results = json.loads((run / 'results.json').read_text())
    assert results['eval_split'] == HOLDOUT_SPLIT and results['dataset'] == dataset
    assert results['config']['model'] == str((tmp_path / 'runs' / 'dense' / 'seed_0').resolve())
    assert results['config']['data_dir'] == str(hub_data[dataset]) and results['config']['pce_stages'] == [1, 2]
    assert results['routing_summary']['mean_usage_entropy'] > 0  # upcycled into PCE layers that route
    assert json.loads((run / f'eval-{dataset}-test.json').read_text())['split'] == 'test'
    assert summary['selection']['baseline'] == 'dense'


# ---------------------------------------------------------------------------------------------------------
# slow: the whole grid, and a cell on 2 accelerate processes


@pytest.mark.slow
@pytest.mark.parametrize('dataset', list(HUB_LAYOUTS))
def test_the_whole_grid_trains_and_evaluates(dataset, hub_data, tmp_path):
    cfg = tiny_sweep(dataset, hub_data[dataset])
    summary = run_sweep(cfg, tmp_path, runner=in_process_runner, progress=False)
    assert [c['name'] for c in summary['cells']] == [c.name for c in cfg.cells]
    assert all(c['seeds'] == [0] and 0 <= c['mean'] <= 100 for c in summary['cells'])
    assert (tmp_path / 'summary.md').is_file() and (tmp_path / 'summary.png').is_file()


@pytest.mark.slow
def test_a_cell_trains_on_two_accelerate_processes(hub_data, tmp_path):
    accelerate = shutil.which('accelerate', path=str(Path(sys.executable).parent))
    assert accelerate, f'accelerate is not installed next to {sys.executable}'
    cfg = tiny_sweep('cifar10', hub_data['cifar10'], cells=('pce base',),
                     launcher=(accelerate, 'launch', '--multi_gpu', '--num_processes', '2'))
    summary = run_sweep(cfg, tmp_path, progress=False)
    run = tmp_path / 'runs' / 'pce_base' / 'seed_0'
    assert summary['cells'][0]['seeds'] == [0]
    assert f'{accelerate} launch --multi_gpu --num_processes 2' in run.with_suffix('.log').read_text()
    results = json.loads((run / 'results.json').read_text())
    assert results['num_processes'] == 2 and results['eval_split'] == HOLDOUT_SPLIT


def test_the_timing_config_reruns_cells_of_the_fashion_mnist_grid_unchanged():
    """fmnist_factors_timing.yaml times seed 0 of some cells again: the same recipe, options and cells."""
    grid, timing = (load_sweep_config(SWEEPS / name) for name in ('fmnist_factors.yaml', 'fmnist_factors_timing.yaml'))
    assert timing.seeds == (0,) and timing.recipe == grid.recipe and timing.options == grid.options
    assert timing.val_fraction == grid.val_fraction and timing.cells[0].name == 'dense'  # its own dense run
    cells = {c.name: c for c in grid.cells}
    assert all(c == cells[c.name] for c in timing.cells)
