"""Training configuration: a typed :class:`TrainConfig` built by :func:`parse_args` from one argparse parser
whose defaults a YAML recipe sets (timm ``train.py``'s trick).

:class:`TrainConfig` holds one frozen section per concept, and the training code takes the section it needs:
``create_optimizer(cfg.optim, model)``, ``Criterion(cfg.loss, ...)``, ``build_loaders(cfg.data, ...)``. Each
recipe key / flag is a field of exactly one section, under its own name (only ``model`` is ``cfg.model.name``:
``cfg.model`` is the section); :data:`SECTIONS` lists them. ``config.yaml`` stays the flat mapping of recipe
keys (:func:`config_dict`), so ``--config`` and ``--resume`` read any run folder's config back.

Precedence, lowest to highest: the parser's defaults, the saved ``config.yaml`` of a run being resumed, the
``--config`` recipe, the command line. Recipe keys are the parser's ``dest`` names (``batch_size``, not
``--batch-size``); the one key without a flag is ``phases`` (see :mod:`.schedule`). Values from a recipe are
checked like command-line values: unknown keys, wrong types, values outside ``choices`` and out-of-range
numbers raise :class:`RecipeError` naming the key, the value and what is accepted.
"""
import argparse
import dataclasses
import difflib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .schedule import Phase, parse_phases

__all__ = [
    'RecipeError', 'TrainConfig', 'ModelConfig', 'DataConfig', 'AugmentConfig', 'OptimConfig', 'ScheduleConfig',
    'LossConfig', 'CheckpointConfig', 'LogConfig', 'SECTIONS', 'build_parser', 'parse_args', 'load_recipe',
    'validate_args', 'config_dict', 'save_config', 'model_kwargs',
]

CONFIG_FILE = 'config.yaml'
MIXED_PRECISION = ('no', 'fp16', 'bf16')
TRACKERS = ('csv', 'tensorboard', 'wandb', 'mlflow', 'aim', 'comet_ml', 'clearml', 'dvclive', 'swanlab', 'trackio')
# Model kwargs that go to timm.create_model only when set (dense timm models do not accept the PCE ones).
MODEL_KWARGS = ('num_experts', 'top_k', 'router', 'pce_stages', 'patch_size', 'attention', 'stem_type',
                'drop_rate', 'drop_path_rate')


class RecipeError(ValueError):
    """A recipe or command-line value is unknown, of the wrong type or out of range."""


# ---------------------------------------------------------------------------------------------------------
# the typed config: one frozen section per concept; the parser (below) is the one source of the defaults

TopK = Union[int, str, None]  # k experts per patch, 'soft' (all experts, weighted) or None (the model's default)


@dataclass(frozen=True)
class ModelConfig:
    """What to build and how it starts: the timm name, its kwargs, pretrained weights, frozen parts, key init."""
    name: str  # recipe key / flag: model
    pretrained: bool
    num_experts: Optional[int]
    top_k: TopK
    router: Optional[str]
    pce_stages: Optional[List[int]]
    patch_size: Optional[int]
    attention: Optional[bool]
    stem_type: Optional[str]
    drop_rate: Optional[float]
    drop_path_rate: Optional[float]
    freeze: Optional[List[str]]
    model_kwargs: Optional[Dict[str, Any]]
    key_init: str
    key_init_batches: int


@dataclass(frozen=True)
class DataConfig:
    """Which data, how much of it, and the loaders' batch sizes and workers."""
    dataset: str
    data_dir: Optional[str]
    eval_split: str
    max_train_samples: Optional[int]
    max_eval_samples: Optional[int]
    workers: int
    img_size: Optional[int]
    in_chans: Optional[int]
    batch_size: int
    eval_batch_size: int


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (timm / pce_timm.data), mixup / cutmix, and the eval centre crop."""
    no_aug: bool
    scale: Sequence[float]
    ratio: Sequence[float]
    hflip: float
    color_jitter: float
    aa: Optional[str]
    reprob: float
    crop_pct: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    black_patches_prob: float
    channel_boost_prob: float

    @property
    def mixes(self) -> bool:
        """Whether mixup or cutmix is on (then the targets are soft)."""
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class OptimConfig:
    """timm's optimizer, gradient clipping and accumulation."""
    opt: str
    lr: float
    weight_decay: float
    momentum: float
    opt_eps: Optional[float]
    opt_betas: Optional[Sequence[float]]
    clip_grad: Optional[float]
    grad_accum_steps: int


@dataclass(frozen=True)
class ScheduleConfig:
    """How long, the lr schedule (timm's scheduler) and the phases (:mod:`.schedule`)."""
    epochs: int
    sched: str
    sched_on_updates: bool
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    decay_epochs: Optional[float]
    decay_rate: float
    cooldown_epochs: int
    phases: List[Phase]


@dataclass(frozen=True)
class LossConfig:
    """Label smoothing and the weights of the aux routing losses."""
    smoothing: float
    aux_entropy: float
    aux_balance: float
    aux_z_loss: float


@dataclass(frozen=True)
class CheckpointConfig:
    """The run folder, resuming, and when checkpoints are saved and how many are kept."""
    output_dir: str
    resume: Optional[str]
    checkpoint_every: int
    checkpoint_steps: Optional[int]
    checkpoint_limit: int


@dataclass(frozen=True)
class LogConfig:
    """Trackers, step-logging interval and progress bars."""
    log_with: Optional[List[str]]
    log_interval: int
    progress: bool


# section attribute of TrainConfig -> its dataclass
SECTIONS: Dict[str, type] = {
    'model': ModelConfig, 'data': DataConfig, 'augment': AugmentConfig, 'optim': OptimConfig,
    'schedule': ScheduleConfig, 'loss': LossConfig, 'checkpoint': CheckpointConfig, 'log': LogConfig,
}
_RENAMED = {'model': 'name'}  # recipe key -> field name, where they differ
_TOP_LEVEL = ('seed', 'mixed_precision', 'config')


@functools.lru_cache(maxsize=None)
def _flat_index() -> Dict[str, Tuple[Optional[str], str]]:
    """Recipe key -> (section attribute or None for a top-level field, field name)."""
    index: Dict[str, Tuple[Optional[str], str]] = {key: (None, key) for key in _TOP_LEVEL}
    fields_to_keys = {v: k for k, v in _RENAMED.items()}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index[fields_to_keys.get(f.name, f.name)] = (section, f.name)
    return index


@dataclass(frozen=True)
class TrainConfig:
    """One training run's resolved configuration (:func:`parse_args` builds it; :func:`config_dict` flattens it).

    ``seed`` seeds everything (model init, loaders, K-Means); ``mixed_precision`` goes to accelerate; ``config``
    is the recipe file that was read (not saved). Code written against the flat recipe keys may read them as
    attributes (``cfg.lr`` is ``cfg.optim.lr``, ``cfg.dataset`` is ``cfg.data.dataset``); the exception is
    ``model``, the section (the name is ``cfg.model.name``). New code takes the section it needs.
    """
    model: ModelConfig
    data: DataConfig
    augment: AugmentConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    loss: LossConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    seed: int
    mixed_precision: str
    config: Optional[str] = None

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> 'TrainConfig':
        """Build from a mapping of every recipe key (a validated namespace's ``vars``) to its value.

        Raises:
            RecipeError: a key is missing or unknown.
        """
        index = _flat_index()
        missing, unknown = sorted(set(index) - set(values) - {'config'}), sorted(set(values) - set(index))
        if missing or unknown:
            raise RecipeError(f'config: missing keys {missing}, unknown keys {unknown}')
        parts: Dict[str, Dict[str, Any]] = {section: {} for section in SECTIONS}
        top: Dict[str, Any] = {}
        for key, value in values.items():
            section, name = index[key]
            (top if section is None else parts[section])[name] = value
        return cls(**{section: SECTIONS[section](**kwargs) for section, kwargs in parts.items()}, **top)

    def flat(self) -> Dict[str, Any]:
        """Every recipe key -> its value (the inverse of :meth:`from_flat`)."""
        return {key: getattr(self, key) if section is None else getattr(getattr(self, section), name)
                for key, (section, name) in _flat_index().items()}

    def replace(self, **changes: Any) -> 'TrainConfig':
        """A copy with some recipe keys changed: ``cfg.replace(pretrained=True, lr=1e-4)``."""
        unknown = sorted(set(changes) - set(_flat_index()))
        if unknown:
            raise RecipeError(f'config: unknown keys {unknown}')
        return TrainConfig.from_flat({**self.flat(), **changes})

    def __getattr__(self, key: str) -> Any:
        # only called for names that are not fields: the flat recipe keys of the sections
        location = _flat_index().get(key)
        if location is None or location[0] is None:
            raise AttributeError(f'{type(self).__name__} has no attribute or recipe key {key!r}')
        section, name = location
        return getattr(getattr(self, section), name)


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
                       'a run folder or a checkpoint folder')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--mixed-precision', default='no', choices=MIXED_PRECISION)
    group.add_argument('--log-with', nargs='*', default=['csv', 'tensorboard'],
                       help=f'trackers, any of {TRACKERS}')
    group.add_argument('--log-interval', type=int, default=50, help='log train loss every N optimizer updates')
    group.add_argument('--checkpoint-every', type=int, default=1, help='save a checkpoint every N epochs')
    group.add_argument('--checkpoint-steps', type=int, default=None,
                       help='also save every N optimizer updates (exact mid-epoch resume needs --workers 0)')
    group.add_argument('--checkpoint-limit', type=int, default=2, help='keep the N newest checkpoints')
    group.add_argument('--progress', type=_bool, nargs='?', const=True, default=True, help='tqdm progress bars')
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


def parse_args(
        argv: Optional[Sequence[str]] = None,
        parser: Optional[argparse.ArgumentParser] = None,
) -> TrainConfig:
    """Parse ``argv`` with recipe defaults into a :class:`TrainConfig`, validated (see :func:`validate_args`).

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
    args = parser.parse_args(argv)
    return TrainConfig.from_flat(vars(validate_args(args, parser)))


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
    _require(args.clip_grad is None or args.clip_grad > 0, 'clip_grad', args.clip_grad, 'a number > 0 or null')
    _require(0 < args.crop_pct <= 1, 'crop_pct', args.crop_pct, 'a fraction in (0, 1]')
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


def model_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """The ``timm.create_model`` kwargs set in ``model`` (unset ones are left to the model's defaults)."""
    kwargs = {key: getattr(model, key) for key in MODEL_KWARGS if getattr(model, key, None) is not None}
    if 'pce_stages' in kwargs:
        kwargs['pce_stages'] = tuple(kwargs['pce_stages'])
    kwargs.update(model.model_kwargs or {})
    return kwargs


def config_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The resolved config as the flat mapping of recipe keys with plain YAML/JSON-able values (phases as
    mappings): what ``config.yaml`` and ``results.json`` hold, and what ``--config`` / ``--resume`` read back."""
    out = {}
    for key, value in sorted(cfg.flat().items()):
        if key == 'phases':
            value = [phase.to_dict() for phase in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    out.pop('config', None)
    return out


def save_config(cfg: TrainConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``<output_dir>/config.yaml`` (a recipe: ``--config`` reads it back)."""
    path = Path(output_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w') as f:
        yaml.safe_dump(config_dict(cfg), f, sort_keys=False)
    return path


def flat_hparams(config: Dict[str, Any]) -> Dict[str, Any]:
    """Config flattened to the scalar types trackers accept (lists and mappings become JSON strings)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def list_of_str(value: Any) -> List[str]:
    return [value] if isinstance(value, str) else list(value or [])
