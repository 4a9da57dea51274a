"""Detection and segmentation data in one place: what `pce_timm.tasks` and the dense training scripts use.

    train = dense_dataset('voc', 'VOCdevkit', 'train', 'detection', transforms=v2.Compose([...]))
    loader = DataLoader(train, batch_size=8, collate_fn=detection_collate)
    seg = dense_dataset('camelyon', 'tiles', 'val', 'segmentation')

Items are torchvision `tv_tensors` (Image, BoundingBoxes, Mask), so `torchvision.transforms.v2` transforms the
boxes and masks with the image. Bad files raise `DenseDataError` naming the file and the problem.
"""
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from .camelyon import CAMELYON_CLASSES, TileSegmentation
from .voc import IGNORE_INDEX, VOC_CLASSES, DenseDataError, VOCDetection, VOCSegmentation, find_voc_root

__all__ = [
    'CAMELYON_CLASSES', 'DENSE_DATASETS', 'IGNORE_INDEX', 'VOC_CLASSES', 'DenseDataError', 'TileSegmentation',
    'VOCDetection', 'VOCSegmentation', 'dense_dataset', 'dense_dataset_name', 'detection_collate', 'find_voc_root',
]

# name -> {task: dataset class}
DENSE_DATASETS: dict[str, dict[str, type[Dataset]]] = {
    'voc': {'detection': VOCDetection, 'segmentation': VOCSegmentation},
    'camelyon': {'segmentation': TileSegmentation},
}
_NAME_ALIASES = {'pascal_voc': 'voc', 'voc2007': 'voc', 'voc2012': 'voc', 'camelyon16': 'camelyon'}


def dense_dataset_name(name: Any) -> Any:
    """The canonical name of a dense dataset (case, `-` / `_` and aliases such as `voc2012` do not matter)."""
    key = name.strip().lower().replace('-', '_') if isinstance(name, str) else name
    return _NAME_ALIASES.get(key, key)


def dense_dataset(
        name: str,
        data_dir: str | os.PathLike | None,
        split: str,
        task: str,
        transforms: Callable | None = None,
        max_samples: int | None = None,
        seed: int = 0,
) -> Dataset:
    """One split of a named detection / segmentation dataset from local files.

    Args:
        name: `voc` (a VOCdevkit, one year folder, a labelme export or a `make_dense_dataset.py` set) or
            `camelyon` (segmentation tiles); case, `-` and `_` do not matter.
        data_dir: The dataset's folder (required: these datasets are read from local files only).
        split: The split name as the dataset spells it (`train`, `val`, `trainval`, `test`).
        task: `detection` or `segmentation`.
        transforms: torchvision.transforms.v2 style, called with `(image, target)` or `(image, mask)`.
        max_samples: Keep a seeded random subset of this many images.
        seed: Seed of that subset.

    Raises:
        ValueError: Unknown name, or a task the dataset does not have.
        DenseDataError: No data_dir, a missing folder or bad files.
    """
    key = dense_dataset_name(name)
    if key not in DENSE_DATASETS:
        raise ValueError(f'Unknown dense dataset {name!r}; known: {", ".join(DENSE_DATASETS)} (a set made by '
                         'scripts/make_dense_dataset.py is a VOCdevkit: use voc).')
    tasks = DENSE_DATASETS[key]
    if task not in tasks:
        raise ValueError(f'Dataset {key!r} has no {task!r} task; it has: {", ".join(tasks)}.')
    if data_dir is None:
        raise DenseDataError(f'Dataset {key!r} is read from local files: pass data_dir (--data-dir DIR). '
                             'scripts/make_dense_dataset.py writes a small VOC-format set.')
    return tasks[task](data_dir, split=split, transforms=transforms, max_samples=max_samples, seed=seed)


def detection_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """`[(image, target), ...]` -> `([image, ...], [target, ...])`, the list format torchvision detectors take."""
    return [image for image, _ in batch], [target for _, target in batch]
