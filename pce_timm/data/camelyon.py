"""Camelyon-style histopathology data: segmentation tiles (image + binary tumour mask) and PCam (HDF5).

Tiles, the layout tilers write from Camelyon16 annotations:

    DIR/train/images/<stem>.png|jpg|tif      RGB tiles
    DIR/train/masks/<stem>.png               same stem; 0 = background, 1 or 255 = tumour
    DIR/val/...                              (`valid` / `validation` are accepted for `val`, and for `test`)
"""
import os
from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset
from torchvision import tv_tensors

from .loader import subset_indices
from .voc import DenseDataError, read_image, read_mask

__all__ = ['CAMELYON_CLASSES', 'TileSegmentation']

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
