"""Checkpoint helpers: the trainer state accelerate saves with each checkpoint, which checkpoints are complete and
good, rotation, resume with fallback, and the final export.

A run folder looks like::

    <output_dir>/
      .lock                the run lock (:mod:`.lock`): who trains here now, or last
      config.yaml          resolved config (a recipe: --config reads it back; --resume reads it too)
      checkpoints/checkpoint_<i>/   accelerate save_state: model, optimizer, RNG states, trainer state, and
                           .complete, the manifest (file names and sizes) written last: a folder without it was
                           cut short; one with .suspect instead gave a NaN / inf loss right after it was saved
      model/               config.json + model.safetensors (timm Hub format): timm.create_model('local-dir:...')
      results.json         final metrics, routing statistics, history, wall time, config
      logs/                metrics.csv (+ TensorBoard events)

Nothing is lost on a kill, a full disk or a corrupt file: a checkpoint is written, marked complete, and only then
are older ones beyond ``checkpoint_limit`` deleted (:class:`CheckpointKeeper`), never before a newer one is
complete and has given a finite loss; ``--resume`` falls back to the newest checkpoint that loads
(:func:`load_newest_loadable`) and removes folders a kill left incomplete (:func:`remove_incomplete`).
"""
import errno
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from pce_timm.utils import atomic_folder, write_file_atomic

__all__ = [
    'TrainerState', 'NonFiniteLossError', 'RunFolderError', 'ResumeError', 'CheckpointKeeper', 'checkpoint_folders',
    'is_complete', 'latest_checkpoint', 'mark_complete', 'mark_suspect', 'check_files', 'resume_candidates',
    'resolve_resume', 'remove_incomplete', 'rotate_checkpoints', 'load_newest_loadable', 'nonfinite_state',
    'write_error', 'check_writable', 'save_model_dir', 'write_json_atomic',
]

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped before applying that update."""


class TrainerState:
    """Where training is and what it has measured; registered with ``accelerator.register_for_checkpointing``.

    ``epoch`` / ``batch_in_epoch`` locate the next batch to train; ``update`` counts optimizer updates;
    ``phase`` names the phase being trained; ``loss_sums`` / ``loss_count`` accumulate the epoch's losses so a
    mid-epoch resume reports the same epoch means. ``history`` and ``routing_history`` (one entry per finished
    epoch) and ``elapsed`` (training wall time of earlier sessions) make the final ``results.json`` of a
    resumed run the same as an uninterrupted one. RNG states (python, numpy, torch per process) are saved by
    accelerate itself next to this state.
    """

    def __init__(self):
        self.epoch = 0
        self.batch_in_epoch = 0
        self.update = 0
        self.phase = ''
        self.history: List[Dict[str, Any]] = []
        self.routing_history: List[Dict[str, Any]] = []
        self.elapsed = 0.0
        self.next_checkpoint = 0
        self.keys_initialised = False
        self.loss_sums: Dict[str, float] = {}  # this epoch's running loss sums (this process), for the mean
        self.loss_count = 0

    def state_dict(self) -> Dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RunFolderError(RuntimeError):
    """The run folder cannot be used: in use by another run, not writable, full, or no checkpoint in it loads."""


class ResumeError(RunFolderError):
    """``--resume`` names nothing that can be resumed: no complete checkpoint, or none that loads."""


COMPLETE_MARKER = '.complete'
SUSPECT_MARKER = '.suspect'


def checkpoint_folders(run_dir: str | os.PathLike) -> List[Tuple[int, Path]]:
    """Every ``checkpoints/checkpoint_<i>`` folder of a run as ``(i, path)``, oldest first (complete or not)."""
    folder = Path(run_dir) / 'checkpoints'
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        prefix, _, index = path.name.rpartition('_')
        if path.is_dir() and prefix == 'checkpoint' and index.isdigit():
            found.append((int(index), path))
    return sorted(found)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint was written to the end (a run killed while saving leaves one without the marker) and
    was not marked suspect (a NaN / inf loss right after it)."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file() and not (Path(checkpoint) / SUSPECT_MARKER).exists()


def mark_complete(checkpoint: str | os.PathLike, **info: Any) -> None:
    """Write the manifest, last: every file of the checkpoint with its size (and ``info``), atomically.

    Files get the permissions the umask gives (those of the folder, without execute): safetensors writes 0600.
    """
    root = Path(checkpoint)
    paths = [p for p in sorted(root.rglob('*')) if p.is_file() and not p.name.startswith('.')]
    mode = root.stat().st_mode & 0o666
    for path in paths:
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
    files = {str(p.relative_to(root)): p.stat().st_size for p in paths}
    write_file_atomic(root / COMPLETE_MARKER, json.dumps({'files': files, **info}, indent=1) + '\n')


def mark_suspect(checkpoint: str | os.PathLike, reason: str) -> None:
    """Take a complete checkpoint out of ``--resume auto`` (its files stay; rotation deletes it later)."""
    write_file_atomic(Path(checkpoint) / SUSPECT_MARKER, reason + '\n')


def check_files(checkpoint: str | os.PathLike) -> Optional[str]:
    """What is wrong with a complete checkpoint's files against its manifest (missing, other size), or None.

    A marker without a manifest (written by older versions) checks nothing.
    """
    root = Path(checkpoint)
    try:
        files = json.loads((root / COMPLETE_MARKER).read_text() or '{}').get('files', {})
    except (OSError, ValueError) as e:
        return f'{COMPLETE_MARKER}: unreadable manifest ({e})'
    for name, size in files.items():
        path = root / name
        if not path.is_file():
            return f'{name} is missing'
        if path.stat().st_size != size:
            return f'{name} is {path.stat().st_size} bytes, {size} when it was saved (truncated or overwritten)'
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete ``checkpoints/checkpoint_<i>`` folder of a run (by accelerate's number), or None."""
    complete = [path for _, path in checkpoint_folders(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resume_candidates(resume: Optional[str], output_dir: str | os.PathLike) -> List[Path]:
    """The checkpoints ``--resume`` may load, newest first (:func:`load_newest_loadable` takes the first that loads).

    ``None``: none (start fresh). ``'auto'``: the complete checkpoints of ``output_dir`` (none: start fresh). A
    run folder: its complete checkpoints. A checkpoint folder: itself.

    Raises:
        ResumeError: a named run folder holds no complete checkpoint, or a named checkpoint is incomplete.
    """
    if resume is None:
        return []
    if resume == 'auto':
        return [path for _, path in checkpoint_folders(output_dir) if is_complete(path)][::-1]
    path = Path(resume)
    is_checkpoint = any(path.glob('model*.safetensors')) or any(path.glob('pytorch_model*.bin'))
    if is_checkpoint and not (path / 'checkpoints').is_dir():
        if not is_complete(path):
            why = ('gave a NaN / inf loss right after it was saved' if (path / SUSPECT_MARKER).exists()
                   else 'the run stopped while saving it')
            raise ResumeError(f'resume: {path} is incomplete ({why}); resume from the run folder '
                              f'{path.parent.parent} to use its newest complete checkpoint')
        return [path]
    found = [p for _, p in checkpoint_folders(path) if is_complete(p)][::-1]
    if not found:
        raise ResumeError(f'resume: {path} holds no complete checkpoints/checkpoint_<i> folder to resume from')
    return found


def resolve_resume(resume: Optional[str], output_dir: str | os.PathLike) -> Optional[Path]:
    """The newest of :func:`resume_candidates` (whether it loads is not checked), or None."""
    candidates = resume_candidates(resume, output_dir)
    return candidates[0] if candidates else None


def remove_incomplete(run_dir: str | os.PathLike) -> List[Path]:
    """Delete the checkpoint folders a kill left half-written (neither complete nor suspect); returns them."""
    removed = []
    for _, path in checkpoint_folders(run_dir):
        if not (path / COMPLETE_MARKER).is_file() and not (path / SUSPECT_MARKER).exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate_checkpoints(run_dir: str | os.PathLike, limit: int, newest: str | os.PathLike) -> List[Path]:
    """Keep ``newest`` (a complete, good checkpoint) and the ``limit - 1`` complete ones before it; delete every
    other older folder (complete, incomplete or suspect). Folders after ``newest`` are left alone. Returns the
    deleted folders."""
    newest = Path(newest)
    older = [path for _, path in checkpoint_folders(run_dir) if path.name != newest.name
             and int(path.name.rpartition('_')[2]) < int(newest.name.rpartition('_')[2])]
    complete = [path for path in older if is_complete(path)]
    keep = set(complete[len(complete) - (limit - 1):]) if limit > 1 else set()
    deleted = [path for path in older if path not in keep]
    for path in deleted:
        shutil.rmtree(path, ignore_errors=True)
    return deleted


class CheckpointKeeper:
    """Which checkpoints of a run are good, and deleting old ones only once a newer one is.

    A checkpoint is *good* once the training step after it gave a finite loss, or the run ended (:meth:`confirm`;
    an eval loss does not count: a blown-up state can still give a finite, huge one). Until then the older ones
    stay (``checkpoint_limit`` + 1 folders for a moment), so a NaN right after a save still leaves a good one to
    name (:meth:`reject` marks the new one suspect). Only the main process deletes or marks; every process keeps
    the same bookkeeping.
    """

    def __init__(self, run_dir: str | os.PathLike, limit: int, is_main: bool, last_good: Optional[Path] = None):
        self.run_dir, self.limit, self.is_main = Path(run_dir), limit, is_main
        self.last_good = last_good  # the newest good checkpoint: what a NaN message names
        self.unconfirmed: Optional[Path] = None

    def saved(self, path: Path, confirmed: bool) -> None:
        self.unconfirmed = None if confirmed else path
        if confirmed:
            self.last_good = path
            if self.is_main:
                rotate_checkpoints(self.run_dir, self.limit, path)

    def confirm(self) -> None:
        """The state saved last gave a finite loss: it is good; older ones beyond the limit go."""
        if self.unconfirmed is not None:
            self.saved(self.unconfirmed, confirmed=True)

    def reject(self, reason: str) -> Optional[Path]:
        """The loss right after the last save is not finite: mark that checkpoint suspect; returns it (or None)."""
        path, self.unconfirmed = self.unconfirmed, None
        if path is not None and self.is_main:
            mark_suspect(path, reason)
        return path


def nonfinite_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> List[str]:
    """Names of the floating-point parameters, buffers and optimizer-state tensors holding NaN / inf (this process)."""
    tensors = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for param, state in optimizer.state.items():
            tensors += [(f'{names.get(id(param), "?")} (optimizer {key})', value) for key, value in state.items()
                        if torch.is_tensor(value) and value.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(tensors, finite.tolist(), strict=True) if not ok]


def load_newest_loadable(accelerator: Any, candidates: List[Path], where: str | os.PathLike) -> Optional[Path]:
    """``accelerator.load_state`` of the first of ``candidates`` (newest first) that loads on every process.

    A checkpoint is passed by, with a warning naming the file and the problem, when a file differs from its
    manifest (truncated), a small state file does not unpickle (accelerate would skip a bad RNG file silently,
    and the resume would no longer be exact), or ``load_state`` fails. Returns None for no candidates.

    Raises:
        ResumeError: none of them loads (the message names ``where`` and each checkpoint's problem).
    """
    problems = []
    for i, path in enumerate(candidates):
        problem = _load_problem(accelerator, path)
        if accelerator.num_processes > 1:  # every process must resume from the same one
            from accelerate.utils import gather_object
            problem = next((p for p in gather_object([problem]) if p), None)
        if problem is None:
            return path
        problems.append(f'{path.name}: {problem}')
        then = f'falling back to {candidates[i + 1]}' if i + 1 < len(candidates) else 'no older checkpoint is left'
        _logger.warning('resume: %s does not load (%s); %s', path, problem, then)
    if not problems:
        return None
    raise ResumeError(f'resume: no checkpoint of {where} loads ({"; ".join(problems)}); start a new run in another '
                      f'--output-dir, or remove these checkpoints to train {where} from the start')


def _load_problem(accelerator: Any, path: Path) -> Optional[str]:
    problem = check_files(path) or _small_file_problem(path, accelerator.process_index)
    if problem:
        return problem
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        return _file_problem(path) or f'{type(e).__name__}: {e}'
    return None


def _read_problem(path: Path) -> Optional[str]:
    """Why a checkpoint file does not read (safetensors or a torch pickle), or None."""
    from accelerate.utils import load
    from safetensors.torch import load_file

    try:
        if path.suffix == '.safetensors':
            load_file(str(path))
        else:
            load(path, map_location='cpu', weights_only=False)  # our own run's files (see the README)
    except Exception as e:
        return f'{path.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else "unreadable"}'
    return None


def _small_file_problem(path: Path, process_index: int) -> Optional[str]:
    small = [path / f'random_states_{process_index}.pkl', *sorted(path.glob('custom_checkpoint_*.pkl'))]
    return next((p for p in map(_read_problem, (f for f in small if f.is_file())) if p), None)


def _file_problem(path: Path) -> Optional[str]:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in ('.safetensors', '.bin', '.pkl'))
    return next((p for p in map(_read_problem, files) if p), None)


_WRITE_ERRNOS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                 errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                 errno.EPERM: 'operation not permitted'}
# how the writers that do not raise OSError (torch.save's zip writer, safetensors' Rust one) say the same
_WRITE_MESSAGES = (('No space left', errno.ENOSPC), ('os error 28', errno.ENOSPC), ('Disk quota', errno.EDQUOT),
                   ('os error 122', errno.EDQUOT), ('Read-only file system', errno.EROFS), ('os error 30', errno.EROFS),
                   ('Permission denied', errno.EACCES), ('os error 13', errno.EACCES))
_CUT_SHORT = ('unexpected pos', 'PytorchStreamWriter failed', 'file write failed')


def write_error(error: BaseException, path: str | os.PathLike, doing: str, then: str = '') -> Optional[RunFolderError]:
    """A one-line :class:`RunFolderError` for a failed write (disk full, read-only, no permission), else None.

    ``doing`` says what was being written (``'saving checkpoint X'``), ``then`` what is kept and what to do.
    torch.save reports a full disk as ``unexpected pos N vs M``: then the free space decides the wording.
    """
    path = Path(getattr(error, 'filename', None) or path)
    code = error.errno if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS else None
    text = str(error)
    code = code or next((c for needle, c in _WRITE_MESSAGES if needle in text), None)
    free = _free_bytes(path)
    if code is None and any(needle in text for needle in _CUT_SHORT):
        code = errno.ENOSPC if free is not None and free < 64 * 2 ** 20 else errno.EIO
    if code is None:
        return None
    reason = _WRITE_ERRNOS.get(code, 'the write was cut short')
    where = f' ({free / 2 ** 20:.1f} MiB free there)' if free is not None and code in (errno.ENOSPC, errno.EIO) else ''
    named = '' if str(path) in doing else f': {path}'
    return RunFolderError(f'{doing}: {reason}{named}{where}{"; " + then if then else ""}')


def _free_bytes(path: Path) -> Optional[int]:
    for folder in (path, *path.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def check_writable(folder: str | os.PathLike) -> None:
    """Raise :class:`RunFolderError` when ``folder`` (or, not created yet, its nearest existing parent) cannot be
    written: a read-only file system or no permission, found before anything is trained."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or os.access(existing, os.W_OK | os.X_OK):
        return
    reason = 'read-only file system' if os.statvfs(existing).f_flag & os.ST_RDONLY else 'permission denied'
    raise RunFolderError(f'output_dir: {existing} is not writable ({reason}); choose another --output-dir or make '
                         f'it writable')


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON (non-finite floats as null) with ``pce_timm.utils.write_file_atomic``."""
    return write_file_atomic(path, json.dumps(_json_safe(data), indent=2) + '\n')


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, float) and value == 0:
        return 0.0  # no -0.0 in results
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_model_dir(
        model: nn.Module,
        model_dir: str | os.PathLike,
        data_config: Optional[Dict[str, Any]] = None,
        label_names: Optional[List[str]] = None,
        state_dict: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Save ``config.json`` + ``model.safetensors`` in timm's Hub format (as ``timm.models.save_for_hf``), atomically.

    The files are written by ``pce_timm.hub.write_model_files`` (as in a release) inside
    ``pce_timm.utils.atomic_folder``, so ``model_dir`` is always either the previous complete export or the new
    one. ``timm.create_model(f'local-dir:{model_dir}', pretrained=True)`` rebuilds the model (timm records the
    model args) with these weights.

    Args:
        model: the (unwrapped) model; its ``pretrained_cfg`` and model args go to ``config.json``.
        model_dir: the folder to create or replace.
        data_config: the preprocessing used in training (input_size, mean, std, crop_pct, interpolation).
        label_names: class names in label order.
        state_dict: the weights to save (e.g. ``accelerator.get_state_dict(model)`` under FSDP); default the
            model's own.
    """
    from pce_timm.hub.release import write_model_files

    model_config = {'label_names': list(label_names)} if label_names else None
    with atomic_folder(model_dir) as tmp:
        write_model_files(tmp, model, state_dict=state_dict, model_config=model_config, data_config=data_config)
    return Path(model_dir)
