"""Release folders: what timm expects in a Hugging Face model repo, written atomically and byte-for-byte
deterministically, and checkpoints read back with errors that name the file and the problem.

A release folder::

    config.json        architecture, num_classes, num_features, model_args, pretrained_cfg (timm's own format,
                       written by timm's ``save_config_for_hf``, then canonical JSON text)
    model.safetensors  the state dict; no pickle anywhere
    README.md          the model card (rendered by ``pce_timm.release.render``)
    ...                optional extra files, e.g. ``results.json`` or ``figures/routing.png``

Accepted checkpoint inputs (``find_release_source``): a training run folder (``model/config.json`` +
``model/model.safetensors``, optional ``results.json``), a timm-style folder (``config.json`` +
``model.safetensors``), or a ``.safetensors`` file with a sibling ``config.json``.
"""
import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Mapping, Optional, Union

import safetensors.torch
import timm
import torch
from safetensors import SafetensorError

# timm has no public writer of config.json alone: timm.models.save_for_hf writes the weights too (as pickle, or
# as safetensors without the 'format' metadata), so releases would not be byte-identical. save_config_for_hf's
# data_config argument (the preprocessing of the exported weights) exists from timm 1.0.31 on. This is the one
# place pce_timm uses it.
from timm.models._hub import save_config_for_hf

from pce_timm.utils import atomic_folder

__all__ = [
    'CONFIG_NAME', 'WEIGHTS_NAME', 'CARD_NAME', 'RESULTS_NAME', 'EVAL_RESULTS_NAME', 'ReleaseError', 'ReleaseSource',
    'write_release', 'find_release_source', 'check_model_folder', 'load_model_from_source', 'check_safetensors',
    'release_files',
    'state_dict_to_safetensors', 'write_model_files', 'check_finite', 'non_finite_tensors',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'
RESULTS_NAME = 'results.json'  # the training run's record (its own evaluations included)
EVAL_RESULTS_NAME = 'eval_results.json'  # the evaluation of the released weights behind the card's numbers
_CORE_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)

# bytes per element of every dtype a safetensors header may name
_DTYPE_SIZES = {
    'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'F8_E8M0': 1,
    'I16': 2, 'U16': 2, 'F16': 2, 'BF16': 2,
    'I32': 4, 'U32': 4, 'F32': 4, 'C64': 8,
    'I64': 8, 'U64': 8, 'F64': 8,
}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_MAX_LISTED = 8  # problems listed per kind in a mismatch message

ExtraFile = Union[str, bytes, os.PathLike]


class ReleaseError(ValueError):
    """A release or checkpoint cannot be written or read. The message names the file, the problem and a fix."""


@dataclass(frozen=True)
class ReleaseSource:
    """Where a checkpoint's pieces live on disk.

    Attributes:
        config_path: timm ``config.json`` describing the architecture.
        weights_path: ``.safetensors`` state dict.
        results_path: optional ``results.json`` from the run (shipped with the release when present).
    """
    config_path: Path
    weights_path: Path
    results_path: Optional[Path] = None


def write_release(
        model: torch.nn.Module,
        out_dir: Union[str, os.PathLike],
        *,
        model_card: str,
        extra_files: Optional[Mapping[str, ExtraFile]] = None,
        model_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        verify: bool = True,
) -> Path:
    """Write ``model`` as a Hub release folder: config.json, model.safetensors, README.md and extras.

    The folder is written by ``pce_timm.utils.atomic_folder``, so a failure never leaves a half-written folder
    where a good one was. Bytes are deterministic: the same model, card and extras give identical files, so pushing
    the result again is a no-op on the Hub.

    Args:
        model: a timm model (needs ``pretrained_cfg``, i.e. built by ``timm.create_model``).
        out_dir: release folder to create or replace. An existing folder is only replaced if it is empty or
            looks like a release (has a config.json).
        model_card: README.md text, front matter included.
        extra_files: repo path -> text, bytes or a local file to copy (e.g. ``{'results.json': path}``).
        model_config: extra top-level config fields (e.g. ``label_names``).
        model_args: explicit, JSON-serializable model constructor args for config.json.
        data_config: preprocessing used with these weights (input size, mean/std, crop).
        verify: rebuild the model from the written config.json and check the weights load into it strictly.

    Returns:
        The release folder path.
    """
    out_dir = Path(out_dir)
    extras = _normalize_extra_files(extra_files)
    _check_replaceable(out_dir)
    if not getattr(model, 'pretrained_cfg', None):
        raise ReleaseError(
            f'{type(model).__name__} has no pretrained_cfg, so timm cannot describe it in config.json. '
            f'Build it with timm.create_model(...) before writing a release.')
    check_finite(model.state_dict(), f'{type(model).__name__} (the model to release)')
    with atomic_folder(out_dir) as tmp_dir:
        write_model_files(tmp_dir, model, model_config=model_config, model_args=model_args, data_config=data_config)
        _write_bytes(tmp_dir / CARD_NAME, model_card.encode('utf-8'))
        for name, data in extras.items():
            _write_bytes(tmp_dir / name, data)
        if verify:
            _verify_release(tmp_dir)
    return out_dir


def write_model_files(
        folder: Union[str, os.PathLike],
        model: torch.nn.Module,
        *,
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        model_config: Optional[Dict[str, Any]] = None,
        model_args: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (timm's Hub format) into ``folder``, deterministically.

    The one model-folder writer: releases (``write_release``) and training exports
    (``pce_timm.train.checkpoint.save_model_dir``) call it inside ``pce_timm.utils.atomic_folder``.

    Args:
        folder: an existing folder, usually the temporary one of ``atomic_folder``.
        model: a timm model with a ``pretrained_cfg``; it describes the architecture in config.json.
        state_dict: the weights to save (e.g. gathered under FSDP); default ``model.state_dict()``.
        model_config: extra top-level config fields, e.g. ``label_names``.
        model_args: explicit, JSON-serializable model constructor args for config.json.
        data_config: preprocessing used with these weights (input size, mean/std, crop).
    """
    folder = Path(folder)
    _write_config(model, folder / CONFIG_NAME, model_config, model_args, data_config)
    weights = model.state_dict() if state_dict is None else state_dict
    _write_bytes(folder / WEIGHTS_NAME, state_dict_to_safetensors(weights))


def state_dict_to_safetensors(state_dict: Mapping[str, Any]) -> bytes:
    """Serialize a state dict to safetensors bytes (CPU, contiguous, no shared storage, ``format: pt``)."""
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ReleaseError(
                f'state dict entry {key!r} is a {type(value).__name__}, not a tensor; safetensors stores tensors '
                f'only. Drop it from state_dict() (e.g. extra_state) before writing a release.')
        # clone: tied / shared tensors would otherwise make safetensors refuse to save
        tensors[key] = value.detach().to('cpu').contiguous().clone()
    return safetensors.torch.save(tensors, metadata={'format': 'pt'})


def release_files(release_dir: Union[str, os.PathLike]) -> Dict[str, Path]:
    """Files of a release folder as ``{repo path: local path}``, sorted, hidden files and folders skipped."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise ReleaseError(f'{release_dir}: not a release folder (no such directory).')
    files = {}
    for path in sorted(release_dir.rglob('*')):
        rel = path.relative_to(release_dir)
        if path.is_file() and not any(part.startswith('.') for part in rel.parts):
            files[rel.as_posix()] = path
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in files]
    if missing:
        raise ReleaseError(
            f'{release_dir}: not a release folder, missing {", ".join(missing)}. '
            f'Write one with pce_timm.hub.write_release or scripts/push_to_hub.py --dry-run OUT_DIR.')
    return files


def find_release_source(path: Union[str, os.PathLike]) -> ReleaseSource:
    """Locate config, weights and results for a run folder, a timm-style folder or a .safetensors file."""
    path = Path(path)
    accepted = (
        'a run folder (model/config.json + model/model.safetensors), a timm-style folder '
        '(config.json + model.safetensors) or a .safetensors file next to a config.json')
    if not path.exists():
        raise ReleaseError(f'{path}: no such file or directory. Pass {accepted}.')
    if path.is_file():
        if path.suffix != '.safetensors':
            raise ReleaseError(
                f'{path}: only .safetensors checkpoints are accepted (no pickle). Pass {accepted}.')
        return ReleaseSource(_require(path.parent / CONFIG_NAME, accepted), path, _optional(path.parent))
    for folder in (path / 'model', path):
        if (folder / CONFIG_NAME).is_file():
            weights = _require(folder / WEIGHTS_NAME, accepted)
            return ReleaseSource(folder / CONFIG_NAME, weights, _optional(path) or _optional(folder))
    raise ReleaseError(f'{path}: found no config.json in {path / "model"} or {path}. Pass {accepted}.')


def check_model_folder(path: Union[str, os.PathLike]) -> ReleaseSource:
    """Check that a model folder (a run folder, ``<run>/model``, a release) loads, without reading its tensors.

    What :func:`load_model_from_source` checks before it loads (config.json, the safetensors framing, the
    architecture, every key and shape), on a model built on the meta device; NaN / inf values are not looked at
    (loading warns about them, releasing refuses them).

    Raises:
        ReleaseError: naming the file and what is wrong: no config.json / weights, invalid JSON, an unknown
            architecture, truncated or corrupt safetensors, keys or shapes that do not fit the architecture.
    """
    source = find_release_source(path)
    config = _read_config(source.config_path)
    header = check_safetensors(source.weights_path)
    try:
        model = _build_model(source.config_path, config, device='meta')
    except ReleaseError as e:
        if not isinstance(e.__cause__, (RuntimeError, NotImplementedError)):
            raise
        model = _build_model(source.config_path, config)  # an __init__ op without a meta kernel: build for real
    _check_keys_and_shapes(model, header, source, config)
    return source


def load_model_from_source(source: ReleaseSource) -> torch.nn.Module:
    """Build the model described by ``source.config_path`` and load ``source.weights_path`` strictly.

    Raises:
        ReleaseError: unreadable config, truncated or corrupt safetensors, unknown architecture, or weights
            that do not fit the architecture (missing / unexpected keys, shape mismatches).
    """
    config = _read_config(source.config_path)
    header = check_safetensors(source.weights_path)
    model = _build_model(source.config_path, config)
    _check_keys_and_shapes(model, header, source, config)
    try:
        state_dict = safetensors.torch.load_file(source.weights_path, device='cpu')
    except (SafetensorError, OSError) as e:
        raise ReleaseError(f'{source.weights_path}: cannot be read as safetensors ({e}). Re-export it.') from e
    check_finite(state_dict, str(source.weights_path))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def non_finite_tensors(state_dict: Mapping[str, Any]) -> Dict[str, int]:
    """``{name: number of NaN / inf values}`` of the floating-point tensors of a state dict that hold any."""
    bad = {}
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not tensor.is_meta:
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad[name] = count
    return bad


def check_finite(state_dict: Mapping[str, Any], where: str) -> None:
    """Refuse weights holding NaN / inf (a training blow-up): nothing built from them is worth publishing.

    Raises:
        ReleaseError: naming ``where`` and the tensors (with how many values are not finite).
    """
    bad = non_finite_tensors(state_dict)
    if bad:
        listed = ', '.join(f'{name} ({count})' for name, count in list(bad.items())[:_MAX_LISTED])
        more = f', ... ({len(bad)} tensors in all)' if len(bad) > _MAX_LISTED else ''
        raise ReleaseError(
            f'{where}: weights hold NaN / inf values in {listed}{more}. These weights come from a run that blew up; '
            f'release an earlier, finite checkpoint (scripts/train.py --resume PATH to retrain from one).')


def check_safetensors(path: Union[str, os.PathLike]) -> Dict[str, Dict[str, Any]]:
    """Validate a safetensors file's framing without loading tensors; return ``{name: {dtype, shape}}``.

    Catches truncated downloads and copies, files that are not safetensors at all, and headers whose
    offsets do not add up, each with a message naming the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open('rb') as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ReleaseError(f'{path}: truncated: {size} bytes is too short to be a safetensors file.')
        (header_len,) = struct.unpack('<Q', prefix)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ReleaseError(
                f'{path}: corrupt or truncated: the header claims {header_len} bytes but the file has {size}. '
                f'It is not a complete safetensors file; re-export or re-download it.')
        raw_header = f.read(header_len)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReleaseError(f'{path}: corrupt safetensors header, not JSON ({e}). Re-export it.') from e
    if not isinstance(header, dict):
        raise ReleaseError(f'{path}: corrupt safetensors header, expected a JSON object. Re-export it.')
    header.pop('__metadata__', None)
    data_len = _check_offsets(path, header)
    actual = size - 8 - header_len
    if actual < data_len:
        raise ReleaseError(
            f'{path}: truncated: the header promises {data_len} bytes of tensor data but the file holds {actual} '
            f'({data_len - actual} bytes missing). Re-export or re-download it.')
    if actual > data_len:
        raise ReleaseError(
            f'{path}: corrupt: {actual - data_len} unexpected bytes after the last tensor. Re-export it.')
    return {name: {'dtype': info['dtype'], 'shape': tuple(info['shape'])} for name, info in header.items()}


def _check_offsets(path: Path, header: Dict[str, Any]) -> int:
    """Check every tensor's dtype, shape and byte range; return the total data length."""
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info['data_offsets']
            nbytes = math.prod(info['shape']) * _DTYPE_SIZES[info['dtype']]
        except (KeyError, TypeError, ValueError) as e:
            raise ReleaseError(f'{path}: corrupt safetensors header entry {name!r}: {info!r}. Re-export it.') from e
        if stop - begin != nbytes or begin < 0:
            raise ReleaseError(
                f'{path}: corrupt safetensors header: {name!r} spans bytes [{begin}, {stop}) but its '
                f'{info["dtype"]} {info["shape"]} needs {nbytes}. Re-export it.')
        end = max(end, stop)
    return end


def _check_keys_and_shapes(
        model: torch.nn.Module,
        header: Dict[str, Dict[str, Any]],
        source: ReleaseSource,
        config: Dict[str, Any],
) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    mismatched = [
        f'{k}: checkpoint {header[k]["shape"]} vs model {expected[k]}'
        for k in sorted(set(expected) & set(header)) if header[k]['shape'] != expected[k]]
    problems = []
    for label, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatch', mismatched)):
        if items:
            more = f', ... ({len(items)} in all)' if len(items) > _MAX_LISTED else ''
            problems.append(f'  {label}: {", ".join(items[:_MAX_LISTED])}{more}')
    if problems:
        arch = config.get('architecture')
        raise ReleaseError(
            f'{source.weights_path.name} does not fit {source.config_path} '
            f'(architecture {arch!r}, num_classes={config.get("num_classes")}):\n' + '\n'.join(problems) +
            f'\nExport config and weights from the same model (pce_timm.hub.write_release), or fix '
            f'num_classes / model_args in {source.config_path.name}.')


def _build_model(config_path: Path, config: Dict[str, Any], device: Optional[str] = None) -> torch.nn.Module:
    """Build the architecture exactly as ``timm.create_model('local-dir:...')`` would, without weights."""
    arch = config['architecture']
    if not timm.is_model(arch):
        raise ReleaseError(
            f'{config_path}: architecture {arch!r} is not a registered timm model. Import the package that '
            f'registers it (pce_* models: `import pce_timm`) or fix "architecture".')
    try:
        with contextlib.nullcontext() if device is None else torch.device(device):  # meta: no memory, any timm model
            return timm.create_model(f'local-dir:{config_path.parent}', pretrained=False)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ReleaseError(
            f'{config_path}: cannot build {arch!r} from model_args {config.get("model_args", {})}: {e}') from e


def _read_config(path: Path) -> Dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReleaseError(f'{path}: not valid JSON ({e}). Re-export it with write_release.') from e
    if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
        raise ReleaseError(f'{path}: not a timm config, it has no "architecture". Re-export it with write_release.')
    return config


def _write_config(
        model: torch.nn.Module,
        path: Path,
        model_config: Optional[Dict[str, Any]],
        model_args: Optional[Dict[str, Any]],
        data_config: Optional[Dict[str, Any]],
) -> None:
    try:
        save_config_for_hf(model, str(path), model_config=model_config, model_args=model_args, data_config=data_config)
    except ValueError as e:
        raise ReleaseError(f'cannot describe the model in config.json: {e}') from e
    # canonical text (timm leaves no final newline); key order is timm's and stable
    config = json.loads(path.read_text(encoding='utf-8'))
    # timm reads num_classes from the top level; a second copy in model_args makes Hugging Face transformers'
    # TimmWrapper (which passes num_classes=num_labels itself) fail with "multiple values for 'num_classes'"
    if config.get('model_args', {}).get('num_classes') == config.get('num_classes'):
        config['model_args'].pop('num_classes', None)
    _write_bytes(path, (json.dumps(config, indent=2) + '\n').encode('utf-8'))


def _verify_release(release_dir: Path) -> None:
    load_model_from_source(ReleaseSource(release_dir / CONFIG_NAME, release_dir / WEIGHTS_NAME))


def _normalize_extra_files(extra_files: Optional[Mapping[str, ExtraFile]]) -> Dict[str, bytes]:
    """Validate extra file names and read their contents up front, before anything is written."""
    extras = {}
    for name, value in sorted((extra_files or {}).items()):
        parts = PurePosixPath(name).parts
        if not parts or name.startswith('/') or any(p in ('.', '..') or p.startswith('.') for p in parts):
            raise ReleaseError(f'extra file name {name!r} must be a relative path without hidden or ".." parts.')
        if name in _CORE_FILES:
            raise ReleaseError(f'extra file name {name!r} clashes with a file write_release writes itself.')
        if isinstance(value, str):
            extras[name] = value.encode('utf-8')
        elif isinstance(value, bytes):
            extras[name] = value
        elif isinstance(value, os.PathLike):
            extras[name] = Path(value).read_bytes()
        else:
            raise ReleaseError(
                f'extra file {name!r} is a {type(value).__name__}; pass text (str), bytes or a path.')
    return extras


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir.is_dir() and (_is_empty(out_dir) or (out_dir / CONFIG_NAME).is_file())):
        raise ReleaseError(
            f'{out_dir} exists and is not a release folder (no config.json); refusing to replace it. '
            f'Choose another output folder.')


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir())


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _require(path: Path, accepted: str) -> Path:
    if not path.is_file():
        raise ReleaseError(f'{path}: missing. Pass {accepted}.')
    return path


def _optional(folder: Path) -> Optional[Path]:
    path = folder / RESULTS_NAME
    return path if path.is_file() else None
