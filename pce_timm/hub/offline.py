"""Say what is missing when pretrained weights cannot be loaded: which Hub repo, where we looked, how to get them.

timm's own error when a Hub file is not cached and the Hub cannot be reached is a generic
``LocalEntryNotFoundError``. ``load_pretrained_or_explain`` wraps ``timm.create_model(..., pretrained=True)``
and replaces it with a ``MissingWeightsError`` whose message names the repo id and revision, the HF cache
folder and what it holds, and the commands that fill it (with network, or from a local run without).
"""
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from timm.models import get_pretrained_cfg, parse_model_name

from .cache import hf_cache_dir
from .ids import PCE_HUB_ORG, split_revision
from .release import CONFIG_NAME, WEIGHTS_NAME

__all__ = ['MissingWeightsError', 'weights_repo_for', 'explain_missing_weights', 'load_pretrained_or_explain']

# EntryNotFoundError: a file missing on the Hub (RemoteEntryNotFoundError from huggingface_hub 1.0 on, the class
# itself before); the base class names both.
_MISSING_ERRORS = (
    LocalEntryNotFoundError, OfflineModeIsEnabled, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are neither in the HF cache nor downloadable; the message says how to get them."""


def weights_repo_for(model_name: str) -> Tuple[str, str, List[str]]:
    """The Hub repo, revision and files that ``create_model(model_name, pretrained=True)`` reads.

    Args:
        model_name: ``hf-hub:org/name[@revision]`` or a registry name ``arch[.tag]`` whose pretrained cfg
            has an ``hf_hub_id``.

    Returns:
        ``(repo_id, revision, files)``.

    Raises:
        ValueError: the name is unknown, a ``local-dir:`` path, or its cfg has no Hub weights.
    """
    source, model_id = parse_model_name(model_name)
    if source == 'hf-hub':
        repo_id, revision = split_revision(model_id)
        return repo_id, revision or 'main', [CONFIG_NAME, WEIGHTS_NAME]
    if source == 'local-dir':
        raise ValueError(f'{model_name!r} loads from a local folder, not the Hub; check that {model_id} exists.')
    cfg = get_pretrained_cfg(model_id)
    if cfg is None:
        raise ValueError(
            f'{model_name!r} is not a registered timm model or tag (pce_* models need `import pce_timm`); '
            f'see timm.list_pretrained().')
    if not cfg.hf_hub_id:
        raise ValueError(
            f'{model_name!r} has no hf_hub_id in its pretrained cfg, so there are no Hub weights to look for. '
            f'Use pretrained=False or pretrained_cfg_overlay=dict(file=PATH).')
    repo_id, revision = split_revision(cfg.hf_hub_id)
    return repo_id, revision or 'main', [cfg.hf_hub_filename or WEIGHTS_NAME]


def explain_missing_weights(
        model_name: str,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        cause: Optional[BaseException] = None,
) -> str:
    """A message naming the repo id, the cache folder looked in, what it holds, and how to get the weights."""
    try:
        repo_id, revision, files = weights_repo_for(model_name)
    except ValueError as e:
        return str(e)
    cache_root = hf_cache_dir(cache_dir)
    storage = cache_root / repo_folder_name(repo_id=repo_id, repo_type='model')
    why = 'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub could not be reached or refused'
    lines = [
        f'No pretrained weights for {model_name!r}: they come from the Hugging Face repo {repo_id!r} '
        f'(revision {revision!r}), {why}, and the HF cache has {_cache_state(storage, revision, files)}.',
        f'  looked in: {storage}',
    ]
    if cause is not None:
        lines.append(f'  cause: {type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ""}')
    name = repo_id.split('/')[-1]
    lines += [
        'To get them:',
        f'  - with network access: unset HF_HUB_OFFLINE and run again, or `hf download {repo_id}`;',
    ]
    if repo_id.split('/')[0] == PCE_HUB_ORG:
        lines.append(
            '  - without network, train them here: `make release` in a pce_timm checkout (scripts/make_release.py '
            'trains pce_timm\'s released models with their recipes and installs them into this HF cache);')
    lines += [
        '  - without network, from a local training run: '
        f'`python scripts/push_to_hub.py RUN_DIR --repo-id {repo_id} --dry-run releases/{name} --install-cache`;',
        '  - from a release folder made elsewhere: '
        f'`python -c "from pce_timm.hub import install_into_hf_cache as i; i(\'RELEASE_DIR\', \'{repo_id}\')"`;',
        '  - or start from random weights: pretrained=False.',
    ]
    return '\n'.join(lines)


def load_pretrained_or_explain(
        model_name: str,
        *,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        **kwargs: Any,
) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=True, **kwargs)``, with a useful error when weights are missing.

    Raises:
        MissingWeightsError: the weights are not cached and could not be downloaded (message from
            ``explain_missing_weights``; the original error is chained).
    """
    try:
        return timm.create_model(model_name, pretrained=True, cache_dir=cache_dir, **kwargs)
    except _MISSING_ERRORS as e:
        raise MissingWeightsError(explain_missing_weights(model_name, cache_dir, cause=e)) from e


def _cache_state(storage: Path, revision: str, files: List[str]) -> str:
    if not storage.is_dir():
        return 'nothing for it'
    ref = storage / 'refs' / revision
    if not ref.is_file():
        return f'no refs/{revision} for it'
    commit = ref.read_text().strip()
    missing = [f for f in files if not (storage / 'snapshots' / commit / f).exists()]
    if missing:
        return f'snapshot {commit[:12]} for it without {", ".join(missing)}'
    return f'snapshot {commit[:12]} with {", ".join(files)} (so the failure is elsewhere, see cause)'
