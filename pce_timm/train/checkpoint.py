"""Checkpoint helpers: the trainer state accelerate saves with each checkpoint, resume lookup, final export.

A run folder looks like::

    <output_dir>/
      config.yaml          resolved config (a recipe: --config reads it back; --resume reads it too)
      checkpoints/checkpoint_<i>/   accelerate save_state: model, optimizer, RNG states, trainer state
      model/               config.json + model.safetensors (timm Hub format): timm.create_model('local-dir:...')
      results.json         final metrics, routing statistics, history, wall time, config
      logs/                metrics.csv (+ TensorBoard events)
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from pce_timm.utils import atomic_folder, write_file_atomic

__all__ = [
    'TrainerState', 'NonFiniteLossError', 'checkpoint_folders', 'is_complete', 'latest_checkpoint', 'mark_complete',
    'resolve_resume', 'save_model_dir', 'write_json_atomic',
]


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


COMPLETE_MARKER = '.complete'


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
    """Whether a checkpoint was written to the end (a run killed while saving leaves one without the marker)."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def mark_complete(checkpoint: str | os.PathLike) -> None:
    (Path(checkpoint) / COMPLETE_MARKER).touch()


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete ``checkpoints/checkpoint_<i>`` folder of a run (by accelerate's number), or None."""
    complete = [path for _, path in checkpoint_folders(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def resolve_resume(resume: Optional[str], output_dir: str | os.PathLike) -> Optional[Path]:
    """Turn ``--resume`` into a checkpoint folder.

    ``None``: start fresh. ``'auto'``: the newest complete checkpoint of ``output_dir``, or None if it has
    none. A run folder: its newest complete checkpoint. A checkpoint folder: itself.

    Raises:
        FileNotFoundError: a named run folder holds no complete checkpoint, or a named checkpoint is incomplete.
    """
    if resume is None:
        return None
    if resume == 'auto':
        return latest_checkpoint(output_dir)
    path = Path(resume)
    is_checkpoint = any(path.glob('model*.safetensors')) or any(path.glob('pytorch_model*.bin'))
    if is_checkpoint and not (path / 'checkpoints').is_dir():
        if not is_complete(path):
            raise FileNotFoundError(f'resume: {path} is incomplete (the run stopped while saving it); resume from '
                                    f'the run folder {path.parent.parent} to use its newest complete checkpoint')
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f'resume: {path} holds no complete checkpoints/checkpoint_<i> folder to resume from')
    return found


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
