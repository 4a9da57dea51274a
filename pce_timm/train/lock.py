"""One run per output folder: an OS lock (``fcntl.flock``) on ``<output_dir>/.lock``, held while a run trains.

The lock belongs to the open file, so the kernel releases it when the process ends however it ends (a kill -9
leaves no stale lock behind); the file itself stays, holding the last holder's pid, host, start time and
command, which a refused second run prints. Under multi-process accelerate only the main process locks.
"""
import datetime
import errno
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import IO, Any, Dict, Optional

try:
    import fcntl
except ImportError:  # not POSIX: no OS lock, runs are not guarded
    fcntl = None

from .checkpoint import RunFolderError, write_error

__all__ = ['LOCK_FILE', 'RunLock', 'RunLockedError']

LOCK_FILE = '.lock'


class RunLockedError(RunFolderError):
    """Another process is training in the same output folder."""


class RunLock:
    """The exclusive lock of one run folder: :meth:`check` (read-only), :meth:`acquire`, :meth:`release`."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._file: Optional[IO[str]] = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def check(self) -> None:
        """Raise :class:`RunLockedError` if another process holds the lock; creates nothing."""
        if fcntl is None or not self.path.is_file():
            return
        try:
            with self.path.open('r') as f:
                self._try_lock(f, shared=True)
        except PermissionError:  # an unreadable lock file: acquire() says what is wrong
            return

    def acquire(self) -> 'RunLock':
        """Create the folder and lock it, recording who holds it.

        Raises:
            RunLockedError: another process holds the lock (the message names it).
            RunFolderError: the folder cannot be created or written (read-only, no permission, disk full).
        """
        if self.held or fcntl is None:
            return self
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666), 'r+')
        except OSError as e:
            error = write_error(e, self.path, 'output_dir: cannot lock the run folder',
                                'choose another --output-dir or make it writable')
            if error is None:
                raise
            raise error from e
        try:
            self._try_lock(f, shared=False)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(_holder()) + '\n')
            f.flush()
        except BaseException:
            f.close()
            raise
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file stays, so no other run races on its inode."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _try_lock(self, f: IO[str], shared: bool) -> None:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            f.seek(0)
            raise RunLockedError(f'output_dir: {self.output_dir} is in use by another run '
                                 f'({_describe(f.read())}); wait for it to finish or stop it, or choose another '
                                 f'--output-dir') from None
        if shared:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _holder() -> Dict[str, Any]:
    return {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC'),
            'command': shlex.join(sys.argv)}


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command']}")
    except (ValueError, KeyError, TypeError):
        return 'its details are not written yet'
