"""Preprocessing built by timm (`resolve_data_config` + `create_transform`), plus grayscale handling and the PCE
augmentations.

The pipeline is `ConvertImageMode` (PIL -> `L` for 1-channel models, `RGB` for 3) followed by timm's transform;
for training, `ChannelBoost` and `BlackPatches` are inserted after `ToTensor` and before `Normalize` (values in
[0, 1], so "black" is 0 in pixel space).
"""
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from .augment import BlackPatches, ChannelBoost, check_prob

__all__ = ['ConvertImageMode', 'create_dataset_transform', 'resolve_in_chans']

# create_transform kwargs that resolve_data_config owns; pass them and they override the model's pretrained_cfg.
DATA_CONFIG_KEYS = ('input_size', 'img_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
_MODES = {1: 'L', 3: 'RGB'}


class ConvertImageMode:
    """Convert a PIL image to `mode` (`L` or `RGB`) if it is not already; grayscale data sets are mixed in practice."""

    def __init__(self, mode: str):
        if mode not in _MODES.values():
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}.")
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mode={self.mode!r})'


def resolve_in_chans(model: nn.Module) -> int | None:
    """Input channels of a model: its `in_chans` attribute, else the first Conv2d's `in_channels`, else None."""
    in_chans = getattr(model, 'in_chans', None)
    if isinstance(in_chans, int):
        return in_chans
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else None


def _match_channels(name: str, values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    # A 1-channel model trained with RGB statistics gets their average; a single value is broadcast.
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f'{name} has {len(values)} values {values}, which does not fit in_chans={in_chans}.')


def _resolve_config(model_or_cfg: nn.Module | Mapping[str, Any], in_chans: int | None, overrides: dict) -> dict:
    if isinstance(model_or_cfg, nn.Module):
        in_chans = in_chans if in_chans is not None else resolve_in_chans(model_or_cfg)
        config = resolve_data_config(args=overrides, model=model_or_cfg)
    elif isinstance(model_or_cfg, Mapping):
        config = resolve_data_config(args={**model_or_cfg, **overrides})
    else:
        raise ValueError(f'model_or_cfg must be an nn.Module or a data-config dict, got {type(model_or_cfg).__name__}.')
    in_chans = in_chans if in_chans is not None else config['input_size'][0]
    if in_chans not in _MODES:
        raise ValueError(f'in_chans must be 1 (grayscale) or 3 (RGB) for image datasets, got {in_chans!r}.')
    config['input_size'] = (in_chans, *config['input_size'][-2:])
    config['mean'] = _match_channels('mean', config['mean'], in_chans)
    config['std'] = _match_channels('std', config['std'], in_chans)
    return config


def create_dataset_transform(
        model_or_cfg: nn.Module | Mapping[str, Any],
        is_training: bool = False,
        *,
        in_chans: int | None = None,
        channel_boost_prob: float = 0.0,
        channel_boost_factor: tuple[float, float] = (1.2, 2.0),
        black_patches_prob: float = 0.0,
        black_patches_num: tuple[int, int] = (1, 4),
        black_patches_size: tuple[float, float] = (0.1, 0.3),
        **timm_kwargs: Any,
) -> Callable[[Image.Image], Any]:
    """Build the PIL -> tensor transform for a model (or data config) with timm, in train or eval mode.

    Args:
        model_or_cfg: A timm model (its `pretrained_cfg` gives size, interpolation, mean, std) or a dict of
            data-config keys, e.g. `dataset_info(name)` (which has `input_size`, `mean`, `std`, `crop_pct`).
        is_training: Random train augmentation (timm's) vs. resize + center crop.
        in_chans: Channels the model takes (1 or 3); by default the model's (see `resolve_in_chans`) or the
            config's `input_size[0]`. Images are converted to `L` / `RGB` to match.
        channel_boost_prob: Probability of `ChannelBoost` (training only; no-op on 1 channel).
        channel_boost_factor: `ChannelBoost` factor range.
        black_patches_prob: Probability of `BlackPatches` (training only).
        black_patches_num: `BlackPatches` count range.
        black_patches_size: `BlackPatches` side range as a fraction of the image side.
        **timm_kwargs: Passed through to `timm.data.create_transform` (`auto_augment`, `re_prob`, `hflip`,
            `scale`, `color_jitter`, ...); the keys in `DATA_CONFIG_KEYS` override the resolved data config.
            `use_prefetcher` and `separate` are not supported (this returns one tensor-producing callable).

    Returns:
        A `torchvision.transforms.Compose` mapping a PIL image to a `[in_chans, H, W]` float tensor.
    """
    for key in ('use_prefetcher', 'separate', 'naflex'):
        if timm_kwargs.get(key):
            raise ValueError(f'{key}=True is not supported here; call timm.data.create_transform directly.')
    check_prob('channel_boost_prob', channel_boost_prob)
    check_prob('black_patches_prob', black_patches_prob)
    augs = [  # built even for eval so that bad arguments fail early
        ChannelBoost(channel_boost_prob, channel_boost_factor),
        BlackPatches(black_patches_prob, black_patches_num, black_patches_size),
    ]
    overrides = {k: timm_kwargs.pop(k) for k in DATA_CONFIG_KEYS if k in timm_kwargs}
    config = _resolve_config(model_or_cfg, in_chans, overrides)
    timm_transform = create_transform(**config, is_training=is_training, **timm_kwargs)
    steps = [ConvertImageMode(_MODES[config['input_size'][0]]), *timm_transform.transforms]
    if is_training:
        at = next((i for i, t in enumerate(steps) if isinstance(t, transforms.Normalize)), len(steps))
        steps[at:at] = [aug for aug in augs if aug.p > 0]
    return transforms.Compose(steps)
