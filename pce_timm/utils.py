"""Helpers that import nothing of pce_timm: the one atomic file writer, the one atomic folder writer, the one
markdown table, and loading a script by path (for the tests).

Atomic here means a reader (or a crash) never sees half a file or half a folder: everything is written into a
hidden temporary sibling and renamed into place. Temporaries are created with plain ``open`` / ``mkdir``, unlike
``tempfile.mkstemp`` / ``mkdtemp`` (which force 0600 / 0700), so the final files and folders get the
permissions the umask gives, as any other file the user writes.
"""
import contextlib
import importlib.util
import os
import shutil
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Sequence, Union

__all__ = ['atomic_file', 'atomic_folder', 'load_module_from_path', 'markdown_table', 'write_file_atomic']

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to create (a file or a symlink); it replaces ``path`` on success.

    On an exception the temporary is removed and ``path`` is left as it was. ``os.replace`` is atomic on
    POSIX, so readers see either the old ``path`` or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def write_file_atomic(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` through :func:`atomic_file`, synced to disk first."""
    if isinstance(data, str):
        data = data.encode('utf-8')
    path = Path(path)
    with atomic_file(path) as tmp, tmp.open('xb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path`` to fill; on success it takes the place of ``path``.

    A folder already at ``path`` is moved aside only once the new one is complete and removed after the new one
    is in place (a crash between those two renames leaves it as ``.<name>.old-*``; if the second rename fails
    it is moved back). On an exception inside the block the temporary folder is removed and ``path`` is left
    as it was. Whether an existing ``path`` may be replaced at all is the caller's decision, made before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{uuid.uuid4().hex[:8]}')
    tmp.mkdir()
    try:
        yield tmp
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    backup = path.with_name(f'.{path.name}.old-{uuid.uuid4().hex[:8]}')
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """A GitHub-flavoured markdown table of string cells (the package's one: benchmark, reports, model cards).

    ``align`` has one '<' (left, the default) or '>' (right: numbers) per column.
    """
    align = align or '<' * len(header)
    if len(align) != len(header) or set(align) - {'<', '>'}:
        raise ValueError(f"align: got {align!r}; accepted: one '<' or '>' per column ({len(header)})")
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f'markdown_table: a row has {len(row)} cells for {len(header)} columns: {list(row)}')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ''.join('---|' if a == '<' else '---:|' for a in align)]
    return '\n'.join(lines + ['| ' + ' | '.join(cells) + ' |' for cells in rows])


def load_module_from_path(path: PathLike, name: str) -> ModuleType:
    """Import the Python file at ``path`` (a script under ``scripts/``) as module ``name``, once.

    Later calls with the same ``name`` return the module already loaded. The module is registered in
    ``sys.modules`` before it runs, because dataclasses resolve their module by name.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f'cannot load {path} as a Python module (is it a .py file?)')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import leaves nothing half-loaded behind
        raise
    return module
