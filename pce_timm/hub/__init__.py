"""Hugging Face Hub releases for timm models (pce_* and any other).

Flow: ``write_release`` (config.json + model.safetensors + README.md, atomic and deterministic) ->
``push_release`` (network) or ``install_into_hf_cache`` (no network) -> ``timm.create_model('hf-hub:org/name',
pretrained=True)``. ``load_pretrained_or_explain`` turns a missing-weights failure into a message that says
which repo, where it looked and how to get the weights. The CLI is ``scripts/push_to_hub.py``.

The package knows timm and huggingface_hub, not pce_timm's models (``ids`` is shared with them): the models
import it, it never imports them. ``pce_timm.release`` (training, measuring, cards) sits above it.
"""
from .cache import blob_intact, file_etag, git_blob_sha1, hf_cache_dir, install_into_hf_cache, release_commit_hash
from .ids import PCE_HUB_ORG, hub_id, split_revision
from .offline import MissingWeightsError, explain_missing_weights, load_pretrained_or_explain, weights_repo_for
from .push import PUSH_ERRORS, PushResult, push_release
from .release import (
    CARD_NAME,
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    RESULTS_NAME,
    WEIGHTS_NAME,
    ReleaseError,
    ReleaseSource,
    check_finite,
    check_model_folder,
    check_safetensors,
    find_release_source,
    load_model_from_source,
    non_finite_tensors,
    release_files,
    state_dict_to_safetensors,
    write_model_files,
    write_release,
)

__all__ = [
    'CARD_NAME', 'CONFIG_NAME', 'EVAL_RESULTS_NAME', 'PCE_HUB_ORG', 'PUSH_ERRORS', 'RESULTS_NAME', 'WEIGHTS_NAME',
    'MissingWeightsError', 'PushResult', 'ReleaseError', 'ReleaseSource', 'blob_intact', 'check_finite',
    'check_model_folder', 'check_safetensors',
    'explain_missing_weights', 'file_etag', 'find_release_source', 'git_blob_sha1', 'hf_cache_dir', 'hub_id',
    'install_into_hf_cache', 'load_model_from_source', 'load_pretrained_or_explain', 'non_finite_tensors',
    'push_release',
    'release_commit_hash', 'release_files', 'split_revision', 'state_dict_to_safetensors', 'weights_repo_for',
    'write_model_files', 'write_release',
]
