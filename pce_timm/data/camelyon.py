"""Camelyon-style histopathology data: segmentation tiles (image + binary tumour mask) and PCam (HDF5).

PCam (https://github.com/basveeling/pcam): `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`, x
`[N, 96, 96, 3]` uint8, y `[N, 1, 1, 1]` (0 normal, 1 tumor), read through h5py by `load_pcam` into a classification
`datasets.Dataset` (`scripts/train.py --dataset pcam --data-dir DIR`).

Tiles, the layout tilers write from Camelyon16 annotations:

    DIR/train/images/<stem>.png|jpg|tif      RGB tiles
    DIR/train/masks/<stem>.png               same stem; 0 = background, 1 or 255 = tumour
    DIR/val/...                              (`valid` / `validation` are accepted for `val`, and for `test`)
"""
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import numpy as np
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .loader import subset_indices
from .registry import PCAM_CLASSES, DatasetNotFoundError
from .sources import _pnm_bytes
from .voc import DenseDataError, read_image, read_mask

__all__ = ['CAMELYON_CLASSES', 'PCAM_CLASSES', 'TileSegmentation', 'find_pcam_files', 'load_pcam', 'open_pcam']

CAMELYON_CLASSES = ('background', 'tumor')
TILE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff')
MASK_SUFFIXES = ('.png', '.tif', '.tiff')
_SPLIT_ALIASES = {'val': ('val', 'valid', 'validation'), 'valid': ('valid', 'val', 'validation'),
                  'validation': ('validation', 'val', 'valid'), 'test': ('test', 'val', 'valid', 'validation')}
_TILE_LAYOUT = ('DIR/<split>/images/<stem>.png|jpg|tif and DIR/<split>/masks/<stem>.png '
                '(0 = background, 1 or 255 = tumour)')


class TileSegmentation(Dataset):
    """Image tiles with same-named binary tumour masks: `(image, mask)` as `VOCSegmentation` gives them.

    Args:
        data_dir: The folder holding one folder per split (see the module docstring).
        split: `train`, `val` or `test` (the first existing of the aliases is used).
        transforms: Called as `transforms(image, mask)` (torchvision.transforms.v2 style).
        max_samples: Keep a seeded random subset of this many tiles, in file order.
        seed: Seed of that subset.

    Items: `image` a uint8 `[3, H, W]` tv_tensors.Image, `mask` an int64 `[H, W]` tv_tensors.Mask of 0 / 1.
    """

    classes = CAMELYON_CLASSES

    def __init__(self, data_dir: str | os.PathLike, split: str = 'train', transforms: Callable | None = None,
                 max_samples: int | None = None, seed: int = 0):
        root = Path(data_dir).expanduser()
        candidates = [root / name for name in _SPLIT_ALIASES.get(split, (split,))]
        split_dir = next((d for d in candidates if (d / 'images').is_dir()), None)
        if split_dir is None:
            looked = ', '.join(f'{d}/images/' for d in candidates)
            raise DenseDataError(f'No {split!r} tiles in {root}: looked for {looked}. Expected {_TILE_LAYOUT}.')
        self.root, self.split, self.transforms = root, split, transforms
        images = sorted(p for p in (split_dir / 'images').iterdir() if p.suffix.lower() in TILE_SUFFIXES)
        if not images:
            raise DenseDataError(f'{split_dir / "images"} holds no tiles ({", ".join(TILE_SUFFIXES)}).')
        if max_samples is not None and max_samples < len(images):
            images = [images[i] for i in subset_indices(len(images), max_samples, seed).tolist()]
        self.image_paths = images
        self.mask_paths = [self._mask_path(split_dir / 'masks', p) for p in images]

    @staticmethod
    def _mask_path(mask_dir: Path, image_path: Path) -> Path:
        for suffix in MASK_SUFFIXES:
            path = mask_dir / f'{image_path.stem}{suffix}'
            if path.is_file():
                return path
        raise DenseDataError(f'Tile {image_path} has no mask: expected {mask_dir / image_path.stem}.png.')

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image = read_image(self.image_paths[index])
        mask = read_mask(self.mask_paths[index], len(self.classes), tuple(image.shape[-2:]), binary=True)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f'TileSegmentation(root={str(self.root)!r}, split={self.split!r}, {len(self)} tiles)'


# ---------------------------------------------------------------------------------------------------------
# PCam: 96x96 patches of Camelyon16 slides, labelled tumour / normal, in HDF5 files


PCAM_SPLITS = ('train', 'valid', 'test')
PCAM_FILE = 'camelyonpatch_level_2_split_{split}_{xy}.h5'
_PCAM_CHUNK = 1024


def find_pcam_files(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The `(x, y)` HDF5 files of a PCam split in `data_dir` or in torchvision's `data_dir/pcam/`.

    Raises:
        DatasetNotFoundError: The files are not there (or only gzipped); the message says which names were looked for.
    """
    if split not in PCAM_SPLITS:
        raise ValueError(f'Unknown PCam split {split!r}; PCam has {", ".join(PCAM_SPLITS)}.')
    root = Path(data_dir).expanduser()
    names = [PCAM_FILE.format(split=split, xy=xy) for xy in 'xy']
    for folder in (root, root / 'pcam'):
        if all((folder / n).is_file() for n in names):
            return folder / names[0], folder / names[1]
    zipped = [str(f / f'{n}.gz') for f in (root, root / 'pcam') for n in names if (f / f'{n}.gz').is_file()]
    hint = f' Found {", ".join(zipped)}: gunzip them first (h5py reads plain .h5).' if zipped else ''
    raise DatasetNotFoundError(
        f'PCam {split} split not found: looked for {" and ".join(names)} in {root} and {root / "pcam"}.{hint} '
        'Download the files from https://github.com/basveeling/pcam and pass their folder as --data-dir.')


@contextlib.contextmanager
def open_pcam(x_path: Path, y_path: Path) -> Iterator[tuple['h5py.Dataset', 'h5py.Dataset']]:  # noqa: F821
    """The `x` `[N, 96, 96, 3]` uint8 and `y` `[N, 1, 1, 1]` HDF5 datasets of a PCam split, format checked."""
    try:
        import h5py  # only PCam needs it
    except ImportError as e:
        raise DatasetNotFoundError('Reading PCam needs h5py: pip install h5py.') from e

    def open_h5(path: Path) -> 'h5py.File':
        try:
            return h5py.File(path, 'r')
        except OSError as e:
            raise DenseDataError(f'Cannot open PCam file {path} as HDF5: {e}') from e

    with open_h5(x_path) as x_file, open_h5(y_path) as y_file:
        if 'x' not in x_file or 'y' not in y_file:
            raise DenseDataError(f'{x_path} / {y_path}: expected HDF5 datasets named x (in the _x file) and y (in the '
                                 f'_y file) as PCam ships them; found {list(x_file)} and {list(y_file)}.')
        x, y = x_file['x'], y_file['y']
        if x.ndim != 4 or x.shape[1:] != (96, 96, 3) or x.dtype != np.uint8:
            raise DenseDataError(f'{x_path}: x has shape {x.shape} and dtype {x.dtype}; PCam has [N, 96, 96, 3] '
                                 'uint8.')
        if y.shape[0] != x.shape[0] or int(np.prod(y.shape[1:])) != 1:
            raise DenseDataError(f'{y_path}: y has shape {y.shape}; expected [{x.shape[0]}, 1, 1, 1] (one label per '
                                 f'image of {x_path}).')
        yield x, y


def _pcam_rows(x_path: str, y_path: str, stamp: tuple) -> Iterator[dict]:
    """Rows `{image: PNM bytes, label}`, read in chunks (`stamp` only keys datasets' cache to the files)."""
    with open_pcam(Path(x_path), Path(y_path)) as (x, y):
        for start in range(0, x.shape[0], _PCAM_CHUNK):
            labels = np.asarray(y[start:start + _PCAM_CHUNK]).reshape(-1)
            bad = np.setdiff1d(labels, (0, 1))
            if len(bad):
                raise DenseDataError(f'{y_path} holds labels {bad.tolist()[:5]} in rows {start}..; PCam labels are '
                                     '0 (normal) and 1 (tumor).')
            for image, label in zip(np.asarray(x[start:start + _PCAM_CHUNK]), labels, strict=True):
                yield {'image': {'bytes': _pnm_bytes(image), 'path': None}, 'label': int(label)}


def load_pcam(data_dir: str | os.PathLike, split: str = 'train', cache_dir: str | None = None) -> datasets.Dataset:
    """A PCam split as a `datasets.Dataset` with `image` (decodes to a 96x96 RGB PIL image) and `label` columns.

    The HDF5 files are read in chunks through h5py into an Arrow file in `datasets`' cache (`cache_dir`), so
    the 262,144 training images never sit in memory at once; the cache is keyed to the files' size and mtime.

    Args:
        data_dir: Folder with `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5` (or its `pcam/`).
        split: `train`, `valid` or `test`.
        cache_dir: `datasets` cache folder.
    """
    x_path, y_path = find_pcam_files(data_dir, split)
    with open_pcam(x_path, y_path):
        pass  # the format is checked up front, before datasets starts a cache
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (x_path, y_path))
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=list(PCAM_CLASSES)))
    return datasets.Dataset.from_generator(
        _pcam_rows, features=features, cache_dir=cache_dir,
        gen_kwargs={'x_path': str(x_path), 'y_path': str(y_path), 'stamp': stamp})
