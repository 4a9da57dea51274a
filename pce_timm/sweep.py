"""Sweeps: a grid of training recipes (cells) x seeds, each an ordinary ``scripts/train.py`` run, summarised.

    python scripts/sweep.py --config scripts/configs/sweeps/fmnist_factors.yaml --output-dir runs/sweeps/fmnist

A sweep config (YAML)::

    recipe: ../pce_resnet18_fmnist.yaml     # the train.py recipe every cell starts from (relative to this file)
    seeds: [0, 1, 2]
    val_fraction: 0.1                       # validation held out of train: cells are compared on it
    test: {split: test, batch_size: 500}    # the reported split, evaluated once per run on its final weights
    launcher: []                            # e.g. [accelerate, launch, --multi_gpu, --num_processes, '2']
    options: {epochs: 2, max_train_samples: 20000}   # train.py options for every cell
    cells:
      - {name: dense, kind: dense, options: {pce_stages: []}}
      - {name: pce top-1}
      - {name: pce top-2, options: {top_k: 2}}

Every run lives in ``<output_dir>/runs/<cell>/seed_<s>/`` (with its recipe ``.yaml`` and ``.log`` beside it). A
run trains with ``--val-fraction``, so its own evaluation (``results.json``) is on images held out of the
training split; then ``scripts/evaluate.py`` evaluates its final weights on the test split
(``eval-<dataset>-<split>.json``). Selection reads the validation numbers only; the test numbers are reported.

Resumable: a run with both files is never rerun, one with ``results.json`` only is evaluated, an interrupted one
resumes from its checkpoint (``--resume auto``). A failed run stops the sweep with its log's last lines; rerun
the same command to go on.

Outputs: ``summary.json`` (``cells``: name, kind, options, values (test top-1 per seed), val_values, mean, std,
seeds, val_mean, val_std, train_time_s, starts_from, total_train_time_s (with the runs it starts from), params,
gmacs, imbalance; ``selection``), ``summary.md`` and
``summary.png`` (top-1 with error bars per cell; test top-1 vs train time).
"""
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from .progress import progress_bar
from .train.recipe import HOLDOUT_SPLIT
from .utils import markdown_table, write_file_atomic

__all__ = ['Cell', 'SweepConfig', 'SweepConfigError', 'SweepError', 'format_summary', 'load_sweep_config', 'run_sweep',
           'summarize']

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / 'scripts'
GOAL_POINTS = 0.3  # the campaign's goal: a PCE cell >= dense + 0.3 top-1 points ...
GOAL_TIME = 1.25  # ... at <= 1.25x the dense run's train time
Runner = Callable[[List[str], Path], int]


class SweepError(RuntimeError):
    """A run of the sweep failed or left bad records; the message names the run, its log and what to do."""


class SweepConfigError(SweepError, ValueError):
    """A bad sweep config; the message names the file and the field."""


@dataclass(frozen=True)
class Cell:
    name: str
    kind: str = 'pce'
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in self.name)


@dataclass(frozen=True)
class SweepConfig:
    path: Path
    recipe: Path
    seeds: Tuple[int, ...]
    cells: Tuple[Cell, ...]
    val_fraction: float = 0.1
    test_split: str = 'test'
    test_batch_size: int = 500
    launcher: Tuple[str, ...] = ()
    options: Dict[str, Any] = field(default_factory=dict)


_KEYS = {'recipe', 'seeds', 'cells', 'val_fraction', 'test', 'launcher', 'options'}
CELL_KEYS = {'name', 'kind', 'options'}
TEMPLATE_FIELDS = {'seed': 0, 'runs': 'runs'}  # what string options may name (see run_recipe)


def load_sweep_config(path: os.PathLike) -> SweepConfig:
    """Read and check a sweep config (see the module docstring). Raises SweepConfigError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError(f'{path}: no such sweep config (see scripts/configs/sweeps/)')
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepConfigError(f'{path}: not valid YAML ({e})') from None
    if not isinstance(raw, dict):
        raise SweepConfigError(f'{path}: must hold a mapping with keys {sorted(_KEYS)}')
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SweepConfigError(f'{path}: unknown keys {unknown}; accepted: {sorted(_KEYS)}')
    for key in ('recipe', 'seeds', 'cells'):
        if key not in raw:
            raise SweepConfigError(f'{path}: needs {key!r}')
    recipe = (path.parent / raw['recipe']).resolve()
    if not recipe.is_file():
        raise SweepConfigError(f'{path}: recipe {raw["recipe"]!r} not found (looked for {recipe})')
    seeds = raw['seeds']
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepConfigError(f'{path}: seeds must be a list of distinct integers, got {seeds!r}')
    cells = []
    for i, item in enumerate(raw['cells'] or []):
        if not isinstance(item, dict) or not isinstance(item.get('name'), str) or set(item) - CELL_KEYS:
            raise SweepConfigError(
                f'{path}: cells[{i}] must be a mapping with name (and optional kind, options), got {item!r}')
        kind = item.get('kind', 'pce')
        if kind not in ('pce', 'dense'):
            raise SweepConfigError(f'{path}: cells[{i}] ({item["name"]}): kind must be pce or dense, got {kind!r}')
        options = dict(item.get('options') or {})
        _check_templates(options, f'{path}: cells[{i}] ({item["name"]})')
        cells.append(Cell(item['name'], kind, options))
    if not cells:
        raise SweepConfigError(f'{path}: cells is empty')
    folders = [c.folder for c in cells]
    if len(set(folders)) != len(folders):
        raise SweepConfigError(
            f'{path}: cell names must differ (also after turning non [A-Za-z0-9-_.] into _): {folders}')
    test = raw.get('test') or {}
    val_fraction = raw.get('val_fraction', 0.1)
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction <= 0.5:
        raise SweepConfigError(f'{path}: val_fraction must be in (0, 0.5], got {val_fraction!r}')
    options = dict(raw.get('options') or {})
    _check_templates(options, f'{path}: options')
    return SweepConfig(path, recipe, tuple(seeds), tuple(cells), float(val_fraction), test.get('split', 'test'),
                       int(test.get('batch_size', 500)), tuple(str(a) for a in raw.get('launcher') or ()), options)


def _fill_templates(options: Dict[str, Any], fields: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with ``{seed}`` / ``{runs}`` in its string values filled from ``fields`` (see run_recipe)."""
    return {k: v.format(**fields) if isinstance(v, str) else v for k, v in options.items()}


def _check_templates(options: Dict[str, Any], where: str) -> None:
    for key, value in options.items():
        try:
            _fill_templates({key: value}, TEMPLATE_FIELDS)
        except (KeyError, IndexError, ValueError) as e:
            raise SweepConfigError(f'{where}: option {key}: {value!r} is not a valid template ({type(e).__name__}: '
                                   f'{e}); it may name {{seed}} and {{runs}} only') from None


# ---------------------------------------------------------------------------------------------------------
# running

def run_dir(output_dir: Path, cell: Cell, seed: int) -> Path:
    return output_dir / 'runs' / cell.folder / f'seed_{seed}'


def run_recipe(cfg: SweepConfig, cell: Cell, seed: int, output_dir: Path) -> Dict[str, Any]:
    """The recipe of one run: the sweep's recipe, its common options, the cell's options, the seed, validation.

    String option values may name ``{seed}`` and ``{runs}`` (``<output_dir>/runs``), so a cell can start from
    another cell's run of the same seed: ``model: '{runs}/dense/seed_{seed}'`` upcycles the dense runs.
    """
    recipe = yaml.safe_load(cfg.recipe.read_text()) or {}
    fields = {'seed': seed, 'runs': str(Path(output_dir).resolve() / 'runs')}
    options = _fill_templates({**cfg.options, **cell.options}, fields)
    return {**recipe, **options, 'seed': seed, 'val_fraction': cfg.val_fraction, 'eval_split': 'test'}


def subprocess_runner(command: List[str], log: Path) -> int:
    """Run ``command`` with its output appended to ``log``; returns the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open('a') as f:
        f.write(f'$ {" ".join(command)}\n')
        f.flush()
        return subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def _completed(results: Path) -> Optional[Dict[str, Any]]:
    if not results.is_file():
        return None
    try:
        record = json.loads(results.read_text())
    except ValueError:
        return None
    return record if record.get('status') == 'completed' else None


def eval_path(run: Path, dataset: str, split: str) -> Path:
    return run / f'eval-{dataset}-{split}.json'  # scripts/evaluate.py's default output for a run folder


def run_sweep(cfg: SweepConfig, output_dir: os.PathLike, runner: Runner = subprocess_runner,
              progress: bool = True, only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train and evaluate every (cell, seed) not done yet, then write and return the summary.

    ``only``: the names of the cells to run (the summary still covers every cell's finished runs), so several
    processes can share one grid, each on its own cells.
    """
    output_dir = Path(output_dir)
    names = [c.name for c in cfg.cells]
    unknown = [n for n in only or () if n not in names]
    if unknown:
        raise SweepConfigError(f'{cfg.path}: no cells named {unknown}; the cells are {names}')
    jobs = [(cell, seed) for cell in cfg.cells if only is None or cell.name in only for seed in cfg.seeds]
    bar = progress_bar(jobs, desc='sweep', unit='run', disable=not progress)
    for cell, seed in bar:
        bar.set_postfix_str(f'{cell.name} seed {seed}')
        _run_one(cfg, output_dir, cell, seed, runner)
    return summarize(cfg, output_dir)


def _run_one(cfg: SweepConfig, output_dir: Path, cell: Cell, seed: int, runner: Runner) -> None:
    run = run_dir(output_dir, cell, seed)
    log = run.with_suffix('.log')
    results = _completed(run / 'results.json')
    if results is None:
        recipe = run.with_suffix('.yaml')
        write_file_atomic(recipe, yaml.safe_dump(run_recipe(cfg, cell, seed, output_dir), sort_keys=False))
        command = [*cfg.launcher] if cfg.launcher else [sys.executable]
        command += [str(SCRIPTS / 'train.py'), '--config', str(recipe), '--output-dir', str(run)]
        if (run / 'checkpoints').is_dir():
            command += ['--resume', 'auto']
        _check(runner(command, log), f'training {cell.name} seed {seed}', log)
        results = _completed(run / 'results.json')
        if results is None:
            raise SweepError(f'training {cell.name} seed {seed} exited 0 but left no completed {run}/results.json; '
                             f'see {log}')
    if results.get('eval_split') != HOLDOUT_SPLIT:
        raise SweepError(f'{run}/results.json was evaluated on {results.get("eval_split")!r}, not on a split held '
                         f'out of train ({HOLDOUT_SPLIT!r}): remove the run folder and rerun the sweep')
    if not eval_path(run, results['dataset'], cfg.test_split).is_file():
        command = [sys.executable, str(SCRIPTS / 'evaluate.py'), '--model', str(run), '--dataset',
                   results['dataset'], '--split', cfg.test_split, '--batch-size', str(cfg.test_batch_size)]
        data_dir = (results.get('config') or {}).get('data_dir')
        command += ['--data-dir', str(data_dir)] if data_dir else []
        _check(runner(command, log), f'evaluating {cell.name} seed {seed} on {cfg.test_split}', log)


def _check(code: int, what: str, log: Path) -> None:
    if code != 0:
        tail = ''.join(log.read_text(errors='replace').splitlines(keepends=True)[-15:]) if log.is_file() else ''
        raise SweepError(f'{what} failed (exit code {code}); the end of {log}:\n{tail}\nFix the cause and rerun the '
                         f'same command: finished runs are kept.')


# ---------------------------------------------------------------------------------------------------------
# summary

def summarize(cfg: SweepConfig, output_dir: os.PathLike) -> Dict[str, Any]:
    """Read every finished run, write summary.json / summary.md / summary.png, return the summary."""
    output_dir = Path(output_dir)
    cells = [_cell_summary(cfg, output_dir, cell) for cell in cfg.cells]
    by_name = {c['name']: c for c in cells}
    for cell, entry in zip(cfg.cells, cells, strict=True):  # a cell started from another costs its runs too
        source = source_cell(cfg, cell)
        entry['starts_from'] = source.name if source else None
        own, before = entry['train_time_s'], by_name[source.name]['train_time_s'] if source else 0.0
        entry['total_train_time_s'] = own + before if own is not None and before is not None else None
    summary = {'config': _repo_path(cfg.path), 'recipe': _repo_path(cfg.recipe), 'seeds': list(cfg.seeds),
               'val_fraction': cfg.val_fraction, 'test_split': cfg.test_split, 'cells': cells,
               'selection': select(cells)}
    write_file_atomic(output_dir / 'summary.json', json.dumps(summary, indent=2) + '\n')
    write_file_atomic(output_dir / 'summary.md', format_summary(summary))
    plot_summary(summary, output_dir / 'summary.png')
    return summary


def _repo_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (a summary reads the same on every machine)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _cell_summary(cfg: SweepConfig, output_dir: Path, cell: Cell) -> Dict[str, Any]:
    values, val_values, times, imbalances, seeds, params, gmacs = [], [], [], [], [], None, None
    for seed in cfg.seeds:
        run = run_dir(output_dir, cell, seed)
        results = _completed(run / 'results.json')
        test = None if results is None else _completed_eval(eval_path(run, results['dataset'], cfg.test_split))
        if test is None:
            continue
        seeds.append(seed)
        values.append(test['top1'])
        val_values.append(results['top1'])
        times.append(results['wall_time_s'])
        params = results.get('num_params')
        imbalance = (results.get('routing_summary') or {}).get('max_imbalance')
        if imbalance is not None:
            imbalances.append(imbalance)
        if gmacs is None:
            gmacs = model_gmacs(run / 'model')
    return {
        'name': cell.name, 'kind': cell.kind, 'options': cell.options, 'seeds': seeds,
        'values': values, 'val_values': val_values, **_stats(values), **_stats(val_values, 'val_'),
        'train_time_s': statistics.fmean(times) if times else None, 'params': params, 'gmacs': gmacs,
        'imbalance': statistics.fmean(imbalances) if imbalances else None,
    }


def source_cell(cfg: SweepConfig, cell: Cell) -> Optional[Cell]:
    """The cell whose runs ``cell`` starts from (a string option ``'{runs}/<folder>/...'``), or None."""
    for value in cell.options.values():
        if isinstance(value, str) and value.startswith('{runs}/'):
            folder = value[len('{runs}/'):].split('/')[0]
            return next((c for c in cfg.cells if c.folder == folder), None)
    return None


def _completed_eval(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _stats(values: Sequence[float], prefix: str = '') -> Dict[str, Optional[float]]:
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) >= 2 else None  # sample std over seeds
    return {f'{prefix}mean': mean, f'{prefix}std': std}


def model_gmacs(model_dir: Path) -> Optional[float]:
    """Multiply-accumulates (G) of one image through a saved model at its input size."""
    if not (model_dir / 'config.json').is_file():
        return None
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import pce_timm  # noqa: F401  (registers the pce_* models)

    model = timm.create_model(f'local-dir:{model_dir}', pretrained=False).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *model.pretrained_cfg['input_size']))
    return round(counter.get_total_flops() / 2e9, 4)


def select(cells: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The campaign's choice, made on validation only (test numbers play no part).

    ``selected``: the PCE cell with the best mean validation top-1 among those that train within the goal's time
    budget (<= 1.25x the first dense cell's train time, counting the runs a cell starts from), checked against the
    goal (test >= dense + 0.3 points); ``best_val``: the best on validation at any cost, with its numbers.
    """
    done = [c for c in cells if c['seeds']]
    pce = [c for c in done if c['kind'] == 'pce']
    dense = next((c for c in done if c['kind'] == 'dense'), None)
    goal = f'test top-1 >= dense + {GOAL_POINTS} points at <= {GOAL_TIME}x its train time'
    if not pce:
        return {'selected': None, 'baseline': dense and dense['name'], 'goal': goal, 'reason': 'no finished PCE cell'}

    def against_dense(cell: Dict[str, Any]) -> Dict[str, Any]:
        numbers = {'val_mean': cell['val_mean'], 'test_mean': cell['mean']}
        if dense is not None:
            total, dense_time = cell['total_train_time_s'], dense['train_time_s']
            numbers.update(test_gain=cell['mean'] - dense['mean'],
                           time_ratio=total / dense_time if total is not None and dense_time else None)
        return numbers

    best = max(pce, key=lambda c: c['val_mean'])
    selection = {'by': 'val_mean', 'goal': goal, 'baseline': dense and dense['name'],
                 'best_val': {'name': best['name'], **against_dense(best)}}
    within = [c for c in pce if dense is None or _within_budget(against_dense(c).get('time_ratio'))]
    if not within:
        return {**selection, 'selected': None, 'goal_met': False,
                'reason': f'no PCE cell trains within {GOAL_TIME}x the dense train time'}
    chosen = max(within, key=lambda c: c['val_mean'])
    numbers = against_dense(chosen)
    goal_met = dense is not None and numbers['test_gain'] >= GOAL_POINTS
    return {**selection, 'selected': chosen['name'], **numbers, 'goal_met': bool(goal_met)}


def _within_budget(time_ratio: Optional[float]) -> bool:
    return time_ratio is not None and time_ratio <= GOAL_TIME


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return '-'
    return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


def format_summary(summary: Dict[str, Any]) -> str:
    cells = summary['cells']
    dense = next((c for c in cells if c['kind'] == 'dense' and c['seeds']), None)
    rows = []
    for c in cells:
        gain = '-' if dense is None or c['mean'] is None else f'{c["mean"] - dense["mean"]:+.2f}'
        time = '-' if c['train_time_s'] is None else f'{c["train_time_s"]:.0f}'
        if c['starts_from'] and c['total_train_time_s'] is not None:
            time = f'{c["total_train_time_s"] - c["train_time_s"]:.0f} + {time}'  # the source run, then this one
        if dense is not None and c['total_train_time_s'] is not None:
            time += f' ({c["total_train_time_s"] / dense["train_time_s"]:.2f}x)'
        rows.append([c['name'], c['kind'], str(len(c['seeds'])), _pm(c['val_mean'], c['val_std']),
                     _pm(c['mean'], c['std']), gain, time, '-' if c['params'] is None else f'{c["params"]:,}',
                     '-' if c['gmacs'] is None else f'{c["gmacs"]:.4f}',
                     '-' if c['imbalance'] is None else f'{c["imbalance"]:.2f}'])
    table = markdown_table(
        ['cell', 'kind', 'seeds', 'val top-1 %', f'{summary["test_split"]} top-1 %', 'vs dense', 'train time s',
         'params', 'GMACs', 'imbalance'], rows, '<<>>>>>>>>')
    s = summary['selection']
    split = summary['test_split']
    if s.get('selected') is None:
        verdict = f'No selection: {s.get("reason")}.'
    else:
        verdict = (f'Selected on validation among the PCE cells within {GOAL_TIME}x the dense train time: '
                   f'**{s["selected"]}** (val {s["val_mean"]:.2f}, {split} {s["test_mean"]:.2f}).')
        if s.get('baseline'):
            verdict += (f' Against {s["baseline"]}: {s["test_gain"]:+.2f} points at {s["time_ratio"]:.2f}x the train '
                        f'time; goal ({s["goal"]}) {"met" if s["goal_met"] else "not met"}.')
    best = s.get('best_val')
    if best and best['name'] != s.get('selected'):
        ratio = f', {best["time_ratio"]:.2f}x the dense train time' if best.get('time_ratio') else ''
        verdict += (f' Best on validation at any cost: {best["name"]} (val {best["val_mean"]:.2f}, {split} '
                    f'{best["test_mean"]:.2f}{ratio}).')
    return (f'{table}\n\nMean ± sample std over seeds; val = the {summary["val_fraction"]:.0%} of the training split '
            f'held out (selection reads only it), {summary["test_split"]} = reported only; train time = the whole '
            f'run (training + per-epoch eval), mean over seeds, a + b for a cell that starts from another cell\'s runs '
            f'(a: those runs; the ratio to dense counts both); imbalance = busiest / least used expert, the largest '
            f'over the PCE layers, mean over seeds.\n\n{verdict}\n')


def plot_summary(summary: Dict[str, Any], path: Path) -> None:
    """top-1 (val and test, mean ± std) per cell, and test top-1 against train time."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cells = [c for c in summary['cells'] if c['seeds']]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={'width_ratios': [3, 2]})
    x = range(len(cells))
    for offset, key, label in ((-0.15, 'val_', 'val (selects)'), (0.15, '', summary['test_split'] + ' (reported)')):
        left.errorbar([i + offset for i in x], [c[f'{key}mean'] for c in cells],
                      yerr=[c[f'{key}std'] or 0 for c in cells], fmt='o', capsize=3, label=label)
    left.set_xticks(list(x), [c['name'] for c in cells], rotation=30, ha='right')
    left.set_ylabel('top-1 %')
    left.legend()
    left.set_title('top-1 per cell (mean ± std over seeds)')
    for c in cells:
        right.errorbar(c['total_train_time_s'], c['mean'], yerr=c['std'] or 0, fmt='s' if c['kind'] == 'dense' else 'o',
                       capsize=3)
        right.annotate(c['name'], (c['total_train_time_s'], c['mean']), textcoords='offset points', xytext=(4, 4),
                       fontsize=8)
    right.set_xlabel('train time per run (s; with the runs a cell starts from)')
    right.set_ylabel(f'{summary["test_split"]} top-1 %')
    right.set_title('accuracy vs cost')
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp.png')
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
