"""What ``timm.create_model(name, pretrained=True)`` adds for pce_* models, before and after timm loads weights.

- The bare name loads the best released tag: ``create_model('pce_resnet18', pretrained=True)`` is
  ``create_model('pce_resnet18.fmnist', pretrained=True)`` (:data:`DEFAULT_PRETRAINED_TAGS`), as timm's own
  bare names load their default weights; without ``pretrained`` the bare name stays the untrained,
  ImageNet-shaped architecture. An architecture with no released weights says so, and how to get some.
- Loaded weights are checked (:func:`check_loaded_weights`): a cached Hub file whose content no longer matches
  its sha256 (its name in the HF cache) is refused, weights holding NaN / inf warn, and the architecture args in
  the cached config.json must equal those the tag builds (a release of another ``patch_size`` would load
  its tensors into a model that routes differently, silently).
"""
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import torch.nn as nn
from timm.models import get_model_args

from pce_timm.hub.offline import MissingWeightsError

__all__ = ['DEFAULT_PRETRAINED_TAGS', 'NoReleasedWeightsError', 'check_loaded_weights', 'default_pretrained_tag']

# architecture -> the tag its bare name loads with pretrained=True: the best released weights of each
DEFAULT_PRETRAINED_TAGS: Dict[str, str] = {
    'pce_resnet18': 'fmnist',
    'pce_vit_hybrid_tiny_d4_r18': 'fmnist',
}


class NoReleasedWeightsError(MissingWeightsError):
    """``pretrained=True`` for an architecture that has no released weights; the message says what exists."""


def default_pretrained_tag(variant: str, pretrained: bool, kwargs: Mapping[str, Any]) -> Optional[str]:
    """The tag to load for ``create_model(variant, pretrained=pretrained, **kwargs)``, or None to leave timm's.

    Raises:
        NoReleasedWeightsError: ``pretrained`` without a tag for an architecture that has no released weights.
    """
    if not pretrained or kwargs.get('pretrained_cfg') is not None:
        return None
    if variant in DEFAULT_PRETRAINED_TAGS:
        return DEFAULT_PRETRAINED_TAGS[variant]
    released = ', '.join(f'{arch}.{tag}' for arch, tag in DEFAULT_PRETRAINED_TAGS.items())
    raise NoReleasedWeightsError(
        f'{variant} has no released weights yet (released: {released}). Build it untrained with pretrained=False '
        f'and train it (python scripts/train.py --model {variant} ...), or start from dense timm weights '
        f'(python scripts/finetune.py upcycles a dense ResNet into it).')


def check_loaded_weights(model: nn.Module, name: str, cache_dir: Optional[str] = None,
                         normalize: Callable[[str, Any], Any] = lambda key, value: value) -> None:
    """Check the weights ``create_model(name, pretrained=True)`` just loaded (see the module docstring).

    ``normalize(key, value)`` makes two spellings of one architecture arg compare equal (``patch_size=2`` and
    ``(2, 2, 2, 2)``).

    Raises:
        pce_timm.hub.ReleaseError: the cached weights file is corrupted, or the cached config.json describes
            another architecture than ``name`` builds (the keys that differ are named).
    """
    from pce_timm.hub import ReleaseError, blob_intact, non_finite_tensors

    weights, config = _cached_files(name, cache_dir)
    if weights is not None:
        blob = os.path.realpath(weights)
        if len(os.path.basename(blob)) == 64 and not blob_intact(blob):  # sha256-named LFS blob
            raise ReleaseError(
                f'{weights}: the cached weights of {name!r} are corrupted (their sha256 is not the file\'s name '
                f'{os.path.basename(blob)}). Delete {blob} and download them again, or reinstall the release '
                f'(make release).')
    if config is not None:
        _check_cached_architecture(model, name, config, normalize)
    bad = non_finite_tensors(model.state_dict())
    if bad:
        listed = ', '.join(f'{k} ({v})' for k, v in list(bad.items())[:8])
        warnings.warn(f'{name}: the pretrained weights hold NaN / inf values in {listed}'
                      f'{" ..." if len(bad) > 8 else ""}; its outputs will not be finite.', stacklevel=3)


def _check_cached_architecture(model: nn.Module, name: str, config_path: str,
                               normalize: Callable[[str, Any], Any]) -> None:
    from pce_timm.hub import ReleaseError

    try:
        cached = json.loads(Path(config_path).read_text(encoding='utf-8')).get('model_args') or {}
    except (OSError, ValueError):
        return  # an unreadable config: timm read the weights, not it
    built = get_model_args(model)
    differs = {k: (cached[k], built[k]) for k in cached
               if k in built and _norm(normalize(k, cached[k])) != _norm(normalize(k, built[k]))}
    if differs:
        listed = ', '.join(f'{k}: config.json {a!r}, built {b!r}' for k, (a, b) in differs.items())
        raise ReleaseError(
            f'{config_path}: the cached release of {name!r} was made for another architecture than the tag builds '
            f'({listed}): its weights would load into a model that routes differently. Reinstall the release '
            f'that matches this pce_timm (make release), or load that one as hf-hub:/local-dir:, which builds '
            f'what its config.json says.')


def _norm(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _cached_files(name: str, cache_dir: Optional[str]):
    """(weights file, config.json) of ``name``'s Hub repo in the HF cache, each None when not cached."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None, None
    files = []
    for filename in (cfg.hf_hub_filename or 'model.safetensors', 'config.json'):
        path = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache_dir)
        files.append(path if isinstance(path, str) else None)
    return tuple(files)
