"""The pce_timm demo: a PCE-ResNet and the dense ResNet of the same widths, one recipe, Fashion-MNIST.

``run_demo`` trains both models with ``scripts/configs/demo_fmnist.yaml`` (the dense run is the same recipe with
``--pce-stages`` set to no stages), each in a fresh process as two separate ``scripts/train.py`` runs would be
(accelerate keeps one state per process), then writes a side-by-side table (test top-1 / top-5 of the final
epoch, parameters, train time, usage entropy / imbalance of the PCE layers) and draws which expert each patch
of a few test images went to. The CLI is ``scripts/demo.py`` (``make demo``).

Outputs (in ``output_dir``, default runs/demo)::

    results.json   one row per model (top1, top5, num_params, train_time_s, routing statistics, ...)
    table.txt      the table printed at the end
    routing.png    expert of every patch, per PCE layer (columns), for a few test images (rows)
    pce/, dense/   the two training runs (config.yaml, results.json, model/, checkpoints/, logs/)
"""
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pce_timm.utils import write_file_atomic

__all__ = [
    'DEFAULT_RECIPE', 'DemoConfig', 'OutputFolder', 'TrainingFailed', 'check_data', 'format_table', 'run_demo',
    'run_training', 'summary_row', 'train_argvs',
]

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / 'scripts' / 'configs' / 'demo_fmnist.yaml'
DEFAULT_OUTPUT = Path('runs') / 'demo'
RESULTS_FILE = 'results.json'
TABLE_FILE = 'table.txt'
ROUTING_FILE = 'routing.png'
RUNS = (('pce', 'PCE'), ('dense', 'dense'))  # (run folder, label prefix)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains and where.

    Attributes:
        output_dir: the demo folder (runs/demo).
        recipe: the recipe both models train with (a scripts/train.py ``--config``).
        epochs: override the recipe's epochs.
        max_train_samples: train on a fixed random subset of this many images (quick smoke runs).
        num_images: test images (of different classes) in routing.png.
        overwrite: replace an existing demo in ``output_dir`` (kept until the new one completes).
        train_extra: other scripts/train.py options, passed to both runs.
    """
    output_dir: Path = DEFAULT_OUTPUT
    recipe: str = str(DEFAULT_RECIPE)
    epochs: Optional[int] = None
    max_train_samples: Optional[int] = None
    num_images: int = 4
    overwrite: bool = False
    train_extra: Tuple[str, ...] = ()


class TrainingFailed(Exception):
    """A demo training process failed; it printed why. ``exit_code`` is its exit code (scripts' convention)."""

    def __init__(self, exit_code: int):
        super().__init__(f'a demo training run failed (exit code {exit_code})')
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------
# arguments and data


def train_argvs(demo: DemoConfig) -> Dict[str, List[str]]:
    """The scripts/train.py argument lists of the two runs: the same recipe, the dense one without PCE stages."""
    common = ['--config', str(demo.recipe)]
    if demo.epochs is not None:
        common += ['--epochs', str(demo.epochs)]
    if demo.max_train_samples is not None:
        common += ['--max-train-samples', str(demo.max_train_samples)]
    common += list(demo.train_extra)
    output_dir = Path(demo.output_dir)
    return {
        'pce': ['--output-dir', str(output_dir / 'pce'), *common],
        'dense': ['--output-dir', str(output_dir / 'dense'), *common, '--pce-stages'],  # last: no PCE stages
    }


def check_data(args: Any) -> None:
    """Load both splits once, so a missing dataset fails before any folder is touched, saying how to get it.

    Raises:
        DatasetNotFoundError: with the data package's search report plus the demo's installation hint.
    """
    from pce_timm.data import DatasetNotFoundError, get_dataset_spec, load_image_dataset

    try:
        for split in ('train', args.eval_split):
            load_image_dataset(args.dataset, split, args.data_dir)
    except DatasetNotFoundError as e:
        package = get_dataset_spec(args.dataset).apt_package
        hint = ['', f'The demo needs {args.dataset}. To get it:', '  - run `make demo` (it installs the Debian '
                'data packages when apt is usable: root or password-less sudo)']
        if package:
            hint.append(f'  - or install it yourself: sudo apt-get install {package}')
        hint.append('  - or pass --data-dir DIR (see the layouts above)')
        raise DatasetNotFoundError(f'{e}\n' + '\n'.join(hint)) from e


class OutputFolder:
    """The demo folder: refuses a non-empty one unless ``overwrite``; then keeps the old one until :meth:`commit`.

    Not ``pce_timm.utils.atomic_folder``: the runs train in place (their records name ``output_dir``), so the new
    demo cannot be assembled elsewhere and renamed; instead the old one is kept aside until the new one is done.

    The old folder is renamed to a hidden sibling (``.demo.previous-<pid>``) before training starts; on
    :meth:`commit` it is deleted, on :meth:`rollback` (failure or Ctrl-C) the new partial folder is deleted
    and the old one moved back.
    """

    def __init__(self, path: Path, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        self.backup: Optional[Path] = None

    def check(self) -> None:
        from pce_timm.train import RecipeError

        if self.path.exists() and not self.path.is_dir():
            raise RecipeError(f'output_dir: {str(self.path)!r} is a file; choose another --output-dir')
        if self.path.is_dir() and any(self.path.iterdir()) and not self.overwrite:
            what = 'a completed demo' if (self.path / RESULTS_FILE).is_file() else 'files (an unfinished demo?)'
            raise RecipeError(f'output_dir: {str(self.path)!r} already holds {what}; pass --overwrite to replace '
                              f'it (the old folder is kept until the new demo completes), or choose another '
                              f'--output-dir')

    def begin(self) -> None:
        self.check()
        if self.path.is_dir() and any(self.path.iterdir()):
            self.backup = self.path.with_name(f'.{self.path.name}.previous-{os.getpid()}')
            self.path.rename(self.backup)
            print(f'moved the previous demo aside to {self.backup} (deleted once this demo completes)')
        self.path.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        if self.backup is not None:
            shutil.rmtree(self.backup)
            self.backup = None

    def rollback(self) -> None:
        if self.backup is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.backup.rename(self.path)
            print(f'demo failed: restored the previous demo in {self.path}', file=sys.stderr)
            self.backup = None


# ---------------------------------------------------------------------------------------------------------
# training


def run_training(argv: Sequence[str]) -> Dict[str, Any]:
    """Train one model (``pce_timm.train.train(parse_args(argv))``) in a fresh process; return its results.

    A fresh (spawned) process per run starts accelerate, torch's RNGs and every cache from scratch, as two
    separate ``scripts/train.py`` runs would, without reaching into accelerate's private state. It uses this
    process's torch thread count.

    Raises:
        TrainingFailed: the run failed (it printed why), with the exit code scripts/train.py would return.
    """
    context = multiprocessing.get_context('spawn')
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_train_in_child, args=(list(argv), torch.get_num_threads(), sender))
    process.start()
    sender.close()  # the child holds the only sending end: recv() ends with EOFError if it dies
    try:
        results = receiver.recv()
    except EOFError:
        results = None
    finally:
        process.join()
        receiver.close()
    if process.exitcode != 0 or results is None:
        raise TrainingFailed(process.exitcode or 1)
    return results


def _train_in_child(argv: List[str], threads: int, sender) -> None:
    from pce_timm.train import parse_args, train
    from pce_timm.train.cli import run_cli

    torch.set_num_threads(threads)
    code = run_cli(lambda: sender.send(train(parse_args(argv))))
    sender.close()
    sys.exit(code)


def summary_row(kind: str, label: str, results: Dict[str, Any], run_dir: str) -> Dict[str, Any]:
    """One row of the demo table / results.json from a run's results.json."""
    config = results['config']
    stages = list(config.get('pce_stages') or [])
    routing = results.get('routing') or {}
    summary = results.get('routing_summary') or {}
    return {
        'name': label,
        'kind': kind,
        'model': results['model'],
        'pce_stages': stages,
        'pce_layers': len(routing),
        'num_experts': config.get('num_experts') if stages else None,
        'dataset': results['dataset'],
        'eval_split': results['eval_split'],
        'top1': results['top1'],
        'top5': results['top5'],
        'loss': results['loss'],
        'num_params': results['num_params'],
        'train_time_s': results['wall_time_s'],
        'epochs': results['epochs'],
        'mean_usage_entropy': summary.get('mean_usage_entropy'),
        'max_imbalance': summary.get('max_imbalance'),
        'dead_experts': summary.get('dead_experts'),
        'routing': {name: {k: r[k] for k in ('usage_entropy', 'imbalance', 'mean_router_entropy', 'dead_experts',
                                            'usage_share')}
                    for name, r in routing.items()},
        'run_dir': run_dir,
        'model_dir': f'{run_dir}/model',
    }


def model_label(results: Dict[str, Any], kind: str) -> str:
    name = results['model'].split(':')[-1]
    pretty = name.replace('pce_resnet', 'ResNet-').replace('resnet', 'ResNet-')
    if kind == 'pce':
        stages = results['config'].get('pce_stages') or []
        return f'PCE-{pretty} (PCE in stages {",".join(map(str, stages))})'
    return f'dense {pretty}'


# ---------------------------------------------------------------------------------------------------------
# table


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return '-'
    return format(value, fmt)


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The side-by-side table: one line per model, then the PCE layers' routing statistics."""
    from pce_timm.train.evaluation import format_table as text_table

    header = ['model', 'test top-1 %', 'test top-5 %', 'params', 'train time s', 'PCE layers', 'usage entropy',
              'imbalance', 'dead experts']
    lines = []
    for row in rows:
        pce = row['pce_layers'] > 0
        imbalance = ('inf' if row['max_imbalance'] is None else f"{row['max_imbalance']:.2f}") if pce else '-'
        lines.append([row['name'], f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['num_params']:,}",
                      f"{row['train_time_s']:.0f}", str(row['pce_layers']),
                      _num(row['mean_usage_entropy'], '.3f') if pce else '-', imbalance,
                      str(row['dead_experts']) if pce else '-'])
    text = [text_table(lines, header)]
    text.append('top-1 / top-5: final epoch on the eval split (it selected nothing); train time: the whole run '
                '(training + per-epoch eval).\n'
                'usage entropy: mean over the PCE layers of the entropy of the expert usage shares / log(experts) '
                '(1 = all experts equally used);\n'
                'imbalance: the largest over the layers of busiest / least used expert (1 = balanced); dead experts: '
                'experts no eval patch chose.')
    for row in rows:
        if not row['routing']:
            continue
        layer_rows = [[name, f"{r['usage_entropy']:.3f}",
                       'inf' if r['imbalance'] is None else f"{r['imbalance']:.2f}",
                       f"{r['mean_router_entropy']:.3f}", ' '.join(f'{s:.2f}' for s in r['usage_share'])]
                      for name, r in row['routing'].items()]
        text.append(f"\nPCE layers of {row['name']} ({row['eval_split']} split, top-1 expert per patch):")
        text.append(text_table(layer_rows, ['layer', 'usage entropy', 'imbalance', 'router entropy (nats)',
                                            'usage share per expert']))
    return '\n'.join(text)


def pick_images(dataset, num_images: int) -> List[int]:
    """Indices of the first test image of each of ``num_images`` different classes (in dataset order)."""
    labels = dataset.with_format('arrow')[:]['label'].to_pylist()
    chosen: Dict[int, int] = {}
    for index, label in enumerate(labels):
        if label not in chosen:
            chosen[label] = index
            if len(chosen) == num_images:
                break
    picked = list(chosen.values())
    if len(picked) < num_images:  # fewer classes than asked for: fill with the next images
        picked += [i for i in range(len(labels)) if i not in chosen.values()][:num_images - len(picked)]
    return picked


def dataset_title(name: str) -> str:
    """'Fashion-MNIST' for fashion_mnist: the registry description's first part, else the name."""
    from pce_timm.data import get_dataset_spec

    description = get_dataset_spec(name).description or ''
    return description.split(',')[0].strip() or name


@torch.no_grad()
def draw_routing(model_dir: Path, dataset_name: str, split: str, data_dir: Optional[str], path: Path,
                 num_images: int, title: str) -> Path:
    """routing.png: which expert each patch of ``num_images`` test images went to, in every PCE layer."""
    from timm.data import resolve_data_config

    from pce_timm.analysis import pce_layers
    from pce_timm.analysis.figures import plot_assignment_overview, save_figure
    from pce_timm.data import create_dataset_transform, load_image_dataset
    from pce_timm.train.models import load_model

    model = load_model(str(model_dir)).eval()
    layers = pce_layers(model)
    if not layers:
        raise ValueError(f'{model_dir} has no PCE layers to draw')
    data = load_image_dataset(dataset_name, split, data_dir)
    class_names = data.features['label'].names
    picked = data.select(pick_images(data, num_images))
    transform = create_dataset_transform(model, is_training=False)
    images = torch.stack([transform(image) for image in picked['image']])
    predictions = model(images).argmax(-1).tolist()
    routing = {name: layer.routing_stats() for name, layer in layers.items()}
    cfg = resolve_data_config(model=model)
    mean = torch.tensor(cfg['mean']).view(1, -1, 1, 1)
    std = torch.tensor(cfg['std']).view(1, -1, 1, 1)
    display = (images * std + mean).clamp(0, 1)
    labels = [f'{class_names[t]}\n(predicted: {class_names[p]})' if p != t else f'{class_names[t]}\n(predicted ✓)'
              for t, p in zip(picked['label'], predictions, strict=True)]
    fig = plot_assignment_overview(display, routing, max_images=len(images), row_labels=labels)
    fig.suptitle(f'{title}\nwhich expert each patch went to (colour = expert, opacity = router confidence, '
                 f'number = expert id)', fontsize=10)
    return save_figure(fig, path)


def run_demo(demo: DemoConfig) -> Dict[str, Any]:
    """Train both models, draw the routing and write results.json / table.txt; returns the results.json data.

    Bad options and a missing dataset fail before any folder is touched; a failure after that puts a replaced
    demo back (:class:`OutputFolder`).
    """
    started = time.time()
    output_dir = Path(demo.output_dir)
    argvs = train_argvs(demo)
    args = _check_options(demo, argvs)
    folder = OutputFolder(output_dir, demo.overwrite)
    folder.check()
    print(f'checking the data: {args.dataset} ({args.eval_split} split for testing)', flush=True)
    check_data(args)
    folder.begin()
    try:
        rows = []
        for i, (kind, prefix) in enumerate(RUNS):
            print(f'\n==> [{i + 1}/{len(RUNS)}] training the {prefix} model: {output_dir / kind}', flush=True)
            results = run_training(argvs[kind])
            rows.append(summary_row(kind, model_label(results, kind), results, kind))
        print(f'\n==> drawing the routing of {demo.num_images} test images', flush=True)
        routing_png = draw_routing(
            output_dir / 'pce' / 'model', args.dataset, args.eval_split, args.data_dir, output_dir / ROUTING_FILE,
            demo.num_images, f"{rows[0]['name']} on {dataset_title(args.dataset)} ({args.eval_split} images)")
        table = format_table(rows)
        summary = _summary(demo, args, rows, argvs, time.time() - started)
        _write_outputs(output_dir, summary, table)
        folder.commit()
    except BaseException:
        folder.rollback()
        raise
    print(f'\n{table}\n')
    print(f'demo done in {summary["total_time_s"] / 60:.1f} min. Outputs in {output_dir}/:')
    print(f'  {output_dir / RESULTS_FILE}  (one row per model)')
    print(f'  {output_dir / TABLE_FILE}')
    print(f'  {routing_png}  (expert per patch of {demo.num_images} test images)')
    for kind, _ in RUNS:
        print(f'  {output_dir / kind}/  (training run: model/, config.yaml, results.json, logs/)')
    return summary


def _check_options(demo: DemoConfig, argvs: Dict[str, List[str]]):
    """Parse both runs' options (bad ones fail here, before anything runs); returns the PCE run's config."""
    from pce_timm.train import RecipeError, parse_args

    parsed = {kind: parse_args(argv) for kind, argv in argvs.items()}
    if not parsed['pce'].pce_stages:
        raise RecipeError(f'pce_stages: the PCE run needs PCE stages, got {parsed["pce"].pce_stages!r} '
                          f'(from {demo.recipe} or the command line)')
    if demo.num_images < 1:
        raise RecipeError(f'num_images: got {demo.num_images}; accepted: an integer >= 1')
    return parsed['pce']


def _summary(demo: DemoConfig, args, rows: List[Dict[str, Any]], argvs: Dict[str, List[str]],
             total_s: float) -> Dict[str, Any]:
    return {
        'demo': 'PCE vs dense, same widths, same recipe',
        'recipe': str(demo.recipe),
        'dataset': args.dataset,
        'eval_split': args.eval_split,
        'note': 'top1/top5: final epoch on the eval split; the eval split selected nothing',
        'rows': rows,
        'routing_figure': ROUTING_FILE,
        'total_time_s': round(total_s, 1),
        'torch_threads': torch.get_num_threads(),
        'train_args': {kind: list(argv) for kind, argv in argvs.items()},
    }


def _write_outputs(output_dir: Path, summary: Dict[str, Any], table: str) -> None:
    from pce_timm.train.checkpoint import write_json_atomic

    write_json_atomic(summary, output_dir / RESULTS_FILE)
    write_file_atomic(output_dir / TABLE_FILE, table + '\n')
