"""Install a release folder into the Hugging Face hub cache, laid out exactly as a download leaves it.

Layout (the one ``huggingface_hub.hf_hub_download`` reads and writes)::

    <cache_dir>/models--<org>--<name>/
        blobs/<etag>                  file contents, named by the ETag the Hub would send for them
        snapshots/<commit>/<path>     relative symlinks to ../../blobs/<etag> (copies where symlinks fail)
        refs/<revision>               the commit hash as plain text, no trailing newline

Offline (``HF_HUB_OFFLINE=1`` or no network), ``hf_hub_download(repo_id, path, revision='main')`` reads
``refs/main`` to get the commit and returns ``snapshots/<commit>/<path>`` if it exists. timm's
``create_model('hf-hub:org/name', pretrained=True)`` and registry names whose default cfg has
``hf_hub_id='org/name'`` both go through it, so after an install they load as after a real upload.

Hashing (deterministic, so installing the same release twice changes nothing):

- etag of a file: what the Hub sends as its ETag. sha256 hex of the content for files the Hub keeps in
  LFS / Xet (weights and other binary files, or anything >= 10 MB); otherwise the git blob sha1,
  ``sha1(b'blob <size>\\0' + content)``. A later online download of the same content reuses these blobs.
- commit: ``sha1('pce-timm-release-v1\\n' + ''.join(f'{path}\\0{etag}\\n' for each file sorted by path))``, a
  stand-in for the Hub commit id: same file set -> same commit. It never equals a real Hub commit; once
  online, hf_hub_download moves ``refs/main`` to the real commit and keeps using the blobs.
"""
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from pce_timm.utils import atomic_file, write_file_atomic

from .release import ReleaseError, release_files

__all__ = ['install_into_hf_cache', 'blob_intact', 'file_etag', 'git_blob_sha1', 'release_commit_hash', 'hf_cache_dir']

# Suffixes of the Hub's default .gitattributes: these always go to LFS / Xet.
_LFS_SUFFIXES = (
    '.7z', '.arrow', '.bin', '.bz2', '.ckpt', '.ftz', '.gz', '.h5', '.joblib', '.mlmodel', '.model', '.msgpack',
    '.npy', '.npz', '.onnx', '.ot', '.parquet', '.pb', '.pickle', '.pkl', '.pt', '.pth', '.rar', '.safetensors',
    '.tar', '.tflite', '.tgz', '.wasm', '.xz', '.zip', '.zst',
)
_LFS_MIN_SIZE = 10 * 1024 * 1024
_COMMIT_PREFIX = b'pce-timm-release-v1\n'
_CHUNK = 1024 * 1024
_CACHEDIR_TAG = (
    'Signature: 8a477f597d28d172789f06886806bc55\n'
    '# This file is a cache directory tag created by huggingface_hub.\n'
    '# For information about cache directory tags, see:\n'
    '#\thttps://bford.info/cachedir/\n'
)
_REVISION_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_COMMIT_RE = re.compile(r'[0-9a-f]{40}')


def install_into_hf_cache(
        release_dir: Union[str, os.PathLike],
        repo_id: str,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        revision: str = 'main',
) -> Path:
    """Install a release folder into the HF hub cache as ``repo_id`` at ``revision``.

    Idempotent: blobs are content-addressed and the commit is a hash of the file set, so a second install of
    the same folder finds everything in place. Installing a different release moves ``refs/<revision>`` to
    its commit and leaves older snapshots alone, like a download of a new commit would.

    Args:
        release_dir: folder with at least config.json and model.safetensors (see ``write_release``).
        repo_id: ``org/name`` the files should resolve as, e.g. ``pce-timm/pce_resnet18.in1k``.
        cache_dir: HF hub cache; default ``huggingface_hub.constants.HF_HUB_CACHE`` (``HF_HUB_CACHE`` /
            ``HF_HOME``), the same one ``hf_hub_download`` uses.
        revision: branch or tag name to point at the snapshot.

    Returns:
        The snapshot folder ``<cache_dir>/models--org--name/snapshots/<commit>``.
    """
    _check_repo_id(repo_id)
    _check_revision(revision)
    files = release_files(release_dir)
    cache_root = hf_cache_dir(cache_dir)
    storage = cache_root / repo_folder_name(repo_id=repo_id, repo_type='model')
    etags = {name: file_etag(path) for name, path in files.items()}
    commit = release_commit_hash(etags)
    snapshot = storage / 'snapshots' / commit
    for name, path in files.items():
        blob = storage / 'blobs' / etags[name]
        _install_blob(path, blob)
        _link(blob, snapshot / name)
    _write_ref(storage / 'refs' / revision, commit)
    tag = cache_root / 'CACHEDIR.TAG'
    if not tag.exists():
        tag.write_text(_CACHEDIR_TAG)
    return snapshot


def hf_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The HF hub cache folder ``hf_hub_download`` would use (read at call time, so env patches apply)."""
    return Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser().resolve()


def file_etag(path: Union[str, os.PathLike]) -> str:
    """The Hub's ETag for a file: sha256 for LFS / Xet files, git blob sha1 for the rest (see module doc)."""
    path = Path(path)
    with path.open('rb') as f:
        sample = f.read(512)
    if stored_in_lfs(path.name, path.stat().st_size, sample):
        return _hash_file(hashlib.sha256(), path)
    return git_blob_sha1(path)


def stored_in_lfs(name: str, size: int, sample: bytes) -> bool:
    """Best-effort mirror of the Hub's upload-mode choice: LFS suffix, >= 10 MB, or binary content.

    Only the blob names depend on it; a wrong guess costs one duplicate blob after going online.
    """
    return name.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE or b'\0' in sample


def git_blob_sha1(path: Union[str, os.PathLike]) -> str:
    """git's object id of a file's content: ``sha1(b'blob <size>\\0' + content)``."""
    path = Path(path)
    digest = hashlib.sha1()
    digest.update(f'blob {path.stat().st_size}\0'.encode())
    return _hash_file(digest, path)


def release_commit_hash(etags: Mapping[str, str]) -> str:
    """Deterministic 40-hex commit id for a file set ``{repo path: etag}`` (see module doc)."""
    digest = hashlib.sha1(_COMMIT_PREFIX)
    for name in sorted(etags):
        digest.update(f'{name}\0{etags[name]}\n'.encode())
    return digest.hexdigest()


def _hash_file(digest, path: Path) -> str:
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def blob_intact(blob: Union[str, os.PathLike]) -> bool:
    """Whether a cache blob's content still hashes to its name (sha256 for LFS files, git blob sha1 else)."""
    blob = Path(blob)
    if not blob.is_file():
        return False
    if len(blob.name) == 64:
        return _hash_file(hashlib.sha256(), blob) == blob.name
    return git_blob_sha1(blob) == blob.name


def _install_blob(src: Path, blob: Path) -> None:
    """Copy ``src`` to ``blob`` atomically; an existing blob is kept only if its content matches its name (a
    same-size corrupted copy is replaced)."""
    if blob_intact(blob):
        return
    with atomic_file(blob) as tmp:
        shutil.copyfile(src, tmp)


def _link(blob: Path, pointer: Path) -> None:
    """Point ``pointer`` at ``blob`` with a relative symlink, as huggingface_hub does; copy if symlinks fail."""
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    with atomic_file(pointer) as tmp:
        try:
            os.symlink(target, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)


def _write_ref(ref: Path, commit: str) -> None:
    # hf_hub_download reads the ref with f.read(): no trailing newline allowed
    if ref.is_file() and ref.read_text() == commit:
        return
    write_file_atomic(ref, commit)


def _check_repo_id(repo_id: str) -> None:
    parts = repo_id.split('/') if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(parts) or '--' in repo_id or '..' in repo_id:
        raise ReleaseError(f'repo_id {repo_id!r} must look like "org/name" (no "--" or "..").')


def _check_revision(revision: str) -> None:
    if not isinstance(revision, str) or not _REVISION_RE.fullmatch(revision) or '..' in revision:
        raise ReleaseError(f'revision {revision!r} must be a branch or tag name such as "main" or "v1.0".')
    if _COMMIT_RE.fullmatch(revision):
        raise ReleaseError(
            f'revision {revision!r} looks like a commit hash; hf_hub_download would bypass refs/. '
            f'Use a branch or tag name.')

