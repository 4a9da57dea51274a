"""A run's data: the datasets and loaders of a :class:`~.config.DataConfig` (:func:`load_data`,
:func:`build_loaders`), and a training loader whose order and augmentation are functions of (seed, epoch,
sample) only.

Why: accelerate's DataLoaderShard loads one batch ahead, so when a checkpoint is saved after batch k the next
batch has already been augmented with the global RNG. Restoring that RNG state on resume would augment batch
k + 1 differently and the resumed run would drift. Here every sample is augmented inside an RNG context
seeded from (seed, epoch, index) and the global RNG states are restored afterwards, so

- a mid-epoch resume (``--checkpoint-steps``) reproduces the uninterrupted run bit for bit;
- augmentation does not depend on ``num_workers`` or on which rank loads a sample;
- the global RNGs are left to the training loop (mixup, Gumbel noise, dropout), which accelerate checkpoints.

The sampler encodes the epoch into the indices it yields (``epoch * n + i``), so persistent workers learn
the epoch without any cross-process state.
"""
import random
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pce_timm.data import create_dataset_transform, create_loader, dataset_info, load_image_dataset, subset_indices
from pce_timm.data.loader import read_rows
from pce_timm.data.sources import stratified_split_indices

from .config import AugmentConfig, DataConfig
from .recipe import RecipeError

__all__ = ['EpochSampler', 'SeededAugmentDataset', 'create_train_loader', 'DataBundle', 'data_config', 'load_data',
           'build_transforms', 'build_loaders', 'holdout_split']

_MIX = 0x9E3779B97F4A7C15  # golden-ratio odd constant: spreads (seed, epoch, index) over 63 bits


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-spread 63-bit seed for one sample of one epoch."""
    value = (seed * _MIX + epoch) * _MIX + index
    value ^= value >> 31
    return (value * _MIX) % (2 ** 63 - 1)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch; yields ``epoch * n + index`` (see :class:`SeededAugmentDataset`)."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1) % (2 ** 62))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        offset = self.epoch * self.num_samples
        return iter([offset + i for i in order])


class SeededAugmentDataset(Dataset):
    """``(transform(image), label)`` of sample ``i`` in epoch ``e``, augmented under RNGs seeded from (seed, e, i).

    Python's ``random`` and torch's default CPU generator (what timm / torchvision / pce_timm transforms draw
    from) are seeded for the call and restored afterwards; NumPy's global RNG too when ``isolate_numpy``
    (timm's RandAugment / AugMix draw from it; restoring it costs ~0.1 ms a sample, so it is opt-in).
    Batches are read from the Arrow table in one call (``__getitems__``), which is ~2x faster than row by row.

    Args:
        dataset: a ``datasets.Dataset`` with ``image`` and ``label`` columns (from ``load_image_dataset``).
        transform: PIL image -> tensor (None returns the PIL image).
        seed: the run's seed.
        isolate_numpy: also seed and restore NumPy's global RNG around each transform.
    """

    def __init__(self, dataset: datasets.Dataset, transform: Optional[Callable], seed: int = 0,
                 isolate_numpy: bool = False):
        missing = {'image', 'label'} - set(dataset.column_names)
        if missing:
            raise ValueError(f'dataset needs image and label columns; missing {sorted(missing)}')
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.isolate_numpy = isolate_numpy

    def __len__(self) -> int:
        return len(self.dataset)

    def _augment(self, image, epoch: int, index: int):
        if self.transform is None:
            return image
        seed = sample_seed(self.seed, epoch, index)
        generator = torch.default_generator
        torch_state, py_state = generator.get_state(), random.getstate()
        np_state = np.random.get_state() if self.isolate_numpy else None
        try:
            generator.manual_seed(seed)
            random.seed(seed)
            if np_state is not None:
                np.random.seed(seed % (2 ** 32))
            return self.transform(image)
        finally:
            generator.set_state(torch_state)
            random.setstate(py_state)
            if np_state is not None:
                np.random.set_state(np_state)

    def __getitems__(self, codes: List[int]) -> List[Tuple[torch.Tensor, int]]:
        n = len(self.dataset)
        pairs = [divmod(int(code), n) for code in codes]
        rows = read_rows(self.dataset, [index for _, index in pairs])  # an unreadable image names its file
        return [(self._augment(image, epoch, index), int(label))
                for (epoch, index), image, label in zip(pairs, rows['image'], rows['label'], strict=True)]

    def __getitem__(self, code: int) -> Tuple[torch.Tensor, int]:
        return self.__getitems__([code])[0]


def create_train_loader(
        dataset: datasets.Dataset,
        transform: Callable,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        max_samples: Optional[int] = None,
        isolate_numpy: bool = False,
) -> DataLoader:
    """Shuffled, full-batch training loader over ``dataset`` (``max_samples``: a fixed random subset)."""
    if max_samples is not None:
        indices = subset_indices(len(dataset), max_samples, seed)
        if len(indices) < len(dataset):
            dataset = dataset.select(indices.tolist())
    images = SeededAugmentDataset(dataset, transform, seed, isolate_numpy)
    # An own generator: creating an iterator draws the workers' base seed from it, not from the global RNG
    # (which a mid-epoch resume would otherwise see drawn once more than the uninterrupted run did).
    return DataLoader(images, batch_size=batch_size, sampler=EpochSampler(len(images), seed), drop_last=True,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class DataBundle:
    """The datasets of a run and what models and transforms need to know about them."""

    def __init__(self, data: DataConfig):
        self.info = dataset_info(data.dataset)
        self.in_chans = data.in_chans or self.info['in_chans']
        size = data.img_size
        self.img_size = (size, size) if size else tuple(self.info['img_size'])
        self.train = None
        self.eval = None

    @property
    def num_classes(self) -> int:
        return self.info['num_classes']


def data_config(bundle: DataBundle, crop_pct: float) -> Dict[str, Any]:
    """The preprocessing of a run as a timm data config (saved with the model's ``pretrained_cfg``)."""
    return {'input_size': (bundle.in_chans, *bundle.img_size), 'mean': tuple(bundle.info['mean']),
            'std': tuple(bundle.info['std']), 'crop_pct': crop_pct, 'interpolation': 'bicubic'}


def load_data(data: DataConfig, splits: Iterable[str] = ('train', 'eval')) -> DataBundle:
    """Load the run's splits; a missing or unreadable dataset raises the data package's error right here.

    Raises:
        pce_timm.data.DatasetNotFoundError: the split was not found or could not be read (the message lists
            where it looked and how to provide the data).
    """
    bundle = DataBundle(data)
    if data.val_fraction is not None:  # the eval split is held out of the training split
        train, held_out = holdout_split(load_image_dataset(data.dataset, 'train', data.data_dir), data.val_fraction)
        bundle.train = train if 'train' in splits else None
        bundle.eval = held_out if 'eval' in splits else None
        return bundle
    if 'train' in splits:
        bundle.train = load_image_dataset(data.dataset, 'train', data.data_dir)
    if 'eval' in splits:
        bundle.eval = load_image_dataset(data.dataset, data.eval_split, data.data_dir)
    return bundle


def holdout_split(dataset: datasets.Dataset, fraction: float) -> Tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held out): every ``round(1 / fraction)``-th image of each class, in dataset order, is held out.

    No random numbers: the same images on every machine, seed and library version, stratified by class, so a
    validation split (``--val-fraction``) never overlaps the images trained on.
    """
    every = max(2, round(1 / fraction))
    held_out = stratified_split_indices(np.asarray(dataset['label']), 'test', test_every=every)
    rest = np.setdiff1d(np.arange(len(dataset)), held_out)
    return dataset.select(rest.tolist()), dataset.select(held_out.tolist())


def build_transforms(augment: AugmentConfig, bundle: DataBundle) -> Tuple[Callable, Callable]:
    """The (train, eval) transforms: ``augment``'s augmentation for training, the plain resize / crop for eval."""
    cfg = data_config(bundle, augment.crop_pct)
    train_tf = create_dataset_transform(
        cfg, is_training=True, in_chans=bundle.in_chans, no_aug=augment.no_aug, scale=tuple(augment.scale),
        ratio=tuple(augment.ratio), hflip=augment.hflip, color_jitter=augment.color_jitter,
        auto_augment=augment.aa, re_prob=augment.reprob, black_patches_prob=augment.black_patches_prob,
        channel_boost_prob=augment.channel_boost_prob)
    eval_tf = create_dataset_transform(cfg, is_training=False, in_chans=bundle.in_chans)
    return train_tf, eval_tf


def build_loaders(data: DataConfig, augment: AugmentConfig, bundle: DataBundle,
                  seed: int) -> Dict[str, DataLoader]:
    """Train loader (shuffled, seeded, full batches), eval loader, and a small loader for K-Means key init."""
    train_tf, eval_tf = build_transforms(augment, bundle)
    loaders = {}
    if bundle.train is not None:
        loaders['train'] = create_train_loader(bundle.train, train_tf, data.batch_size, seed=seed,
                                               num_workers=data.workers, max_samples=data.max_train_samples,
                                               isolate_numpy=bool(augment.aa))
        loaders['train_sampler'] = loaders['train'].sampler
        if len(loaders['train']) == 0:
            raise RecipeError(f'batch_size: {data.batch_size} is larger than the {len(loaders["train"].dataset)} '
                              f'training samples (every batch is full, so no step would run); lower --batch-size '
                              f'or raise --max-train-samples')
        loaders['key_init'] = create_loader(
            bundle.train, eval_tf, batch_size=data.batch_size, shuffle=True, seed=seed + 1,
            max_samples=data.max_train_samples)
    if bundle.eval is not None:
        loaders['eval'] = create_loader(
            bundle.eval, eval_tf, batch_size=data.eval_batch_size, num_workers=data.workers, seed=seed,
            max_samples=data.max_eval_samples)
    return loaders
