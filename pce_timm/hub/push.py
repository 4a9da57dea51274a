"""Push a release folder to the Hugging Face Hub with ``HfApi.create_repo`` + ``upload_folder``.

Re-pushing an unchanged release creates no commit: ``upload_folder`` asks the Hub for the current hash of
every file (the preupload call) and drops unchanged files, and an empty commit is skipped. Release folders
are byte-deterministic (``write_release``), so the same model always hashes the same.
"""
import os
from dataclasses import dataclass
from typing import Optional, Union

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from .release import release_files

__all__ = ['PUSH_ERRORS', 'PushResult', 'push_release']

# What a push raises when the Hub fails, refuses or cannot be reached: HfHubHTTPError (refusals) derives from
# the HTTP client's own base error, which connection failures raise too (requests' in huggingface_hub 0.x, an
# OSError; httpx's in 1.x / 2.x). Taking it from HfHubHTTPError's bases names no HTTP client, so this holds
# for every huggingface_hub version.
PUSH_ERRORS = (HfHubHTTPError, OSError, *HfHubHTTPError.__bases__)


@dataclass(frozen=True)
class PushResult:
    """Outcome of ``push_release``.

    Attributes:
        repo_id: the repo pushed to (with the namespace the Hub resolved).
        revision: branch pushed to.
        commit_oid: the revision's head commit after the push.
        changed: False when the Hub already had these exact files (no commit was made).
        commit_url: web address of ``commit_oid``.
    """
    repo_id: str
    revision: str
    commit_oid: str
    changed: bool
    commit_url: str


def push_release(
        release_dir: Union[str, os.PathLike],
        repo_id: str,
        *,
        token: str,
        revision: str = 'main',
        private: bool = False,
        commit_message: Optional[str] = None,
        endpoint: Optional[str] = None,
) -> PushResult:
    """Create ``repo_id`` if needed and upload the release folder to ``revision`` as one commit.

    Raises:
        ReleaseError: ``release_dir`` is not a release folder.
        one of ``PUSH_ERRORS``: the Hub failed, refused or could not be reached.

    Args:
        release_dir: a folder written by ``write_release``.
        repo_id: ``org/name`` on the Hub.
        token: a write token. It is sent in the Authorization header only; nothing here writes or logs it.
        revision: branch to commit to; created from main if missing.
        private: create the repo private (ignored if it already exists).
        commit_message: default ``'Release <repo_id>'``.
        endpoint: Hub address; default ``HF_ENDPOINT`` / huggingface_hub's default.
    """
    release_files(release_dir)  # fails early with a clear message if this is not a release folder
    api = HfApi(endpoint=endpoint, token=token, library_name='pce_timm')
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision != 'main':
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    before = _head(api, repo_id, revision)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(release_dir),
        revision=revision,
        commit_message=commit_message or f'Release {repo_id}',
    )
    return PushResult(
        repo_id=repo_id, revision=revision, commit_oid=info.oid, changed=info.oid != before,
        commit_url=info.commit_url)


def _head(api: HfApi, repo_id: str, revision: str) -> Optional[str]:
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
