"""Pascal VOC detection and segmentation from local files, as torchvision `tv_tensors`.

Layout (a VOCdevkit, one of its year folders, or a labelme `labelme2voc.py` export):

    VOCdevkit/VOC2012/
        Annotations/<stem>.xml               boxes: size, object/name, object/bndbox, object/difficult
        JPEGImages/<stem>.jpg
        SegmentationClass/<stem>.png         palette PNG: the palette index is the class id, 255 = ignore
        ImageSets/Main/{train,val,...}.txt   detection splits, one stem a line
        ImageSets/Segmentation/{...}.txt     segmentation splits
        class_names.txt                      optional (labelme): one class a line, `_background_` first

labelme writes `SegmentationClassPNG/` (and `.npy` arrays in `SegmentationClass/`); both folder names are
read. Without ImageSets every image that has an annotation (or a mask) is used, with a logged note.

Boxes are read as written: XYXY floats in pixels, checked against `0 <= xmin < xmax <= width` (same for y).
Every item is `tv_tensors`, so `torchvision.transforms.v2` moves boxes and masks with the image.
"""
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .loader import subset_indices

__all__ = [
    'IGNORE_INDEX', 'VOC_CLASSES', 'DenseDataError', 'VOCDetection', 'VOCSegmentation', 'find_voc_root',
    'read_class_names', 'read_image', 'read_mask',
]

_logger = logging.getLogger(__name__)

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor',
)
IGNORE_INDEX = 255
BACKGROUND_NAMES = ('background', '_background_')
VOC_YEARS = ('VOC2012', 'VOC2007')
MASK_DIRS = ('SegmentationClass', 'SegmentationClassPNG')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


class DenseDataError(ValueError):
    """Bad detection / segmentation data; the message names the file and the problem."""


def find_voc_root(data_dir: str | os.PathLike) -> Path:
    """The VOC year folder inside `data_dir`.

    `data_dir` is a year folder itself (it has `Annotations/` or `JPEGImages/`), a VOCdevkit (VOC2012 is picked,
    else VOC2007, else the newest other `VOC*` year folder), or the folder holding `VOCdevkit/`.

    Raises:
        DenseDataError: No such folder; the message lists the layouts looked for and what `data_dir` holds.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DenseDataError(f'VOC data_dir {root} does not exist (or is not a folder). {_VOC_LAYOUT_HINT}')
    for devkit in (root, root / 'VOCdevkit'):
        if _is_year_folder(devkit):
            return devkit
        others = sorted((p for p in devkit.glob('VOC*') if p.name not in VOC_YEARS), reverse=True)
        for year in [devkit / y for y in VOC_YEARS] + others:
            if _is_year_folder(year):
                return year
    found = sorted(p.name + ('/' if p.is_dir() else '') for p in root.iterdir())
    raise DenseDataError(
        f'No Pascal VOC layout in {root}: looked for {root}/Annotations/ or {root}/JPEGImages/ (a year folder), '
        f'{root}/VOC2012/ or {root}/VOC2007/ (a VOCdevkit) and {root}/VOCdevkit/VOC2012|VOC2007/. '
        f'{root} holds: {", ".join(found[:20]) or "nothing"}{", ..." if len(found) > 20 else ""}. {_VOC_LAYOUT_HINT}')


_VOC_LAYOUT_HINT = ('Expected VOCdevkit/VOC2012/{Annotations, JPEGImages, SegmentationClass, ImageSets/Main, '
                    'ImageSets/Segmentation}; pass the VOCdevkit or one year folder.')


def _is_year_folder(folder: Path) -> bool:
    return (folder / 'Annotations').is_dir() or (folder / 'JPEGImages').is_dir()


def _name_key(name: str) -> str:
    return re.sub(r'[^a-z0-9]', '', name.lower())


def read_class_names(root: Path) -> tuple[str, ...]:
    """Class names of a VOC folder: its `class_names.txt` (labelme's format) when present, else `VOC_CLASSES`.

    `class_names.txt` holds one name a line: an optional `__ignore__` first (labelme's id -1, i.e. 255 in the
    masks), then the background (`_background_` or `background`, id 0), then the classes in id order.
    """
    path = root / 'class_names.txt'
    if not path.is_file():
        return VOC_CLASSES
    names = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
    if names and names[0] == '__ignore__':
        names = names[1:]
    if not names or names[0] not in BACKGROUND_NAMES:
        raise DenseDataError(
            f'{path}: the first class (after an optional __ignore__) must be _background_ or background (id 0), '
            f'got {names[:1]}. Put one class a line in id order, starting with _background_.')
    keys = [_name_key(n) for n in names]
    duplicates = sorted({n for n, k in zip(names, keys, strict=True) if keys.count(k) > 1})
    if duplicates:
        raise DenseDataError(f'{path}: class names {duplicates} appear more than once (case and punctuation '
                             'are ignored when matching names).')
    return tuple(names)


def read_image(path: Path) -> tv_tensors.Image:
    """An image file as a uint8 `[3, H, W]` tv_tensors.Image (grayscale and RGBA are converted to RGB)."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert('RGB'))
    except OSError as e:
        raise DenseDataError(f'Cannot read image {path}: {e}') from e
    return tv_tensors.Image(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def read_mask(path: Path, num_classes: int, image_size: tuple[int, int], binary: bool = False) -> tv_tensors.Mask:
    """A class-id PNG as an int64 `[H, W]` tv_tensors.Mask, checked against its image and the classes.

    Args:
        path: A palette (`P`) or grayscale (`L`) PNG whose pixel values are class ids, 255 = ignore.
        num_classes: Ids must be in `[0, num_classes)` or `IGNORE_INDEX`.
        image_size: `(H, W)` of the mask's image.
        binary: Read a 0/1 or 0/255 mask (Camelyon tiles): 1 and 255 are class 1, other values are an error.
    """
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in ('P', 'L', '1', 'I', 'I;16') and not binary:
                raise DenseDataError(
                    f'Mask {path} is a {mode} image; expected a palette (P) or grayscale (L) PNG whose pixel '
                    'values are class ids (VOC SegmentationClass format), not colours.')
            ids = np.asarray(image.convert('L') if binary and mode not in ('P', 'L', '1') else image)
    except OSError as e:
        raise DenseDataError(f'Cannot read mask {path}: {e}') from e
    if ids.shape != tuple(image_size):
        raise DenseDataError(f'Mask {path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but its image is '
                             f'{image_size[1]}x{image_size[0]}; a mask must have its image\'s size.')
    if binary:
        bad = np.setdiff1d(np.unique(ids), (0, 1, 255))
        if len(bad):
            raise DenseDataError(f'Binary mask {path} holds values {bad.tolist()[:10]}; expected 0 (background) '
                                 'and 1 or 255 (tumour).')
        ids = ids != 0
    mask = torch.from_numpy(ids.astype(np.int64))
    bad = torch.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if len(bad):
        raise DenseDataError(
            f'Mask {path} holds class ids {bad.tolist()[:10]} outside the {num_classes} classes [0, {num_classes}) '
            f'(and {IGNORE_INDEX} = ignore). Check class_names.txt or the mask files.')
    return tv_tensors.Mask(mask)


@dataclass(frozen=True)
class VOCAnnotation:
    """One parsed `Annotations/<stem>.xml`: image size (None if absent), boxes XYXY, labels, difficult flags."""
    size: tuple[int, int] | None
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def _text(element: ET.Element | None, tag: str) -> str | None:
    child = element.find(tag) if element is not None else None
    return child.text.strip() if child is not None and child.text and child.text.strip() else None


def parse_voc_xml(path: Path, classes: Sequence[str]) -> VOCAnnotation:
    """Parse one VOC annotation file, checking every box and class name.

    Raises:
        DenseDataError: Unreadable XML, an unknown class name, a missing coordinate, a box outside the image or
            with `xmax <= xmin` / `ymax <= ymin`.
    """
    try:
        tree = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DenseDataError(f'Cannot parse VOC annotation {path}: {e}') from e
    class_ids = {_name_key(name): i for i, name in enumerate(classes)}
    try:
        width, height = (int(float(_text(tree.find('size'), t) or 0)) for t in ('width', 'height'))
    except ValueError as e:
        raise DenseDataError(f'{path}: <size> has a non-numeric width or height ({e}).') from e
    size = (height, width) if width > 0 and height > 0 else None
    boxes, labels, difficult = [], [], []
    for number, obj in enumerate(tree.iter('object')):
        name = _text(obj, 'name')
        if name is None or _name_key(name) not in class_ids or class_ids[_name_key(name)] == 0:
            raise DenseDataError(
                f'{path}: object {number} has unknown class name {name!r}; known: {", ".join(classes[1:])}'
                ' (a class_names.txt next to Annotations/ sets the names of a custom set).')
        box = _parse_box(path, number, name, obj.find('bndbox'), size)
        boxes.append(box)
        labels.append(class_ids[_name_key(name)])
        difficult.append((_text(obj, 'difficult') or '0') not in ('0', 'false', 'False'))
    return VOCAnnotation(size, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
                         np.asarray(difficult, bool))


def _parse_box(path: Path, number: int, name: str, bndbox: ET.Element | None,
               size: tuple[int, int] | None) -> list[float]:
    where = f'{path}: object {number} ({name})'
    try:
        xmin, ymin, xmax, ymax = (float(_text(bndbox, t)) for t in ('xmin', 'ymin', 'xmax', 'ymax'))
    except (TypeError, ValueError) as e:
        raise DenseDataError(f'{where} needs a <bndbox> with numeric xmin, ymin, xmax, ymax ({e}).') from e
    if xmax <= xmin or ymax <= ymin:
        raise DenseDataError(f'{where} has an empty box: xmin={xmin}, xmax={xmax}, ymin={ymin}, ymax={ymax} '
                             '(need xmax > xmin and ymax > ymin).')
    if size is not None and (xmin < 0 or ymin < 0 or xmax > size[1] or ymax > size[0]):
        raise DenseDataError(f'{where} has a box ({xmin}, {ymin}, {xmax}, {ymax}) outside the {size[1]}x{size[0]} '
                             'image (need 0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height).')
    return [xmin, ymin, xmax, ymax]


class _VOCBase(Dataset):
    """What detection and segmentation share: the root, the classes, the split's stems and the image files."""

    split_folder: str = ''

    def __init__(self, data_dir: str | os.PathLike, split: str, transforms: Callable | None,
                 max_samples: int | None, seed: int):
        self.root = find_voc_root(data_dir)
        self.classes = read_class_names(self.root)
        self.split = split
        self.transforms = transforms
        stems = self._split_stems(split)
        if not stems:
            raise DenseDataError(f'{self._split_source()} gives no images for split {split!r}.')
        if max_samples is not None and max_samples < len(stems):
            stems = [stems[i] for i in subset_indices(len(stems), max_samples, seed).tolist()]
        self.stems = stems
        self.image_paths = [self._image_path(stem) for stem in stems]

    def __len__(self) -> int:
        return len(self.stems)

    def _all_stems(self) -> list[str]:
        raise NotImplementedError

    def _split_stems(self, split: str) -> list[str]:
        split_dir = self.root / 'ImageSets' / self.split_folder
        split_file = split_dir / f'{split}.txt'
        if not split_dir.is_dir():
            stems = self._all_stems()
            _logger.info('%s has no ImageSets/%s/: using all %d images for split %r.', self.root, self.split_folder,
                         len(stems), split)
            return stems
        if not split_file.is_file():
            available = sorted(p.stem for p in split_dir.glob('*.txt') if '_' not in p.stem)
            raise DenseDataError(f'Split file {split_file} does not exist; splits in {split_dir}: '
                                 f'{", ".join(available) or "none"}.')
        lines = split_file.read_text(encoding='utf-8').splitlines()
        return [line.split()[0] for line in lines if line.strip()]

    def _image_path(self, stem: str) -> Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / 'JPEGImages' / f'{stem}{suffix}'
            if path.is_file():
                return path
        raise DenseDataError(
            f'{self._split_source()} lists {stem!r}, but {self.root / "JPEGImages" / stem}.jpg does not exist.')

    def _split_source(self) -> str:
        split_file = self.root / 'ImageSets' / self.split_folder / f'{self.split}.txt'
        if split_file.is_file():
            return str(split_file)
        return f'{self.root} (no ImageSets/{self.split_folder}/, so every annotated or masked image)'

    @staticmethod
    def _check_size(image: tv_tensors.Image, expected: tuple[int, int] | None, xml_path: Path,
                    image_path: Path) -> None:
        if expected is not None and tuple(image.shape[-2:]) != expected:
            raise DenseDataError(f'{xml_path} gives the image size {expected[1]}x{expected[0]} (WxH), but '
                                 f'{image_path} is {image.shape[-1]}x{image.shape[-2]}.')

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, {len(self)} images, '
                f'{len(self.classes)} classes)')


class VOCDetection(_VOCBase):
    """Pascal VOC boxes: `(image, target)` with `target = {boxes, labels, difficult, image_id, file}`.

    Args:
        data_dir: A VOCdevkit, one year folder, or a folder holding `VOCdevkit/` (see `find_voc_root`).
        split: A file in `ImageSets/Main/` (`train`, `val`, `trainval`, `test`); without ImageSets every image
            with an `Annotations/*.xml` is used.
        transforms: Called as `transforms(image, target)` (torchvision.transforms.v2 style).
        keep_difficult: Keep objects marked `difficult` (their flag is in the target either way).
        max_samples: Keep a seeded random subset of this many images (`subset_indices`), in split order.
        seed: Seed of that subset.

    Items: `image` a uint8 `[3, H, W]` tv_tensors.Image; `boxes` float32 `[N, 4]` tv_tensors.BoundingBoxes XYXY
    in pixels; `labels` int64 `[N]` indices into `classes` (1..); `difficult` bool `[N]`; `image_id` the index
    in this dataset; `file` the stem. Every annotation is parsed (and checked) when the dataset is built.
    """

    split_folder = 'Main'

    def __init__(self, data_dir: str | os.PathLike, split: str = 'train', transforms: Callable | None = None,
                 keep_difficult: bool = True, max_samples: int | None = None, seed: int = 0):
        super().__init__(data_dir, split, transforms, max_samples, seed)
        self.keep_difficult = keep_difficult
        self.annotations = [parse_voc_xml(self._annotation_path(stem), self.classes) for stem in self.stems]

    def _all_stems(self) -> list[str]:
        folder = self.root / 'Annotations'
        if not folder.is_dir():
            raise DenseDataError(f'{self.root} has no Annotations/ folder, so it holds no boxes. {_VOC_LAYOUT_HINT}')
        return sorted(p.stem for p in folder.glob('*.xml'))

    def _annotation_path(self, stem: str) -> Path:
        path = self.root / 'Annotations' / f'{stem}.xml'
        if not path.is_file():
            raise DenseDataError(f'{self._split_source()} lists {stem!r}, but its annotation {path} does not exist.')
        return path

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image = read_image(self.image_paths[index])
        annotation = self.annotations[index]
        self._check_size(image, annotation.size, self._annotation_path(self.stems[index]), self.image_paths[index])
        keep = slice(None) if self.keep_difficult else ~annotation.difficult
        target = {
            'boxes': tv_tensors.BoundingBoxes(torch.from_numpy(annotation.boxes[keep]), format='XYXY',
                                              canvas_size=tuple(image.shape[-2:])),
            'labels': torch.from_numpy(annotation.labels[keep]),
            'difficult': torch.from_numpy(annotation.difficult[keep]),
            'image_id': int(index),
            'file': self.stems[index],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class VOCSegmentation(_VOCBase):
    """Pascal VOC class masks: `(image, mask)` with an int64 `[H, W]` mask of class ids, 255 = ignore.

    Args:
        data_dir: A VOCdevkit, one year folder, or a folder holding `VOCdevkit/` (see `find_voc_root`).
        split: A file in `ImageSets/Segmentation/`; without it every image with a mask PNG is used.
        transforms: Called as `transforms(image, mask)` (torchvision.transforms.v2 style).
        max_samples: Keep a seeded random subset of this many images, in split order.
        seed: Seed of that subset.

    Masks come from `SegmentationClass/<stem>.png` (or labelme's `SegmentationClassPNG/`).
    """

    split_folder = 'Segmentation'

    def __init__(self, data_dir: str | os.PathLike, split: str = 'train', transforms: Callable | None = None,
                 max_samples: int | None = None, seed: int = 0):
        self.mask_dir: Path | None = None
        super().__init__(data_dir, split, transforms, max_samples, seed)
        self.mask_dir = self._find_mask_dir()
        self.mask_paths = [self._mask_path(stem) for stem in self.stems]

    def _find_mask_dir(self) -> Path:
        for name in MASK_DIRS:
            if any((self.root / name).glob('*.png')):
                return self.root / name
        raise DenseDataError(f'{self.root} has no class masks: looked for PNGs in '
                             f'{" and ".join(str(self.root / n) for n in MASK_DIRS)}. {_VOC_LAYOUT_HINT}')

    def _all_stems(self) -> list[str]:
        return sorted(p.stem for p in self._find_mask_dir().glob('*.png'))

    def _mask_path(self, stem: str) -> Path:
        path = self.mask_dir / f'{stem}.png'
        if not path.is_file():
            raise DenseDataError(f'{self._split_source()} lists {stem!r}, but its mask {path} does not exist.')
        return path

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image = read_image(self.image_paths[index])
        mask = read_mask(self.mask_paths[index], len(self.classes), tuple(image.shape[-2:]))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask
