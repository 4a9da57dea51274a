"""Recipes and flags: one argparse parser whose defaults a YAML recipe sets (timm ``train.py``'s trick), checked
into a flat namespace of recipe keys. :mod:`.config` turns that into the typed :class:`~.config.TrainConfig`.

Precedence, lowest to highest: the parser's defaults, the saved ``config.yaml`` of a run being resumed, the
``--config`` recipe, the command line. Recipe keys are the parser's ``dest`` names (``batch_size``, not
``--batch-size``); the one key without a flag is ``phases`` (see :mod:`.schedule`). Values from a recipe are
checked like command-line values: unknown keys, wrong types, values outside ``choices`` and out-of-range
numbers raise :class:`RecipeError` naming the key, the value and what is accepted.
"""
import argparse
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from .schedule import parse_phases

__all__ = ['RecipeError', 'CONFIG_FILE', 'MIXED_PRECISION', 'TRACKERS', 'build_parser', 'load_recipe',
           'parse_namespace', 'validate_args']

CONFIG_FILE = 'config.yaml'
MIXED_PRECISION = ('no', 'fp16', 'bf16')
HOLDOUT_SPLIT = 'train-holdout'  # the eval split of a run with --val-fraction: held out of the training split
TRACKERS = ('csv', 'tensorboard', 'wandb', 'mlflow', 'aim', 'comet_ml', 'clearml', 'dvclive', 'swanlab', 'trackio')


class RecipeError(ValueError):
    """A recipe or command-line value is unknown, of the wrong type or out of range."""


def _top_k(value: str) -> Any:
    """``--top-k``: an int k (sparse, k experts per patch) or 'soft' (all experts, weighted)."""
    if isinstance(value, str) and value.strip().lower() in ('soft', 'none', 'all'):
        return 'soft'
    return int(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'on'):
        return True
    if text in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(f'expected a boolean (true/false), got {value!r}')


def _key_value(text: str) -> Any:
    """``key=value`` of ``--model-kwargs``; the value is parsed as YAML (``3``, ``0.1``, ``[1, 2]``, ``true``)."""
    if '=' not in text:
        raise ValueError(f'expected key=value, got {text!r}')
    key, value = text.split('=', 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    """The full training parser; ``scripts/train.py`` and ``scripts/finetune.py`` extend it."""
    parser = argparse.ArgumentParser(
        description='Train a pce_timm (or any timm) model with accelerate.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', '-c', default=None, metavar='YAML',
                        help='recipe whose keys (argument dest names + phases) set the defaults below')

    group = parser.add_argument_group('data')
    group.add_argument('--dataset', default=None, help='dataset name (pce_timm.data.list_datasets())')
    group.add_argument('--data-dir', default=None, help='local folder holding the dataset (else searched)')
    group.add_argument('--eval-split', default='test', help='split evaluated after each epoch and at the end')
    group.add_argument('--val-fraction', type=float, default=None,
                       help="hold out this share of each class of the training split (every round(1/f)-th image, no "
                            "randomness) and evaluate on it instead of --eval-split (recorded as 'train-holdout'): "
                            'choose recipes on it, report the test split only (scripts/evaluate.py, sweep.py)')
    group.add_argument('--max-train-samples', type=int, default=None, help='train on a fixed random subset')
    group.add_argument('--max-eval-samples', type=int, default=None, help='evaluate on a fixed random subset')
    group.add_argument('--workers', type=int, default=0, help='DataLoader worker processes per rank')
    group.add_argument('--img-size', type=int, default=None, help='input size (default: the dataset native size)')
    group.add_argument('--in-chans', type=int, default=None, help='model input channels (default: the dataset)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default=None,
                       help='timm model name; or trained weights to start from: local-dir:DIR, hf-hub:ID, a run '
                            'folder, a model folder or a checkpoint folder')
    group.add_argument('--pretrained', type=_bool, nargs='?', const=True, default=False,
                       help='load the pretrained weights of --model')
    group.add_argument('--num-experts', type=int, default=None)
    group.add_argument('--top-k', type=_top_k, default=None, help="k experts per patch, or 'soft'")
    group.add_argument('--router', default=None, choices=('cosine', 'mlp', 'positional', 'uniform'))
    group.add_argument('--choice', default=None, choices=('token', 'expert'),
                       help='token: each patch picks its top-k experts; expert: each expert picks its top patches '
                            'of every image (expert choice)')
    group.add_argument('--balance', default=None, choices=('loss', 'bias'),
                       help='loss: the load-balance aux loss (aux_balance); bias: loss-free balancing bias, '
                            'updated after every step (no load-balance loss for those layers)')
    group.add_argument('--bias-update-rate', type=float, default=None,
                       help="step of the balance bias per update (balance: bias), in logit units")
    group.add_argument('--pce-stages', type=int, nargs='*', default=None, help='stages whose convs are PCE')
    group.add_argument('--patch-size', type=int, default=None)
    group.add_argument('--attention', type=_bool, nargs='?', const=True, default=None)
    group.add_argument('--stem-type', default=None)
    group.add_argument('--drop-rate', type=float, default=None)
    group.add_argument('--drop-path-rate', type=float, default=None)
    group.add_argument('--freeze', nargs='*', default=None, choices=('experts', 'router', 'backbone'),
                       help='keep these parts unchanged for the whole run (fine-tuning)')
    group.add_argument('--model-kwargs', type=_key_value, nargs='*', default=None, metavar='KEY=VALUE',
                       help='further timm.create_model kwargs (in a recipe: a mapping)')
    group.add_argument('--channels-last', type=_bool, nargs='?', const=True, default=False,
                       help='train and evaluate with the model and its inputs in channels-last memory')

    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', type=int, default=10)
    group.add_argument('--batch-size', '-b', type=int, default=128, help='per-process batch size')
    group.add_argument('--eval-batch-size', type=int, default=None, help='default: 2 x batch size')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--opt', default='adamw', help='timm optimizer name (timm.optim.list_optimizers())')
    group.add_argument('--lr', type=float, default=1e-3)
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--opt-eps', type=float, default=None)
    group.add_argument('--opt-betas', type=float, nargs=2, default=None)
    group.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    group.add_argument('--sched', default='cosine', help="timm scheduler name, or 'none'")
    group.add_argument('--sched-on-updates', type=_bool, nargs='?', const=True, default=True,
                       help='step the schedule per optimizer update (else per epoch)')
    group.add_argument('--warmup-epochs', type=float, default=0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--decay-epochs', type=float, default=None)
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')

    group = parser.add_argument_group('augmentation (passed to timm / pce_timm.data)')
    group.add_argument('--no-aug', type=_bool, nargs='?', const=True, default=False)
    group.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area')
    group.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), help='random-resized-crop aspect')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--color-jitter', type=float, default=0.0)
    group.add_argument('--aa', default=None, help="timm auto-augment, e.g. 'rand-m9-mstd0.5'")
    group.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    group.add_argument('--crop-pct', type=float, default=1.0, help='eval centre-crop fraction')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (> 0 enables)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (> 0 enables)')
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--black-patches-prob', type=float, default=0.0)
    group.add_argument('--channel-boost-prob', type=float, default=0.0)

    group = parser.add_argument_group('routing')
    group.add_argument('--key-init', default='kmeans', choices=('kmeans', 'none'),
                       help='fit cosine-router keys by K-Means on real patch embeddings before training')
    group.add_argument('--key-init-batches', type=int, default=4)
    group.add_argument('--aux-entropy', type=float, default=0.0, help='weight of the router entropy loss')
    group.add_argument('--aux-balance', type=float, default=0.01, help='weight of the load-balance loss')
    group.add_argument('--aux-z-loss', type=float, default=0.0, help='weight of the router z-loss')
    group.add_argument('--phases', type=yaml.safe_load, default=None,
                       help='training phases as YAML/JSON (normally set in the recipe)')

    group = parser.add_argument_group('run')
    group.add_argument('--output-dir', default=None, help='run folder (default: runs/<model>-<dataset>)')
    group.add_argument('--resume', default=None, help="'auto' (latest checkpoint of --output-dir, if any), "
                       'a run folder or a checkpoint folder; checkpoints are unpickled: resume only your own or '
                       'trusted ones')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--mixed-precision', default='no', choices=MIXED_PRECISION)
    group.add_argument('--log-with', nargs='*', default=['csv', 'tensorboard'],
                       help=f'trackers, any of {TRACKERS}')
    group.add_argument('--log-interval', type=int, default=50, help='log train loss every N optimizer updates')
    group.add_argument('--checkpoint-every', type=int, default=1, help='save a checkpoint every N epochs')
    group.add_argument('--checkpoint-steps', type=int, default=None,
                       help='also save every N optimizer updates (exact mid-epoch resume needs --workers 0)')
    group.add_argument('--checkpoint-limit', type=int, default=2, help='keep the N newest checkpoints')
    group.add_argument('--progress', type=_bool, nargs='?', const=True, default=True,
                       help='progress bars: live on a terminal, a line every 30 s in a log file (pce_timm.progress)')
    return parser


def _actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ('help', argparse.SUPPRESS)}


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """Run a recipe value through the action's type, like the command line would (YAML reads '1e-3' as str)."""
    if value is None or action.type is None or action.type is yaml.safe_load:
        return value
    try:
        if isinstance(value, (list, tuple)):
            return [action.type(v) if isinstance(v, str) else v for v in value]
        if action.type is _key_value:
            return value
        if action.type in (int, float) and isinstance(value, bool):
            raise ValueError('a boolean')
        if isinstance(value, str) or action.type is _bool or action.type is _top_k:
            return action.type(value)
        if action.type is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f'{value} is not an integer')
            return int(value)
        if action.type is float and isinstance(value, int):
            return float(value)
        return value
    except (TypeError, ValueError) as e:
        name = getattr(action.type, '__name__', str(action.type)).lstrip('_')
        raise RecipeError(f'{key}: {value!r} is not a valid {name} ({e})') from None


def load_recipe(path: str | os.PathLike, parser: Optional[argparse.ArgumentParser] = None) -> Dict[str, Any]:
    """Read a YAML recipe and return its values converted like command-line values.

    Raises:
        RecipeError: The file is missing or not a mapping, or a key is unknown (close matches are suggested).
    """
    parser = parser or build_parser()
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f'config: recipe file {str(path)!r} does not exist')
    with path.open() as f:
        try:
            recipe = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f'config: {path} is not valid YAML: {e}') from None
    if not isinstance(recipe, dict):
        raise RecipeError(f'config: {path} must hold a mapping of keys to values, got {type(recipe).__name__}')
    actions = _actions(parser)
    values = {}
    for key, value in recipe.items():
        dest = str(key).replace('-', '_')
        if dest not in actions or dest == 'config':
            close = difflib.get_close_matches(dest, list(actions), n=3)
            hint = f' Did you mean {", ".join(close)}?' if close else ''
            raise RecipeError(f'{path}: unknown key {key!r}.{hint} Accepted keys: {", ".join(sorted(actions))}')
        if dest == 'model_kwargs' and isinstance(value, dict):
            values[dest] = dict(value)
            continue
        values[dest] = _convert(actions[dest], dest, value)
    return values


def parse_namespace(
        argv: Optional[Sequence[str]] = None,
        parser: Optional[argparse.ArgumentParser] = None,
) -> argparse.Namespace:
    """Parse ``argv`` with recipe defaults into the flat namespace of recipe keys, validated (:func:`validate_args`).

    Raises:
        RecipeError: For any bad recipe or argument value (the CLIs print it as ``error: ...``).
    """
    parser = parser or build_parser()
    pre, _ = parser.parse_known_args(argv)
    defaults: Dict[str, Any] = {}
    resumed = _resumed_config(pre)
    if resumed is not None:
        defaults.update(load_recipe(resumed, parser))
        defaults.pop('resume', None)
    if pre.config:
        defaults.update(load_recipe(pre.config, parser))
    parser.set_defaults(**defaults)
    args = validate_args(parser.parse_args(argv), parser)
    if resumed is not None:
        _check_resume_changes(resumed, load_recipe(resumed, parser), args, parser)
    return args


# What a resumed run may change: how long it runs (the last phase takes the extra epochs) and how it is
# watched and saved. Anything else would make config.yaml and results.json describe a run that never happened.
RESUME_MAY_CHANGE = frozenset({
    'epochs', 'output_dir', 'resume', 'config', 'progress', 'log_interval', 'log_with', 'workers',
    'eval_batch_size', 'checkpoint_every', 'checkpoint_steps', 'checkpoint_limit',
})


def _check_resume_changes(path: Path, saved: Dict[str, Any], args: argparse.Namespace,
                          parser: argparse.ArgumentParser) -> None:
    """Refuse a resume whose recipe differs from the run's saved config.yaml (other than RESUME_MAY_CHANGE)."""
    saved = vars(validate_args(argparse.Namespace(**{**vars(args), **saved}), parser))
    differ = []
    for key in sorted(saved):
        if key in RESUME_MAY_CHANGE:
            continue
        old, new = _comparable(key, saved[key]), _comparable(key, getattr(args, key, None))
        if old != new:
            differ.append(f'{key} ({old!r} in the run, {new!r} now)')
    if differ:
        raise RecipeError(
            f'resume: the run in {path.parent} was trained with other settings than these: {"; ".join(differ)}. '
            f'A resumed run keeps its recipe (only {", ".join(sorted(RESUME_MAY_CHANGE - {"config", "resume"}))} '
            f'may change): drop those flags, or start a new run in another --output-dir (--model {path.parent} '
            f'starts it from this run\'s weights).')


def _comparable(key: str, value: Any) -> Any:
    if key == 'phases' and value:
        phases = [p.to_dict() if hasattr(p, 'to_dict') else dict(p) for p in value]
        phases[-1].pop('epochs', None)  # the last phase takes the rest of `epochs`, which may change
        return phases
    if isinstance(value, tuple):
        return list(value)
    return value


def _resumed_config(pre: argparse.Namespace) -> Optional[Path]:
    """The saved config of the run named by ``--resume`` (a run folder or one of its checkpoints), if any."""
    if not pre.resume or pre.resume == 'auto':
        candidates = [Path(pre.output_dir)] if pre.resume == 'auto' and pre.output_dir else []
    else:
        path = Path(pre.resume)
        candidates = [path, path.parent.parent]
    return next((c / CONFIG_FILE for c in candidates if (c / CONFIG_FILE).is_file()), None)


def _require(condition: bool, key: str, value: Any, accepted: str) -> None:
    if not condition:
        raise RecipeError(f'{key}: got {value!r}; accepted: {accepted}')


def _check_names(args: argparse.Namespace) -> None:
    """Unknown model, dataset, optimizer or scheduler names, and top_k > num_experts, as one clear error each."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    from pce_timm.data.registry import get_dataset_spec, list_datasets

    from .models import resolve_model_source

    try:
        model, checkpoint = resolve_model_source(args.model)  # run / model / checkpoint folders -> local-dir:
    except FileNotFoundError as e:
        raise RecipeError(f'model: {e}') from None
    source, name = parse_model_name(model) if checkpoint is None else ('checkpoint', str(checkpoint))
    if source == 'local-dir' and not (Path(name) / 'config.json').is_file():
        raise RecipeError(f'model: {args.model!r}: {name} holds no config.json (a model folder saved by a run: '
                          f'<run>/model, or a release folder)')
    if source is None:
        arch, _ = split_model_name_tag(name)
        if not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            hint = f' Did you mean {", ".join(close)}?' if close else ''
            raise RecipeError(f'model: {args.model!r} is not a timm model.{hint} Accepted: a timm model name '
                              f"(timm.list_models(), timm.list_models('pce_*')), local-dir:DIR, hf-hub:ID, or a "
                              f'run / model / checkpoint folder')
    try:
        get_dataset_spec(args.dataset)
    except ValueError:
        from pce_timm.data.dense import DENSE_DATASETS, dense_dataset_name

        if dense_dataset_name(args.dataset) not in DENSE_DATASETS:  # detection / segmentation sets
            raise RecipeError(f'dataset: {args.dataset!r} is not a dataset pce_timm knows; accepted: '
                              f'{", ".join(list_datasets())} (classification), {", ".join(DENSE_DATASETS)} '
                              f'(detection / segmentation)') from None
    from timm.optim import list_optimizers

    optimizers = list_optimizers()
    if args.opt.lower() not in optimizers and args.opt.lower().split('_')[-1] not in optimizers:  # lookahead_adamw
        close = difflib.get_close_matches(args.opt.lower(), optimizers, n=3)
        hint = f' (did you mean {", ".join(close)}?)' if close else ''
        raise RecipeError(f'opt: {args.opt!r} is not a timm optimizer{hint}; accepted: timm.optim.list_optimizers()')
    if args.sched != 'none':
        import torch
        from timm.scheduler import create_scheduler_v2

        try:  # timm has no list of its schedulers: ask it about this one
            create_scheduler_v2(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), sched=args.sched,
                                num_epochs=2)
        except ValueError as e:
            raise RecipeError(f'sched: {args.sched!r}: {e} Accepted: none, cosine, tanh, step, multistep, plateau, '
                              f'poly, constant, wsd, rsqrt (timm.scheduler.create_scheduler_v2)') from None
    if isinstance(args.top_k, int) and args.num_experts is not None and args.top_k > args.num_experts:
        raise RecipeError(f'top_k: {args.top_k} is more than num_experts={args.num_experts}; accepted: 1..'
                          f'{args.num_experts} or soft')


def validate_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Check ranges and choices (argparse does not check defaults that come from a recipe); fill derived values."""
    parser = parser or build_parser()
    for dest, action in _actions(parser).items():
        value = getattr(args, dest, None)
        values = value if isinstance(value, (list, tuple)) and action.nargs in ('*', '+') else [value]
        for item in values:
            if action.choices is not None and item is not None and item not in action.choices:
                _require(False, dest, item, ', '.join(map(str, action.choices)))
    _require(bool(args.model), 'model', args.model, 'a timm model name (e.g. pce_resnet18), local-dir:DIR, hf-hub:ID')
    _require(bool(args.dataset), 'dataset', args.dataset, 'a dataset name (pce_timm.data.list_datasets())')
    _check_names(args)  # before any data is loaded or model built
    for key in ('epochs', 'batch_size', 'grad_accum_steps', 'key_init_batches', 'log_interval', 'checkpoint_every',
                'checkpoint_limit'):
        value = getattr(args, key)
        _require(isinstance(value, int) and value >= 1, key, value, 'an integer >= 1')
    for key in ('max_train_samples', 'max_eval_samples', 'eval_batch_size', 'checkpoint_steps', 'num_experts',
                'patch_size', 'img_size'):
        value = getattr(args, key)
        _require(value is None or (isinstance(value, int) and value >= 1), key, value, 'an integer >= 1 or null')
    _require(args.workers >= 0, 'workers', args.workers, 'an integer >= 0')
    _require(args.lr > 0, 'lr', args.lr, 'a number > 0')
    for key in ('weight_decay', 'aux_entropy', 'aux_balance', 'aux_z_loss', 'min_lr', 'warmup_lr', 'warmup_epochs',
                'mixup', 'cutmix', 'smoothing', 'color_jitter', 'cooldown_epochs'):
        value = getattr(args, key)
        _require(value >= 0, key, value, 'a number >= 0')
    for key in ('hflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'black_patches_prob', 'channel_boost_prob',
                'smoothing'):
        value = getattr(args, key)
        _require(0 <= value <= 1, key, value, 'a probability in [0, 1]')
    if args.val_fraction is not None:
        _require(0 < args.val_fraction <= 0.5, 'val_fraction', args.val_fraction, 'a fraction in (0, 0.5] or null')
        _require(args.eval_split in ('test', HOLDOUT_SPLIT), 'eval_split', args.eval_split,
                 f"the default (with --val-fraction the eval split is {HOLDOUT_SPLIT!r}, held out of train)")
        args.eval_split = HOLDOUT_SPLIT
    _require(args.clip_grad is None or args.clip_grad > 0, 'clip_grad', args.clip_grad, 'a number > 0 or null')
    _require(0 < args.crop_pct <= 1, 'crop_pct', args.crop_pct, 'a fraction in (0, 1]')
    _require(args.bias_update_rate is None or args.bias_update_rate >= 0, 'bias_update_rate', args.bias_update_rate,
             'a number >= 0 or null')
    top_k = args.top_k
    _require(top_k is None or top_k == 'soft' or (isinstance(top_k, int) and top_k >= 1), 'top_k', top_k,
             "an integer >= 1, 'soft' or null")
    for tracker in args.log_with or []:
        _require(tracker in TRACKERS, 'log_with', tracker, ', '.join(TRACKERS))
    if args.resume not in (None, 'auto') and not Path(args.resume).exists():
        raise RecipeError(f'resume: {args.resume!r} does not exist; accepted: auto, a run folder or a '
                          'checkpoint folder')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise RecipeError(f'batch_size: mixup/cutmix need an even batch size, got {args.batch_size}')
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        args.model_kwargs = dict(args.model_kwargs)
    try:
        args.phases = parse_phases(args.phases, args.epochs)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    if args.output_dir is None:
        if args.resume not in (None, 'auto'):
            path = Path(args.resume)
            args.output_dir = str(path if (path / 'checkpoints').is_dir() else path.parent.parent)
        else:
            name = args.model.split(':')[-1].rstrip('/').replace('/', '_')
            args.output_dir = str(Path('runs') / f'{name}-{args.dataset}')
    return args
