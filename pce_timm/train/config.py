"""Training configuration: the typed :class:`TrainConfig` that :func:`parse_args` builds from argv and a YAML
recipe (flags, recipe files and their checks: :mod:`.recipe`).

:class:`TrainConfig` holds one frozen section per concept, and the training code takes the section it needs:
``create_optimizer(cfg.optim, model)``, ``Criterion(cfg.loss, ...)``, ``build_loaders(cfg.data, ...)``. Each
recipe key / flag is a field of exactly one section, under its own name (only ``model`` is ``cfg.model.name``:
``cfg.model`` is the section); :data:`SECTIONS` lists them. ``config.yaml`` stays the flat mapping of recipe
keys (:func:`config_dict`), so ``--config`` and ``--resume`` read any run folder's config back.
"""
import argparse
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .recipe import (  # noqa: F401  (the recipe names stay importable from here, as the scripts do)
    CONFIG_FILE,
    MIXED_PRECISION,
    RecipeError,
    build_parser,
    load_recipe,
    parse_namespace,
    validate_args,
)
from .schedule import Phase

__all__ = [
    'RecipeError', 'TrainConfig', 'ModelConfig', 'DataConfig', 'AugmentConfig', 'OptimConfig', 'ScheduleConfig',
    'LossConfig', 'CheckpointConfig', 'LogConfig', 'SECTIONS', 'build_parser', 'parse_args', 'load_recipe',
    'validate_args', 'config_dict', 'save_config', 'model_kwargs',
]

# Model kwargs that go to timm.create_model only when set (dense timm models do not accept the PCE ones).
MODEL_KWARGS = ('num_experts', 'top_k', 'router', 'pce_stages', 'patch_size', 'attention', 'stem_type',
                'drop_rate', 'drop_path_rate', 'choice', 'balance', 'bias_update_rate', 'bias_update')


# ---------------------------------------------------------------------------------------------------------
# the typed config: one frozen section per concept; the parser (.recipe) is the one source of the defaults

TopK = Union[int, str, None]  # k experts per patch, 'soft' (all experts, weighted) or None (the model's default)


@dataclass(frozen=True)
class ModelConfig:
    """What to build and how it starts: the timm name, its kwargs, pretrained weights, frozen parts, key init."""
    name: str  # recipe key / flag: model
    pretrained: bool
    num_experts: Optional[int]
    top_k: TopK
    router: Optional[str]
    choice: Optional[str]  # 'token' | 'expert' (None: the model's default, token)
    balance: Optional[str]  # 'loss' | 'bias' (None: the model's default, loss)
    bias_update_rate: Optional[float]
    bias_update: Optional[str]  # 'proportional' | 'sign' (None: the model's default, sign)
    pce_stages: Optional[List[int]]
    patch_size: Optional[int]
    attention: Optional[bool]
    stem_type: Optional[str]
    drop_rate: Optional[float]
    drop_path_rate: Optional[float]
    freeze: Optional[List[str]]
    model_kwargs: Optional[Dict[str, Any]]
    channels_last: bool  # the model and its inputs in channels-last memory (timm train.py's --channels-last)
    key_init: str
    key_init_batches: int


@dataclass(frozen=True)
class DataConfig:
    """Which data, how much of it, and the loaders' batch sizes and workers."""
    dataset: str
    data_dir: Optional[str]
    eval_split: str
    val_fraction: Optional[float]
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


def parse_args(
        argv: Optional[Sequence[str]] = None,
        parser: Optional[argparse.ArgumentParser] = None,
) -> TrainConfig:
    """Parse ``argv`` (flags and a ``--config`` recipe, see :mod:`.recipe`) into a validated :class:`TrainConfig`.

    ``parser`` defaults to :func:`~.recipe.build_parser` (``scripts/finetune.py`` passes one with other defaults).

    The model is built once on the meta device (:func:`.models.check_model_args`), so model arguments it cannot
    be built with, or a patch size larger than its PCE maps at the run's input size, fail here too.

    Raises:
        RecipeError: For any bad recipe or argument value (the CLIs print it as ``error: ...``).
    """
    cfg = TrainConfig.from_flat(vars(parse_namespace(argv, parser)))
    _check_model(cfg)
    return cfg


def _check_model(cfg: TrainConfig) -> None:
    """:func:`.models.check_model_args` at the input the run will feed (classification datasets only)."""
    from pce_timm.data import dataset_info

    from .models import check_model_args

    try:
        info = dataset_info(cfg.data.dataset)
    except ValueError:
        return  # a detection / segmentation set: its scripts build their own models
    size = cfg.data.img_size
    check_model_args(cfg.model, info['num_classes'], cfg.data.in_chans or info['in_chans'],
                     (size, size) if size else tuple(info['img_size']))


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
            value[-1].pop('epochs')  # the last phase takes the rest: a resumed run may change `epochs`
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    out.pop('config', None)
    return out


def save_config(cfg: TrainConfig, output_dir: str | os.PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the resolved config to ``<output_dir>/config.yaml`` (a recipe: ``--config`` reads it back).

    ``extra``: recipe keys of a script's own parser beyond :class:`TrainConfig`'s (the dense scripts' ``arch``).
    """
    path = Path(output_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w') as f:
        yaml.safe_dump({**config_dict(cfg), **(extra or {})}, f, sort_keys=False)
    return path


def flat_hparams(config: Dict[str, Any]) -> Dict[str, Any]:
    """Config flattened to the scalar types trackers accept (lists and mappings become JSON strings)."""
    out: Dict[str, Any] = {}
    for key, value in config.items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out
