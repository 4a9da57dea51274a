"""Datasets, transforms and loaders for training pce_timm models, usable offline.

    info = dataset_info('fashion_mnist')                      # num_classes, in_chans, input_size, mean, std
    train = load_image_dataset('fashion_mnist', 'train')      # datasets.Dataset: image (PIL), label (ClassLabel)
    transform = create_dataset_transform(info, is_training=True, hflip=0.0, black_patches_prob=0.5)
    loader = create_loader(train, transform, batch_size=128, shuffle=True, seed=0)

See `load.py` for where datasets are searched, and `sources.py` for the local layouts understood.
Detection and segmentation (Pascal VOC, Camelyon tiles): `dense.py` (`dense_dataset`, `detection_collate`); PCam
(HDF5) is a classification dataset of `load_image_dataset` (`camelyon.py`); `compose.py` writes the composed set.
"""
from .augment import BlackPatches, ChannelBoost
from .camelyon import CAMELYON_CLASSES, TileSegmentation, load_pcam
from .dense import dense_dataset, detection_collate
from .load import hub_reachable, is_offline, load_image_dataset
from .loader import ImageClassificationDataset, ImageReadError, create_loader, read_rows, subset_indices
from .registry import DatasetNotFoundError, DatasetSpec, dataset_info, get_dataset_spec, list_datasets
from .sources import arrays_to_dataset, read_idx, stratified_split_indices
from .transforms import ConvertImageMode, create_dataset_transform, resolve_in_chans
from .voc import IGNORE_INDEX, VOC_CLASSES, DenseDataError, VOCDetection, VOCSegmentation, find_voc_root

__all__ = [
    'CAMELYON_CLASSES', 'IGNORE_INDEX', 'VOC_CLASSES', 'DenseDataError', 'TileSegmentation', 'VOCDetection',
    'VOCSegmentation', 'dense_dataset', 'detection_collate', 'find_voc_root', 'load_pcam',
    'BlackPatches', 'ChannelBoost', 'ConvertImageMode', 'DatasetNotFoundError', 'DatasetSpec',
    'ImageClassificationDataset', 'ImageReadError', 'arrays_to_dataset', 'create_dataset_transform', 'create_loader',
    'dataset_info',
    'get_dataset_spec', 'hub_reachable', 'is_offline', 'list_datasets', 'load_image_dataset', 'read_idx',
    'read_rows', 'resolve_in_chans', 'stratified_split_indices', 'subset_indices',
]
