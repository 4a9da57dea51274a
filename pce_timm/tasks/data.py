"""Loaders of the dense tasks over :mod:`pce_timm.data.dense`'s readers: transforms (torchvision v2, which move
boxes and masks with the image), seeded per-sample augmentation as in :mod:`pce_timm.train.data` (so a
mid-epoch resume replays the same batches), and eval shards per process (torchmetrics gathers them).
"""
import contextlib
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from pce_timm.data.dense import dense_dataset, detection_collate
from pce_timm.train.data import EpochSampler, sample_seed

__all__ = ['DenseData', 'SeededDenseDataset', 'dense_transforms', 'build_dense_loaders', 'stacked_collate',
           'eval_shard']


class DenseData:
    """The splits of a dense run and what the model needs to know (``info`` as a classification bundle's)."""

    def __init__(self, dataset: str, data_dir: Optional[str], task: str, img_size: int, eval_split: str,
                 max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None, seed: int = 0,
                 train: bool = True):
        self.task = task
        self.img_size = (img_size, img_size)
        self.train = dense_dataset(dataset, data_dir, 'train', task, max_samples=max_train_samples,
                                   seed=seed) if train else None
        self.eval = dense_dataset(dataset, data_dir, eval_split, task, max_samples=max_eval_samples, seed=seed)
        self.classes: Tuple[str, ...] = tuple(self.eval.classes)
        self.in_chans = 3  # the readers give RGB
        self.info = {'name': dataset, 'num_classes': len(self.classes), 'class_names': list(self.classes),
                     'in_chans': 3, 'img_size': list(self.img_size)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def dense_transforms(task: str, img_size: int, training: bool, hflip: float = 0.5,
                     mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
    """v2 transforms to a float [0, 1] image of ``img_size`` (segmentation also normalises; torchvision's
    detectors normalise inside). Training adds a horizontal flip with probability ``hflip``."""
    steps: List[Any] = [v2.Resize((img_size, img_size), antialias=True)]
    if training and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(v2.ToImage())
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, 'others': None}, scale=True))
    if task == 'segmentation':
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


class SeededDenseDataset(Dataset):
    """Item ``i`` of epoch ``e`` (index ``e * n + i``, from :class:`~pce_timm.train.data.EpochSampler`), transformed
    under python / torch RNGs seeded from (seed, e, i) and restored afterwards."""

    def __init__(self, dataset: Dataset, transforms, seed: int = 0):
        self.dataset = dataset
        self.transforms = transforms
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self.dataset))
        image, target = self.dataset[index]
        with _seeded(sample_seed(self.seed, epoch, index)):
            image, target = self.transforms(image, target)
        if isinstance(target, torch.Tensor):  # a mask: plain long tensor for the loss
            target = target.as_subclass(torch.Tensor).long()
        return image.as_subclass(torch.Tensor), target


class _Transformed(Dataset):
    def __init__(self, dataset: Dataset, transforms):
        self.dataset = dataset
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.transforms(*self.dataset[index])
        if isinstance(target, torch.Tensor):
            target = target.as_subclass(torch.Tensor).long()
        return image.as_subclass(torch.Tensor), target


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    generator = torch.default_generator
    torch_state, py_state = generator.get_state(), random.getstate()
    try:
        generator.manual_seed(seed)
        random.seed(seed)
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(py_state)


def stacked_collate(batch) -> Tuple[torch.Tensor, List[Any]]:
    """Images stacked (all are ``img_size``) with the targets as a list: K-Means key init and pictures."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]


def eval_shard(dataset: Dataset, rank: int, world: int) -> Dataset:
    """This process's share of an eval split (every ``world``-th item): no padding, so no sample is counted twice."""
    return Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset


def build_dense_loaders(data: DenseData, batch_size: int, eval_batch_size: int, seed: int, workers: int = 0,
                        hflip: float = 0.5, rank: int = 0, world: int = 1) -> Dict[str, Any]:
    """``train`` (seeded, shuffled, full batches), ``train_sampler``, ``key_init`` and this rank's ``eval``."""
    size = data.img_size[0]
    collate = detection_collate if data.task == 'detection' else None
    loaders: Dict[str, Any] = {}
    if data.train is not None:
        train = SeededDenseDataset(data.train, dense_transforms(data.task, size, True, hflip), seed)
        if len(train) < batch_size:
            raise ValueError(f'batch_size: {batch_size} is larger than the {len(train)} training images; lower '
                             f'batch_size or raise max_train_samples')
        loaders['train'] = DataLoader(train, batch_size=batch_size, sampler=EpochSampler(len(train), seed),
                                      drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                      collate_fn=collate, generator=torch.Generator().manual_seed(seed))
        loaders['train_sampler'] = loaders['train'].sampler
        plain = _Transformed(data.train, dense_transforms(data.task, size, False))
        loaders['key_init'] = DataLoader(plain, batch_size=batch_size, shuffle=True, collate_fn=stacked_collate,
                                         generator=torch.Generator().manual_seed(seed + 1))
    shard = eval_shard(_Transformed(data.eval, dense_transforms(data.task, size, False)), rank, world)
    loaders['eval'] = DataLoader(shard, batch_size=eval_batch_size, shuffle=False, num_workers=workers,
                                 collate_fn=collate)
    return loaders
