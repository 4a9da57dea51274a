"""``make release``: train, measure and release pce_timm's pretrained models, reproducibly, on this machine.

Per model of ``RELEASES``:

1. train with the repo's own trainer and recipe into ``runs/release/<name>`` (``pce_timm.train.parse_args`` +
   ``train``). A completed run with the same resolved config is reused; an interrupted one resumes from its
   last checkpoint. Nothing is selected on the test split: the released weights are the final epoch's.
2. measure: params, GMACs (torch's FlopCounterMode, one image), training time from the run's results.json;
   top-1 / top-5 and routing statistics by evaluating the final weights on the test split with this code (the
   same evaluation as scripts/evaluate.py, written to ``<run>/eval_results.json``).
3. write the measured numbers into its family's card YAML (``cards.update_measured``; prose fields are kept).
4. write the release folder ``releases/<name>`` (``pce_timm.hub.write_release``: config.json, model.safetensors,
   README.md rendered from the YAML, results.json, eval_results.json); an existing good release is only
   replaced with ``overwrite``.
5. for Hub models: install the release into the HF cache as ``pce-timm/<name>`` and check in a fresh offline
   interpreter (:mod:`pce_timm.release.verify`) that the tag and ``hf-hub:`` load exactly the released weights.
6. render the README model table if README.md has the table markers, else return it.

Each model has its recipe (``scripts/configs/*_release.yaml``) and its family's card file in ``model_cards/``. Paths
default to this checkout (the recipes, ``model_cards/`` and ``README.md`` are repository files).
"""
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from pce_timm.hub import (
    EVAL_RESULTS_NAME,
    RESULTS_NAME,
    WEIGHTS_NAME,
    ReleaseError,
    check_safetensors,
    find_release_source,
    hf_cache_dir,
    hub_id,
    install_into_hf_cache,
    load_model_from_source,
    release_files,
    write_release,
)
from pce_timm.utils import write_file_atomic

from . import render
from .cards import CARD_DIR, CardNumbers, Measured, default_card_files, find_entry, load_entries, update_measured

__all__ = [
    'RECIPE_DIR', 'RELEASES', 'REPO_ROOT', 'ReleaseCheckFailed', 'ReleaseConfig', 'ReleaseRefused', 'ReleaseSpec',
    'RunNumbers', 'make_release',
]

REPO_ROOT = CARD_DIR.parent  # the checkout this package runs from
RECIPE_DIR = REPO_ROOT / 'scripts' / 'configs'
# The dense baseline is the same recipe with no PCE stage: timm BasicBlocks everywhere, same widths and stem.
DENSE_ARGS = ('--pce-stages',)
# config keys that do not change what a run trains (a completed run that differs only in these is reused)
_RUN_KEYS_IGNORED = {
    'output_dir', 'resume', 'progress', 'log_with', 'log_interval', 'checkpoint_every', 'checkpoint_limit',
    'checkpoint_steps', 'workers', 'eval_batch_size', 'config'}


@dataclass(frozen=True)
class ReleaseSpec:
    """One model make_release trains and releases.

    Attributes:
        key: the ``only`` selector.
        name: release folder name (and, for Hub models, the ``arch.tag`` registry name).
        hub: released as a registry tag on the Hub (installed into the HF cache); False: a folder only.
        recipe: its training recipe (YAML).
        cards: its family's card file name in the card folder (``model_cards/``).
        train_args: scripts/train.py args appended to the recipe.
        card_entry: the card entry (``model.tag``) its numbers go to; another entry's name makes this run that
            entry's dense baseline. Default: ``name``.
    """
    key: str
    name: str
    hub: bool
    recipe: Path
    cards: str
    train_args: Sequence[str] = ()
    card_entry: Optional[str] = None

    @property
    def entry(self) -> str:
        return self.card_entry or self.name

    @property
    def is_baseline(self) -> bool:
        return self.entry != self.name


RESNET_RECIPE = RECIPE_DIR / 'pce_resnet18_fmnist_release.yaml'
HYBRID_RECIPE = RECIPE_DIR / 'pce_vit_hybrid_tiny_d4_r18_fmnist_release.yaml'
RELEASES = (
    ReleaseSpec('pce', 'pce_resnet18.fmnist', hub=True, recipe=RESNET_RECIPE, cards='pce_resnet.yaml'),
    # Not a zoo model: a dense ResNet-18 (no experts) that shows what PCE adds under the same recipe. Its folder
    # name says what it is; it is built by the pce_resnet18 entrypoint with pce_stages=[], recorded in its
    # config.json, and loads with timm.create_model('local-dir:releases/<name>', pretrained=True).
    ReleaseSpec('dense', 'resnet18_dense_baseline-fmnist', hub=False, recipe=RESNET_RECIPE, cards='pce_resnet.yaml',
                train_args=DENSE_ARGS, card_entry='pce_resnet18.fmnist'),
    ReleaseSpec('vit-pce', 'pce_vit_hybrid_tiny_d4_r18.fmnist', hub=True, recipe=HYBRID_RECIPE,
                cards='pce_vit_hybrid.yaml'),
    # the same ViT on a dense CNN stem (pce_stages=[]): a folder, like the dense ResNet
    ReleaseSpec('vit-dense', 'vit_hybrid_tiny_d4_r18_dense_baseline-fmnist', hub=False, recipe=HYBRID_RECIPE,
                cards='pce_vit_hybrid.yaml', train_args=DENSE_ARGS, card_entry='pce_vit_hybrid_tiny_d4_r18.fmnist'),
)


@dataclass(frozen=True)
class ReleaseConfig:
    """What ``make_release`` does and where (``scripts/make_release.py`` builds it from its options).

    Attributes:
        recipe: a training recipe (YAML) for every selected release instead of each one's own; None: their own.
        only: keys of the ``RELEASES`` to make; None: all.
        runs_dir, releases_dir: training runs / release folders.
        cards: the card folder: each release's family YAML is updated there, and the README table rendered
            from every YAML in it.
        readme: README whose model table is rewritten (only if it has the table markers).
        cache_dir: HF hub cache to install into; None: huggingface_hub's default.
        overwrite: replace existing good release folders.
        retrain: train again even if a completed run of the same config exists.
        install: install Hub models into the HF cache.
        verify: after installing, check the offline load in a fresh interpreter.
        progress: progress bars while training / evaluating.
        train_only: only train (or resume) and report; no card, release or cache.
        train_extra: extra scripts/train.py arguments for every run.
    """
    recipe: Optional[Path] = None
    only: Optional[Tuple[str, ...]] = None
    runs_dir: Path = REPO_ROOT / 'runs' / 'release'
    releases_dir: Path = REPO_ROOT / 'releases'
    cards: Path = CARD_DIR
    readme: Path = REPO_ROOT / 'README.md'
    cache_dir: Optional[Path] = None
    overwrite: bool = False
    retrain: bool = False
    install: bool = True
    verify: bool = True
    progress: bool = True
    train_only: bool = False
    train_extra: Tuple[str, ...] = ()


@dataclass(frozen=True)
class RunNumbers:
    """A finished run's numbers for the card, and the files the release ships."""
    card: CardNumbers
    run_dir: Path
    results_path: Path
    eval_results_path: Path
    train_time_s: float


class ReleaseRefused(Exception):
    """Bad input or a release that must not be replaced; printed as ``error: ...`` (exit 2)."""


class ReleaseCheckFailed(Exception):
    """A written release does not load back as it should (exit 5)."""

    def __init__(self, message: str):
        super().__init__(f'release check failed: {message}')


def make_release(cfg: ReleaseConfig) -> Dict[str, Path]:
    """All steps for the selected releases; returns ``{name: release folder}`` (empty with ``train_only``)."""
    specs = [s for s in RELEASES if cfg.only is None or s.key in cfg.only]
    check_inputs(specs, cfg)  # refuse before hours of training, not after
    measured = {}
    for i, spec in enumerate(specs, 1):
        _banner(f'[{i}/{len(specs)}] {spec.name}: training (recipe {rel(recipe_of(spec, cfg))})')
        run_dir = train_run(spec, cfg)
        m = measured[spec.key] = measure(spec, run_dir, cfg)
        print(f'  {spec.name}: top-1 {m.card.top1.value:.2f}, top-5 {m.card.top5.value:.2f}, '
              f'{m.card.params_m.value:.3f} M params, {m.card.gmacs.value:.4f} GMACs, '
              f'trained in {m.train_time_s / 60:.1f} min')
    if cfg.train_only:
        return {}
    for cards in dict.fromkeys(spec.cards for spec in specs):
        _banner(f'updating {rel(cfg.cards / cards)}')
        update_measured(cfg.cards / cards, [measured[spec.key].card for spec in specs if spec.cards == cards])
    out = {}
    for spec in specs:
        _banner(f'writing release {rel(cfg.releases_dir / spec.name)}')
        out[spec.name] = write_one_release(spec, measured[spec.key], cfg)
    _banner('model table')
    print(update_readme_table(cfg.cards, cfg.readme))
    return out


def check_inputs(specs: Sequence[ReleaseSpec], cfg: ReleaseConfig) -> None:
    """Refuse missing recipes or card files, one ``recipe`` for releases of different recipes, and good releases
    that would be replaced without ``overwrite``."""
    if cfg.recipe is not None and len({spec.recipe for spec in specs}) > 1:
        raise ReleaseRefused(
            f'--recipe {cfg.recipe} would replace the recipe of every selected release, but '
            f'{", ".join(spec.key for spec in specs)} have different ones (different architectures); '
            f'select the releases of one recipe with --only')
    for spec in specs:
        recipe, cards = recipe_of(spec, cfg), cfg.cards / spec.cards
        if not recipe.is_file():
            raise ReleaseRefused(f'recipe {recipe} (of {spec.key}) does not exist')
        if not cards.is_file():
            raise ReleaseRefused(f'card file {cards} (of {spec.key}) does not exist; --cards takes the card folder '
                                 f'(default model_cards/), which holds {spec.cards}')
        check_replaceable(cfg.releases_dir / spec.name, cfg.overwrite)


def recipe_of(spec: ReleaseSpec, cfg: ReleaseConfig) -> Path:
    return spec.recipe if cfg.recipe is None else cfg.recipe


def rel(path: Path) -> str:
    """``path`` relative to the current folder when inside it (as recorded in commands), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _banner(text: str) -> None:
    print(f'\n==> {text}', flush=True)


# ---------------------------------------------------------------- 1. training

def train_argv(spec: ReleaseSpec, cfg: ReleaseConfig) -> List[str]:
    """The scripts/train.py arguments of one run (the command recorded in the card)."""
    return ['--config', str(recipe_of(spec, cfg)), *spec.train_args, *cfg.train_extra]


def train_command(spec: ReleaseSpec, cfg: ReleaseConfig, run_dir: Path) -> str:
    parts = ['python scripts/train.py', '--config', rel(recipe_of(spec, cfg)), *spec.train_args, *cfg.train_extra,
             '--output-dir', rel(run_dir)]
    return ' '.join(parts)


def train_run(spec: ReleaseSpec, cfg: ReleaseConfig) -> Path:
    """Train ``spec`` into ``runs_dir/name``; reuse a completed run of the same config, resume an interrupted one."""
    from pce_timm.train import parse_args, train
    from pce_timm.train.config import config_dict

    run_dir = cfg.runs_dir / spec.name
    argv = train_argv(spec, cfg) + ['--output-dir', str(run_dir), '--progress', str(cfg.progress)]
    wanted = _comparable(config_dict(parse_args(argv)))
    results_path = run_dir / RESULTS_NAME
    if results_path.is_file() and not cfg.retrain:
        done = json.loads(results_path.read_text())
        if done.get('status') == 'completed' and _comparable(done.get('config', {})) == wanted:
            print(f'  reusing the completed run {rel(run_dir)} (same config; --retrain to train again)')
            return run_dir
        raise ReleaseRefused(
            f'{run_dir} holds a completed run of a different config; move it away or pass --retrain')
    if (run_dir / 'checkpoints').is_dir() and not cfg.retrain:
        print(f'  resuming the interrupted run in {rel(run_dir)}')
        argv += ['--resume', 'auto']
    elif run_dir.exists() and cfg.retrain:
        _move_aside(run_dir)
    train(parse_args(argv))
    return run_dir


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    """A run's config without the keys that do not change the result."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _RUN_KEYS_IGNORED}))


def _move_aside(path: Path) -> None:
    aside = path.with_name(f'{path.name}.old-{time.strftime("%Y%m%d-%H%M%S")}')
    os.rename(path, aside)
    print(f'  moved the earlier run to {rel(aside)}')


# ---------------------------------------------------------------- 2. measuring

def measure(spec: ReleaseSpec, run_dir: Path, cfg: ReleaseConfig) -> RunNumbers:
    """Numbers for the card, each with the command that produced it."""
    from torch.utils.flop_counter import FlopCounterMode

    results = json.loads((run_dir / RESULTS_NAME).read_text())
    model = load_run_model(run_dir)
    input_size = tuple(model.pretrained_cfg['input_size'])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    params = sum(p.numel() for p in model.parameters())
    if params != results['num_params']:
        raise ReleaseCheckFailed(f'{run_dir}: the exported model has {params} params, the run {results["num_params"]}')
    last = results['history'][-1]
    if last['epoch'] != results['config']['epochs'] or last['top1'] != results['top1']:
        raise ReleaseCheckFailed(f'{run_dir}/results.json: top-1 is not the final epoch\'s')
    evaluation, evaluate_cmd, evaluation_path = evaluate_run(run_dir, results, cfg)
    model_ref = f'local-dir:{rel(run_dir / "model")}'
    shape = ', '.join(map(str, input_size))
    params_cmd = (f'python -c "import timm, pce_timm; m = timm.create_model(\'{model_ref}\'); '
                  f'print(sum(p.numel() for p in m.parameters()) / 1e6)"')
    gmacs_cmd = (f'python -c "import timm, torch, pce_timm; from torch.utils.flop_counter import FlopCounterMode as F; '
                 f'm = timm.create_model(\'{model_ref}\').eval(); f = F(display=False); f.__enter__(); '
                 f'm(torch.zeros(1, {shape})); f.__exit__(None, None, None); print(f.get_total_flops() / 2e9)"')
    train_time_s = round(results['wall_time_s'], 1)
    card = CardNumbers(
        name=spec.entry,
        baseline=spec.is_baseline,
        params_m=Measured(round(params / 1e6, 4), params_cmd),
        gmacs=Measured(round(counter.get_total_flops() / 2e9, 4), gmacs_cmd),
        top1=Measured(round(evaluation['top1'], 2), evaluate_cmd),
        top5=Measured(round(evaluation['top5'], 2), evaluate_cmd),
        img_size=input_size[-1],
        train_command=train_command(spec, cfg, run_dir),
        train_time=(f'{train_time_s / 60:.1f} min for {results["epochs"]} epochs, wall clock on '
                    f'{os.cpu_count()} CPU cores shared with other jobs'),
        routing=None if spec.is_baseline else _routing_numbers(evaluation, evaluate_cmd),
    )
    return RunNumbers(card, run_dir, run_dir / RESULTS_NAME, evaluation_path, train_time_s)


def _routing_numbers(evaluation: Dict[str, Any], command: str) -> Dict[str, Measured]:
    summary = {k: v for k, v in (evaluation.get('routing_summary') or {}).items() if v is not None}
    routing = {}
    if 'mean_usage_entropy' in summary:
        routing['usage_entropy'] = Measured(summary['mean_usage_entropy'], command)
    if 'max_imbalance' in summary:
        routing['imbalance'] = Measured(summary['max_imbalance'], command)
    routing['dead_experts'] = Measured(summary.get('dead_experts', 0), command)
    return routing


def evaluate_run(run_dir: Path, results: Dict[str, Any], cfg: ReleaseConfig) -> Tuple[Dict[str, Any], str, Path]:
    """Evaluate the run's final weights with this code, as ``scripts/evaluate.py`` does.

    The card's numbers come from here rather than from the run's own last evaluation (results.json), so they are
    what the printed command gives on the released weights, also after evaluation itself has changed. The metrics
    are written to ``<run>/eval_results.json``, which the release ships next to the run's results.json.

    Returns:
        The metrics, the command that reproduces them and the JSON file they were written to.
    """
    from pce_timm.train.evaluation import evaluate_model, save_results

    config = results['config']
    dataset, split, batch_size = config['dataset'], results['eval_split'], config['eval_batch_size']
    precision = config.get('mixed_precision', 'no')  # as trained (and one Accelerator state per process)
    options = [] if config.get('data_dir') is None else ['--data-dir', str(config['data_dir'])]
    options += [] if config.get('max_eval_samples') is None else ['--max-samples', str(config['max_eval_samples'])]
    options += [] if precision == 'no' else ['--mixed-precision', precision]
    command = ' '.join(['python scripts/evaluate.py', '--model', rel(run_dir), '--dataset', dataset, '--split', split,
                        '--batch-size', str(batch_size), *options])
    print(f'  evaluating the final weights: {command}')
    evaluation = evaluate_model(str(run_dir), dataset, split, config.get('data_dir'), batch_size,
                                config.get('max_eval_samples'), mixed_precision=precision, progress=cfg.progress)
    if evaluation['num_params'] != results['num_params']:
        raise ReleaseCheckFailed(f'{run_dir}: evaluated {evaluation["num_params"]} params, the run has '
                                 f'{results["num_params"]}')
    evaluation.pop('eval_time_s')  # not a property of the weights; without it a re-release is byte-identical
    evaluation['model'] = rel(run_dir)  # no machine-specific absolute path in a released file
    path = save_results(evaluation, run_dir / EVAL_RESULTS_NAME)
    if round(evaluation['top1'], 2) != round(results['top1'], 2):
        print(f'  note: top-1 {evaluation["top1"]:.2f} now, {results["top1"]:.2f} in the run\'s own final evaluation '
              '(evaluation has changed since; the card reports the number measured now)')
    return evaluation, command, path


# ---------------------------------------------------------------- 4. + 5. release folder, cache, check

def check_replaceable(release_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a good release without ``overwrite`` (a broken or partial one may be replaced)."""
    if release_dir.exists() and not overwrite and is_good_release(release_dir):
        raise ReleaseRefused(
            f'{release_dir} already holds a good release; pass --overwrite to replace it (or --only to skip it)')


def is_good_release(release_dir: Path) -> bool:
    try:
        release_files(release_dir)
        check_safetensors(release_dir / WEIGHTS_NAME)
    except (ReleaseError, OSError):
        return False
    return True


def load_run_model(run_dir: Path) -> torch.nn.Module:
    """The run's exported model, its weights checked first (truncated / mismatched files: a ReleaseError naming it)."""
    return load_model_from_source(find_release_source(run_dir)).eval()


def write_one_release(spec: ReleaseSpec, m: RunNumbers, cfg: ReleaseConfig) -> Path:
    """Write ``releases/<name>`` from the run and the updated card; install and check Hub models."""
    check_replaceable(cfg.releases_dir / spec.name, cfg.overwrite)
    run_model = load_run_model(m.run_dir)
    entry = find_entry(load_entries([cfg.cards / spec.cards]), spec.entry)
    if spec.is_baseline:
        model, card, extras = run_model, render.render_baseline_card(entry, spec.name), {}
    else:
        model = tag_model_with_run_weights(spec.name, run_model, m.run_dir)
        card, extras = render.render_hub_card(entry), dict(render.card_assets(entry))
    extras[RESULTS_NAME] = m.results_path
    extras[EVAL_RESULTS_NAME] = m.eval_results_path
    release_dir = write_release(model, cfg.releases_dir / spec.name, model_card=card, extra_files=extras)
    print(f'  wrote {rel(release_dir)}: {", ".join(sorted(p.name for p in release_dir.iterdir()))}')
    if spec.hub and cfg.install:
        repo_id = hub_id(spec.name)
        snapshot = install_into_hf_cache(release_dir, repo_id, cfg.cache_dir)
        print(f'  installed into the HF cache as {repo_id}: {snapshot}')
        if cfg.verify:
            from .verify import OfflineLoadError, verify_offline  # a module run with -m: not imported by the package

            try:
                verify_offline(spec.name, repo_id, release_dir / WEIGHTS_NAME, hf_cache_dir(cfg.cache_dir))
            except OfflineLoadError as e:
                raise ReleaseCheckFailed(str(e)) from e
            print(f"  checked offline: timm.create_model('{spec.name}', pretrained=True) and "
                  f"timm.create_model('hf-hub:{repo_id}', pretrained=True) load the released weights")
    return release_dir


def tag_model_with_run_weights(name: str, run_model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """``timm.create_model(name)`` (the tag's own architecture and cfg) holding the run's weights, loaded strictly.

    Fails if the recipe trained another architecture than the tag's arch args, or with other preprocessing.
    """
    import timm

    model = timm.create_model(name, pretrained=False)
    try:
        model.load_state_dict(run_model.state_dict(), strict=True)
    except RuntimeError as e:
        raise ReleaseCheckFailed(
            f'{run_dir} did not train the architecture of {name!r} (TAG_ARCH_ARGS in its model file vs the recipe): '
            f'{str(e).splitlines()[0]} ...') from e
    for key in ('input_size', 'mean', 'std', 'num_classes', 'crop_pct', 'interpolation'):
        tag_value, run_value = model.pretrained_cfg.get(key), run_model.pretrained_cfg.get(key)
        if _norm(tag_value) != _norm(run_value):
            raise ReleaseCheckFailed(
                f'{name!r} default cfg has {key}={tag_value!r} but {run_dir} trained with {run_value!r}; '
                f'make the tag cfg in its model file (pce_timm/models/) match the recipe')
    return model.eval()


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(round(v, 6) if isinstance(v, float) else v for v in value)
    return round(value, 6) if isinstance(value, float) else value


# ---------------------------------------------------------------- 6. README table

def update_readme_table(cards: Path, readme: Path) -> str:
    """Rewrite README's model table from every family YAML in the card folder ``cards``; returns what happened + the
    table."""
    table = render.render_model_table(load_entries(default_card_files(cards)))
    text = readme.read_text(encoding='utf-8') if readme.is_file() else ''
    if render.TABLE_START not in text or render.TABLE_END not in text:
        return (f'{rel(readme)} has no {render.TABLE_START} / {render.TABLE_END} markers; not touched. '
                f'The table (python model_cards/render.py --write fills it once the markers exist):\n\n{table}')
    updated = render.inject_model_table(text, table, readme)
    if updated != text:
        write_file_atomic(readme, updated)
    return f'{rel(readme)}: model table {"updated" if updated != text else "already up to date"}:\n\n{table}'
