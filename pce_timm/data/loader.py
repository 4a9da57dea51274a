"""A torch view of an image `datasets.Dataset` and a deterministic DataLoader over it."""
from collections.abc import Callable
from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .registry import DatasetNotFoundError

__all__ = ['ImageReadError', 'ImageClassificationDataset', 'create_loader', 'read_rows', 'subset_indices']

# what PIL raises for a file that is not a whole image: UnidentifiedImageError and 'image file is truncated' are
# OSErrors, some broken headers SyntaxError / ValueError
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageReadError(DatasetNotFoundError):
    """An image of a dataset cannot be decoded (truncated, corrupt, not an image); the message names the file."""


def read_rows(dataset: datasets.Dataset, indices: list[int]) -> dict[str, list[Any]]:
    """``dataset[indices]`` (columns of those rows, images decoded to PIL).

    Raises:
        ImageReadError: an image cannot be decoded, naming its file (or row, for images stored in the table)
            and what to do.
    """
    try:
        return dataset[indices]
    except _DECODE_ERRORS as e:
        raise _image_error(dataset, indices, e) from None


def _image_error(dataset: datasets.Dataset, indices: list[int], error: BaseException) -> BaseException:
    """The ImageReadError for the first of ``indices`` whose image does not decode, else ``error`` itself."""
    if 'image' not in dataset.column_names or not isinstance(dataset.features.get('image'), datasets.Image):
        return error
    raw = dataset.cast_column('image', datasets.Image(decode=False))
    for index in indices:
        cell = raw[int(index)]['image']
        try:
            datasets.Image().decode_example(cell)
        except _DECODE_ERRORS as e:
            path = cell.get('path') if isinstance(cell, dict) else None
            where = f'image file {path}' if path and cell.get('bytes') is None else (
                f'the image of row {index} ({path or "bytes stored in the dataset"})')
            return ImageReadError(
                f'cannot read {where}: {type(e).__name__}: {e}. It is truncated, corrupt or not an image: replace '
                f'it with a readable copy or remove it from the dataset, then run again.')
    return error


class ImageClassificationDataset(Dataset):
    """`(transform(image), label)` pairs from a Dataset with `image` and `label` columns; labels stay Python ints.

    Args:
        dataset: A Dataset as returned by `load_image_dataset`.
        transform: Maps a PIL image to a tensor, e.g. from `create_dataset_transform`; None returns the PIL image.
    """

    def __init__(self, dataset: datasets.Dataset, transform: Callable | None = None):
        missing = {'image', 'label'} - set(dataset.column_names)
        if missing:
            raise ValueError(f'dataset needs columns image and label; missing {sorted(missing)} in '
                             f'{dataset.column_names}. Use load_image_dataset to get normalised columns.')
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        rows = read_rows(self.dataset, [int(index)])  # an image that does not decode: ImageReadError naming it
        image, label = rows['image'][0], rows['label'][0]
        image = image if self.transform is None else self.transform(image)
        return image, int(label)


def subset_indices(num_rows: int, max_samples: int, seed: int = 0) -> torch.Tensor:
    """Indices of a deterministic random subset: the first `max_samples` of `torch.randperm(num_rows)` drawn with
    a generator seeded with `seed`, sorted back into dataset order (so reads stay mostly sequential).

    Not stratified: with a few samples per class the class counts can be uneven.
    """
    if not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples < 1:
        raise ValueError(f'max_samples must be a positive int or None, got {max_samples!r}.')
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=generator)[:max_samples].sort().values


def create_loader(
        dataset: datasets.Dataset,
        transform: Callable | None,
        batch_size: int = 64,
        shuffle: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        max_samples: int | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of `(images [B, C, H, W], labels [B] int64)` batches with a seeded, reproducible order.

    The shuffle order comes from a `torch.Generator` seeded with `seed`; worker processes are seeded from it
    too (torch seeds `random`, `numpy` and `torch` in each worker), so augmentation is reproducible for a
    fixed `num_workers`. With `num_workers=0` augmentation draws from the main process's global RNGs: seed
    them (e.g. `timm.utils.random_seed`) for reproducible runs.

    Args:
        dataset: A Dataset with `image` and `label` columns (from `load_image_dataset`).
        transform: PIL image -> tensor (from `create_dataset_transform`).
        batch_size: Samples per batch.
        shuffle: Reshuffle every epoch (reproducibly).
        num_workers: Loader worker processes (0 loads in the main process).
        seed: Seed for the subset, the shuffle order and the workers.
        max_samples: Keep only this many samples (see `subset_indices`); None keeps all.
        drop_last: Drop the last incomplete batch (useful with timm's Mixup, which needs an even batch).
        pin_memory: Pin batches for faster host-to-GPU copies.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f'num_workers must be an int >= 0, got {num_workers!r}.')
    if max_samples is not None:
        indices = subset_indices(len(dataset), max_samples, seed)
        if len(indices) < len(dataset):
            dataset = dataset.select(indices.tolist())
    return DataLoader(
        ImageClassificationDataset(dataset, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
