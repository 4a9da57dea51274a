#!/usr/bin/env python
"""Train, measure and release pce_timm's pretrained models (`make release`), reproducibly, on this machine.

    python scripts/make_release.py                      # train (or reuse) both runs, write + install releases
    python scripts/make_release.py --overwrite          # replace existing good releases
    python scripts/make_release.py --only pce           # only pce_resnet18.fmnist (no dense baseline)
    python scripts/make_release.py -- --max-train-samples 512 --epochs 1   # extra scripts/train.py args

What it does, per model (see RELEASES):

1. train with the repo's own trainer and recipe (scripts/configs/pce_resnet18_fmnist_release.yaml) into
   runs/release/<name>. A completed run with the same resolved config is reused; an interrupted one resumes
   from its last checkpoint. Nothing is selected on the test split: the released weights are the final epoch's.
2. measure: params, GMACs (torch's FlopCounterMode, one image), training time from the run's results.json; top-1 /
   top-5 and routing statistics by evaluating the final weights on the test split with this code (the same
   evaluation as scripts/evaluate.py, written to <run>/eval_results.json).
3. write the measured numbers into model_cards/pce_resnet.yaml (atomically; prose fields are kept).
4. write the release folder releases/<name> (pce_timm.hub.write_release: config.json, model.safetensors,
   README.md card rendered from the YAML, results.json, eval_results.json) - atomically; an existing good
   release is only replaced with --overwrite.
5. for Hub models: install the release into the HF cache as pce-timm/<name> (pce_timm.hub.install_into_hf_cache)
   and check, in a fresh HF_HUB_OFFLINE=1 interpreter, that timm.create_model('<name>', pretrained=True) and
   timm.create_model('hf-hub:pce-timm/<name>', pretrained=True) load exactly the released weights.
6. render the README model table (model_cards/render.py --write) if README.md has the table markers, else
   print it.

Uploading is separate: scripts/push_to_hub.py releases/<name> --repo-id pce-timm/<name> (needs a token).
Exit codes: 0 done, 2 bad input / refused (message on stderr), 3 dataset missing, 4 loss diverged, 5 a
release check failed.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO_ROOT / 'scripts' / 'configs' / 'pce_resnet18_fmnist_release.yaml'
DEFAULT_CARDS = REPO_ROOT / 'model_cards' / 'pce_resnet.yaml'
# The dense baseline is the same recipe with no PCE stage: timm BasicBlocks everywhere, same widths and stem.
DENSE_ARGS = ('--pce-stages',)


@dataclass(frozen=True)
class ReleaseSpec:
    """One model make_release trains and releases.

    Attributes:
        key: --only selector.
        name: release folder name (and, for Hub models, the ``arch.tag`` registry name).
        hub: released as a registry tag on the Hub (installed into the HF cache); False: a folder only.
        train_args: scripts/train.py args appended to the recipe.
    """
    key: str
    name: str
    hub: bool
    train_args: Sequence[str] = ()


RELEASES = (
    ReleaseSpec('pce', 'pce_resnet18.fmnist', hub=True),
    # Not a zoo model: a dense ResNet-18 (no experts) that shows what PCE adds under the same recipe. Its folder
    # name says what it is; it is built by the pce_resnet18 entrypoint with pce_stages=[], recorded in its
    # config.json, and loads with timm.create_model('local-dir:releases/<name>', pretrained=True).
    ReleaseSpec('dense', 'resnet18_dense_baseline-fmnist', hub=False, train_args=DENSE_ARGS),
)


class ReleaseRefused(Exception):
    """Bad input or a release that must not be replaced; printed as ``error: ...`` (exit 2)."""


class ReleaseCheckFailed(Exception):
    """A written release does not load back as it should (exit 5)."""

    def __init__(self, message: str):
        super().__init__(f'release check failed: {message}')


# ---------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_extra: List[str] = []
    if '--' in argv:
        i = argv.index('--')
        argv, train_extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 2)[-1])
    parser.add_argument('--recipe', type=Path, default=DEFAULT_RECIPE, help='training recipe (YAML)')
    parser.add_argument('--only', nargs='+', choices=[s.key for s in RELEASES], default=None,
                        help='release only these (default: all)')
    parser.add_argument('--runs-dir', type=Path, default=REPO_ROOT / 'runs' / 'release', help='training runs')
    parser.add_argument('--releases-dir', type=Path, default=REPO_ROOT / 'releases', help='release folders')
    parser.add_argument('--cards', type=Path, default=DEFAULT_CARDS, help='model card YAML to update and render')
    parser.add_argument('--readme', type=Path, default=REPO_ROOT / 'README.md',
                        help='README whose model table is rewritten (only if it has the table markers)')
    parser.add_argument('--cache-dir', type=Path, default=None,
                        help='HF hub cache to install into (default: HF_HUB_CACHE / ~/.cache/huggingface/hub)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing good release folders')
    parser.add_argument('--retrain', action='store_true', help='train again even if a completed run matches')
    parser.add_argument('--no-install', action='store_true', help='do not install into the HF cache')
    parser.add_argument('--no-verify', action='store_true', help='skip the offline load check')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s). On shared cores 1 avoids oversubscription, '
                             'which can slow training several times')
    parser.add_argument('--train-only', action='store_true',
                        help='only train (or resume) and report the numbers; no card, release or cache. Lets '
                             'the runs go in parallel (one process per --only); a later full run reuses them')
    args = parser.parse_args(argv)
    args.train_extra = train_extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from pce_timm.train.cli import run_cli

    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    render = load_renderer()
    return run_cli(lambda: make_release(args, render),
                   extra_errors=[((ReleaseRefused, render.CardDataError), 2), ((ReleaseCheckFailed,), 5)])


def make_release(args: argparse.Namespace, render) -> Dict[str, Path]:
    """All steps for the selected releases; returns ``{name: release folder}``."""
    specs = [s for s in RELEASES if args.only is None or s.key in args.only]
    if not args.recipe.is_file():
        raise ReleaseRefused(f'recipe {args.recipe} does not exist')
    for spec in specs:  # refuse before hours of training, not after
        check_replaceable(args.releases_dir / spec.name, args.overwrite)
    measured = {}
    for i, spec in enumerate(specs, 1):
        banner(f'[{i}/{len(specs)}] {spec.name}: training (recipe {rel(args.recipe)})')
        run_dir = train_run(spec, args)
        measured[spec.key] = measure(spec, run_dir, args)
        print(f'  {spec.name}: top-1 {measured[spec.key]["top1"]:.2f}, top-5 {measured[spec.key]["top5"]:.2f}, '
              f'{measured[spec.key]["params_m"]:.3f} M params, {measured[spec.key]["gmacs"]:.4f} GMACs, '
              f'trained in {measured[spec.key]["train_time_s"] / 60:.1f} min')
    if args.train_only:
        return {}
    banner(f'updating {rel(args.cards)}')
    update_card_yaml(args.cards, specs, measured, args)
    out = {}
    for spec in specs:
        banner(f'writing release {rel(args.releases_dir / spec.name)}')
        out[spec.name] = write_one_release(spec, measured[spec.key], args, render)
    banner('model table')
    print(update_readme_table(args, render))
    return out


def banner(text: str) -> None:
    print(f'\n==> {text}', flush=True)


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- 1. training

def train_argv(spec: ReleaseSpec, args: argparse.Namespace) -> List[str]:
    """The scripts/train.py arguments of one run (the command recorded in the card)."""
    return ['--config', str(args.recipe), *spec.train_args, *args.train_extra]


def train_command(spec: ReleaseSpec, args: argparse.Namespace, run_dir: Path) -> str:
    parts = ['python scripts/train.py', '--config', rel(args.recipe), *spec.train_args, *args.train_extra,
             '--output-dir', rel(run_dir)]
    return ' '.join(parts)


def train_run(spec: ReleaseSpec, args: argparse.Namespace) -> Path:
    """Train ``spec`` into ``runs_dir/name``; reuse a completed run of the same config, resume an interrupted one."""
    from pce_timm.train.config import config_dict
    from pce_timm.train.config import parse_args as parse_train_args
    from pce_timm.train.trainer import train

    run_dir = args.runs_dir / spec.name
    argv = train_argv(spec, args) + ['--output-dir', str(run_dir), '--progress', str(not args.no_progress)]
    wanted = _comparable(config_dict(parse_train_args(argv)))
    results_path = run_dir / 'results.json'
    if results_path.is_file() and not args.retrain:
        done = json.loads(results_path.read_text())
        if done.get('status') == 'completed' and _comparable(done.get('config', {})) == wanted:
            print(f'  reusing the completed run {rel(run_dir)} (same config; --retrain to train again)')
            return run_dir
        raise ReleaseRefused(
            f'{run_dir} holds a completed run of a different config; move it away or pass --retrain')
    if (run_dir / 'checkpoints').is_dir() and not args.retrain:
        print(f'  resuming the interrupted run in {rel(run_dir)}')
        argv += ['--resume', 'auto']
    elif run_dir.exists() and args.retrain:
        _move_aside(run_dir)
    train(parse_train_args(argv))
    return run_dir


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    """A run's config without the keys that do not change the result."""
    ignore = {'output_dir', 'resume', 'progress', 'log_with', 'log_interval', 'checkpoint_every',
              'checkpoint_limit', 'checkpoint_steps', 'workers', 'eval_batch_size', 'config'}
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in ignore}))


def _move_aside(path: Path) -> None:
    aside = path.with_name(f'{path.name}.old-{time.strftime("%Y%m%d-%H%M%S")}')
    os.rename(path, aside)
    print(f'  moved the earlier run to {rel(aside)}')


# ---------------------------------------------------------------- 2. measuring

def measure(spec: ReleaseSpec, run_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Numbers for the card, each with the command that produced it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    results = json.loads((run_dir / 'results.json').read_text())
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
    cmd = train_command(spec, args, run_dir)
    model_ref = f'local-dir:{rel(run_dir / "model")}'
    evaluation, evaluate_cmd, evaluation_path = evaluate_run(run_dir, results, args)
    shape = ', '.join(map(str, input_size))
    return {
        'top1': round(evaluation['top1'], 2),
        'top5': round(evaluation['top5'], 2),
        'params_m': round(params / 1e6, 4),
        'gmacs': round(counter.get_total_flops() / 2e9, 4),
        'img_size': input_size[-1],
        'train_time_s': round(results['wall_time_s'], 1),
        'epochs': results['epochs'],
        'routing': {k: v for k, v in (evaluation.get('routing_summary') or {}).items() if v is not None},
        'results_path': run_dir / 'results.json',
        'eval_results_path': evaluation_path,
        'run_dir': run_dir,
        'train_command': cmd,
        'result_command': evaluate_cmd,
        'params_command': (
            f'python -c "import timm, pce_timm; m = timm.create_model(\'{model_ref}\'); '
            f'print(sum(p.numel() for p in m.parameters()) / 1e6)"'),
        'gmacs_command': (
            f'python -c "import timm, torch, pce_timm; from torch.utils.flop_counter import FlopCounterMode as F; '
            f'm = timm.create_model(\'{model_ref}\').eval(); f = F(display=False); f.__enter__(); '
            f'm(torch.zeros(1, {shape})); f.__exit__(None, None, None); print(f.get_total_flops() / 2e9)"'),
        'routing_command': evaluate_cmd,
    }


def evaluate_run(run_dir: Path, results: Dict[str, Any], args: argparse.Namespace):
    """Evaluate the run's final weights with this code, as ``scripts/evaluate.py`` does.

    The card's numbers come from here rather than from the run's own last evaluation (results.json), so they are
    what the printed command gives on the released weights, also after evaluation itself has changed. The metrics
    are written to ``<run>/eval_results.json``, which the release ships next to the run's results.json.

    Returns:
        The metrics, the command that reproduces them and the JSON file they were written to.
    """
    from pce_timm.hub import EVAL_RESULTS_NAME
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
                                config.get('max_eval_samples'), mixed_precision=precision,
                                progress=not args.no_progress)
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


# ---------------------------------------------------------------- 3. card data

def update_card_yaml(path: Path, specs: Sequence[ReleaseSpec], measured: Dict[str, Dict[str, Any]],
                     args: argparse.Namespace) -> None:
    """Write the measured numbers into the card YAML; leading comments and prose fields are kept."""
    text = path.read_text(encoding='utf-8')
    header = ''.join(line for line in text.splitlines(keepends=True)[:_header_lines(text)])
    data = yaml.safe_load(text)
    entries = {f'{m["model"]}.{m["tag"]}': m for m in data['models']}
    for spec in specs:
        m = measured[spec.key]
        if spec.hub:
            if spec.name not in entries:
                raise ReleaseRefused(f'{path}: no entry for {spec.name} (model + tag); add one first')
            entry = entries[spec.name]
            result = entry['results'][0]
        else:
            pce = entries.get(RELEASES[0].name)
            if pce is None or 'baseline' not in pce:
                raise ReleaseRefused(f'{path}: the {RELEASES[0].name} entry has no baseline section to update')
            entry = pce['baseline']
            result = entry
        entry['params_m'] = {'value': m['params_m'], 'command': m['params_command']}
        entry['gmacs'] = {'value': m['gmacs'], 'command': m['gmacs_command']}
        result['top1'] = {'value': m['top1'], 'command': m['result_command']}
        result['top5'] = {'value': m['top5'], 'command': m['result_command']}
        result['img_size'] = m['img_size']
        entry.setdefault('training', {})['command'] = m['train_command']
        entry['training']['time'] = (f'{m["train_time_s"] / 60:.1f} min for {m["epochs"]} epochs, wall clock on '
                                     f'{_machine()} shared with other jobs')
        if spec.hub:
            routing = {}
            if 'mean_usage_entropy' in m['routing']:
                routing['usage_entropy'] = {'value': m['routing']['mean_usage_entropy'],
                                            'command': m['routing_command']}
            if 'max_imbalance' in m['routing']:
                routing['imbalance'] = {'value': m['routing']['max_imbalance'], 'command': m['routing_command']}
            routing['dead_experts'] = {'value': m['routing'].get('dead_experts', 0), 'command': m['routing_command']}
            result['routing'] = routing
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=118)
    write_text_atomic(path, header + body)


def _header_lines(text: str) -> int:
    lines = text.splitlines()
    n = 0
    while n < len(lines) and (lines[n].startswith('#') or not lines[n].strip()):
        n += 1
    return n


def _machine() -> str:
    return f'{os.cpu_count()} CPU cores'


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with tmp.open('w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- 4. + 5. release folder, cache, check

def check_replaceable(release_dir: Path, overwrite: bool) -> None:
    """Refuse to replace a good release without --overwrite (a broken or partial one may be replaced)."""
    if not release_dir.exists() or overwrite:
        return
    if is_good_release(release_dir):
        raise ReleaseRefused(
            f'{release_dir} already holds a good release; pass --overwrite to replace it (or --only to skip it)')


def is_good_release(release_dir: Path) -> bool:
    from pce_timm.hub import WEIGHTS_NAME, ReleaseError, check_safetensors, release_files

    try:
        release_files(release_dir)
        check_safetensors(release_dir / WEIGHTS_NAME)
    except (ReleaseError, OSError):
        return False
    return True


def load_run_model(run_dir: Path):
    """The run's exported model, its weights checked first (truncated / mismatched files: a ReleaseError naming it)."""
    from pce_timm.hub import find_release_source, load_model_from_source

    return load_model_from_source(find_release_source(run_dir)).eval()


def write_one_release(spec: ReleaseSpec, m: Dict[str, Any], args: argparse.Namespace, render) -> Path:
    from pce_timm.hub import EVAL_RESULTS_NAME, RESULTS_NAME, install_into_hf_cache, write_release
    from pce_timm.models import hub_id

    check_replaceable(args.releases_dir / spec.name, args.overwrite)
    run_model = load_run_model(m['run_dir'])
    entries = render.load_entries([args.cards])
    if spec.hub:
        model = tag_model_with_run_weights(spec.name, run_model, m['run_dir'])
        entry = render.find_entry(entries, spec.name)
        card = render.render_hub_card(entry)
        extras = {**render.card_assets(entry)}
    else:
        model = run_model
        pce = render.find_entry(entries, RELEASES[0].name)
        card = render.render_baseline_card(pce, spec.name)
        extras = {}
    extras[RESULTS_NAME] = m['results_path']
    extras[EVAL_RESULTS_NAME] = m['eval_results_path']
    release_dir = write_release(model, args.releases_dir / spec.name, model_card=card, extra_files=extras)
    print(f'  wrote {rel(release_dir)}: {", ".join(sorted(p.name for p in release_dir.iterdir()))}')
    if spec.hub and not args.no_install:
        repo_id = hub_id(spec.name)
        snapshot = install_into_hf_cache(release_dir, repo_id, args.cache_dir)
        print(f'  installed into the HF cache as {repo_id}: {snapshot}')
        if not args.no_verify:
            verify_offline(spec.name, repo_id, release_dir, args.cache_dir)
            print(f"  checked offline: timm.create_model('{spec.name}', pretrained=True) and "
                  f"timm.create_model('hf-hub:{repo_id}', pretrained=True) load the released weights")
    return release_dir


def tag_model_with_run_weights(name: str, run_model, run_dir: Path):
    """``timm.create_model(name)`` (the tag's own architecture and cfg) holding the run's weights, loaded strictly.

    Fails if the recipe trained another architecture than the tag's arch args, or with other preprocessing.
    """
    import timm

    model = timm.create_model(name, pretrained=False)
    try:
        model.load_state_dict(run_model.state_dict(), strict=True)
    except RuntimeError as e:
        raise ReleaseCheckFailed(
            f'{run_dir} did not train the architecture of {name!r} (pce_resnet.py TAG_ARCH_ARGS vs the recipe): '
            f'{str(e).splitlines()[0]} ...') from e
    for key in ('input_size', 'mean', 'std', 'num_classes', 'crop_pct', 'interpolation'):
        tag_value, run_value = model.pretrained_cfg.get(key), run_model.pretrained_cfg.get(key)
        if _norm(tag_value) != _norm(run_value):
            raise ReleaseCheckFailed(
                f'{name!r} default cfg has {key}={tag_value!r} but {run_dir} trained with {run_value!r}; '
                f'make the tag cfg in pce_resnet.py match the recipe')
    return model.eval()


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(round(v, 6) if isinstance(v, float) else v for v in value)
    return round(value, 6) if isinstance(value, float) else value


_VERIFY = r'''
import sys, safetensors.torch, timm, torch, pce_timm
name, repo_id, weights = sys.argv[1:4]
expected = safetensors.torch.load_file(weights)
for source in (name, 'hf-hub:' + repo_id):
    state = timm.create_model(source, pretrained=True).state_dict()
    assert state.keys() == expected.keys(), f'{source}: other keys than {weights}'
    bad = [k for k in state if not torch.equal(state[k], expected[k])]
    assert not bad, f'{source}: weights differ from {weights}: {bad[:3]}'
print('ok')
'''


def verify_offline(name: str, repo_id: str, release_dir: Path, cache_dir: Optional[Path]) -> None:
    """Load ``name`` and ``hf-hub:repo_id`` with HF_HUB_OFFLINE=1 in a fresh interpreter; compare to the release."""
    from pce_timm.hub import WEIGHTS_NAME, hf_cache_dir

    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(hf_cache_dir(cache_dir)))
    proc = subprocess.run([sys.executable, '-c', _VERIFY, name, repo_id, str(release_dir / WEIGHTS_NAME)],
                          env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0 or proc.stdout.strip() != 'ok':
        tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
        raise ReleaseCheckFailed(f'offline load of {name} / hf-hub:{repo_id}: {tail}')


# ---------------------------------------------------------------- 6. README table

def update_readme_table(args: argparse.Namespace, render) -> str:
    entries = render.load_entries(render.default_card_files(args.cards.parent))
    table = render.render_model_table(entries)
    readme = args.readme.read_text(encoding='utf-8') if args.readme.is_file() else ''
    if render.TABLE_START not in readme or render.TABLE_END not in readme:
        return (f'{rel(args.readme)} has no {render.TABLE_START} / {render.TABLE_END} markers; not touched. '
                f'The table (python model_cards/render.py --write fills it once the markers exist):\n\n{table}')
    updated = render.inject_model_table(readme, table, args.readme)
    if updated != readme:
        write_text_atomic(args.readme, updated)
    return f'{rel(args.readme)}: model table {"updated" if updated != readme else "already up to date"}:\n\n{table}'


def load_renderer():
    """model_cards/render.py lives beside the package, not in it: load it by path."""
    from pce_timm.utils import load_module_from_path
    return load_module_from_path(REPO_ROOT / 'model_cards' / 'render.py', 'pce_model_cards_render')


if __name__ == '__main__':
    sys.exit(main())
