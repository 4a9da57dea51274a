"""A small detection + segmentation set composed from real Fashion-MNIST items, written as a VOCdevkit.

    summary = write_composed_voc('data/fmnist_voc', ComposeConfig(num_train=2000, num_val=500))
    train = VOCDetection('data/fmnist_voc', 'train')          # read back by the same reader as real VOC

Each canvas (`canvas_size` square, RGB) is a mid-grey background with per-pixel grey noise, on which 1-4 items
are pasted: a random Fashion-MNIST image (train canvases from its train split, val and test canvases from its
test split: from all of it without a test split, from its first and second half with one, so val and test
share no item), scaled to a random side, placed at random where it overlaps the items already placed by at most
`max_overlap` of the smaller tight box, and drawn in a random saturated colour with the item's ink as alpha.
The grey-noise background and the random colours keep the task from being a brightness threshold of one channel:
the class is in the shape, not in the colour, and all three channels carry signal.

Labels, all from the pixels after pasting (later items lie on top of earlier ones):
    * class mask: an item's pixels are those whose ink is >= `ink_threshold` (of 255); the palette index is the
      class id (0 background, 1..10 the Fashion-MNIST classes in their label order);
    * object mask (VOC's SegmentationObject): the same pixels numbered by object (1.., in XML order);
    * ignore (255): like VOC's border, a 1-pixel ring of background around every item (8-neighbourhood), where
      the faint, below-threshold ink of the item's edge makes the label ambiguous; item pixels are never ignored;
    * boxes: the extent of each item's visible pixels (occlusion considered), `xmax = last column + 1`, so the
      boxes and the object mask agree exactly; an item hidden entirely by later ones is dropped.

Every canvas draws from its own generator seeded with `(seed, split, index)`, and the files are encoded with
fixed settings, so the same config writes the same bytes. The folder is written next to its destination and
renamed into place when complete (`pce_timm.utils.atomic_folder`).
"""
import colorsys
import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from ..progress import progress_bar
from ..utils import atomic_folder
from .registry import FASHION_MNIST_CLASSES, DatasetNotFoundError
from .sources import idx_dirs, read_idx
from .voc import IGNORE_INDEX

__all__ = ['COMPOSED_CLASSES', 'ComposeConfig', 'ComposedCanvas', 'compose_canvas', 'read_fashion_mnist',
           'voc_palette', 'write_composed_voc']

COMPOSED_CLASSES = ('_background_', *FASHION_MNIST_CLASSES)
SPLITS = ('train', 'val', 'test')
YEAR = 'VOC2012'
DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
_SOURCE_SPLIT = {'train': 'train', 'val': 't10k', 'test': 't10k'}  # val and test use Fashion-MNIST's test images
_PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class ComposeConfig:
    """How a composed set is drawn (all of it is saved in the set's `dataset.json`).

    Attributes:
        num_train: Canvases in the train split (items from Fashion-MNIST train).
        num_val: Canvases in the val split (items from Fashion-MNIST test; its first half when `num_test` > 0).
        num_test: Canvases in the test split (items from the second half of Fashion-MNIST test, none shared with
            val): the split to report on when choices are made on val. 0: no test split, and val draws from all of
            Fashion-MNIST test (the canvases of the sets written before the test split existed).
        canvas_size: Side of the square canvases in pixels.
        seed: Seed of every random choice.
        items_per_canvas: `(min, max)` items drawn per canvas (fewer when one finds no place).
        scale: `(min, max)` side of an item as a fraction of the canvas side.
        max_overlap: Largest intersection of two items' tight boxes, as a fraction of the smaller box.
        ink_threshold: Ink (0..255) from which a pixel belongs to its item.
        jpeg_quality: Quality of the JPEG images.
        source_dir: Folder holding Fashion-MNIST's IDX files (Debian's dataset-fashion-mnist installs them here).
    """
    num_train: int
    num_val: int
    num_test: int = 0
    canvas_size: int = 128
    seed: int = 0
    items_per_canvas: tuple[int, int] = (1, 4)
    scale: tuple[float, float] = (0.25, 0.5)
    max_overlap: float = 0.3
    ink_threshold: int = 64
    jpeg_quality: int = 95
    source_dir: str = DEFAULT_SOURCE_DIR

    def __post_init__(self):
        for name in ('num_train', 'num_val', 'num_test'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f'{name} must be an int >= 0, got {getattr(self, name)!r}.')
        if self.num_train + self.num_val + self.num_test == 0:
            raise ValueError('num_train + num_val + num_test must be > 0: there is nothing to write.')
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f'seed must be an int >= 0, got {self.seed!r}.')
        if not isinstance(self.canvas_size, int) or self.canvas_size < 32:
            raise ValueError(f'canvas_size must be an int >= 32, got {self.canvas_size!r}.')
        lo, hi = self.items_per_canvas
        if not 1 <= lo <= hi:
            raise ValueError(f'items_per_canvas must be (min, max) with 1 <= min <= max, got {self.items_per_canvas}.')
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1 or hi * self.canvas_size < 8:
            raise ValueError(f'scale must be (min, max) with 0 < min <= max <= 1 and max * canvas_size >= 8, got '
                             f'{self.scale} at canvas_size {self.canvas_size}.')
        if not 0 <= self.max_overlap <= 1:
            raise ValueError(f'max_overlap must be in [0, 1], got {self.max_overlap}.')
        if not 1 <= self.ink_threshold <= 255:
            raise ValueError(f'ink_threshold must be in [1, 255], got {self.ink_threshold}.')


@dataclass
class ComposedCanvas:
    """One canvas: `image` uint8 `[S, S, 3]`, `class_mask` / `object_mask` uint8 `[S, S]` (255 = ignore),
    `boxes` int64 `[N, 4]` XYXY (`xmax` exclusive), `labels` int64 `[N]` class ids (1..), `occluded` bool `[N]`."""
    image: np.ndarray
    class_mask: np.ndarray
    object_mask: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    occluded: np.ndarray


def read_fashion_mnist(source_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images `[N, 28, 28]` uint8 and labels `[N]` of `train` or `t10k` (test) from IDX files."""
    root = Path(source_dir).expanduser()
    for folder in idx_dirs(root, 'FashionMNIST'):
        for suffix in ('-idx3-ubyte.gz', '-idx3-ubyte'):
            images = folder / f'{split}-images{suffix}'
            labels = folder / f'{split}-labels{suffix.replace("idx3", "idx1")}'
            if images.is_file() and labels.is_file():
                return read_idx(images), read_idx(labels).astype(np.int64)
    raise DatasetNotFoundError(
        f'Fashion-MNIST IDX files {split}-images-idx3-ubyte[.gz] / {split}-labels-idx1-ubyte[.gz] not found in '
        f'{", ".join(map(str, idx_dirs(root, "FashionMNIST")))}: install the Debian package '
        f'(apt-get install dataset-fashion-mnist, which fills {DEFAULT_SOURCE_DIR}) or pass --source-dir.')


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (768 values) for palette PNGs: class i gets VOC's colour i, 255 the cream border."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two XYXY boxes over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(w * h) / float(smaller)


def _tight_box(inside: np.ndarray) -> np.ndarray | None:
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    if len(rows) == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.int64)


def _ring(foreground: np.ndarray) -> np.ndarray:
    """Background pixels 8-adjacent to `foreground`."""
    padded = np.pad(foreground, 1)
    h, w = foreground.shape
    grown = np.zeros_like(foreground)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + h, dx:dx + w]
    return grown & ~foreground


def compose_canvas(items: np.ndarray, item_labels: np.ndarray, rng: np.random.Generator,
                   cfg: ComposeConfig) -> ComposedCanvas:
    """Draw one canvas from the source `items` `[N, 28, 28]` (uint8 ink) and their labels (0-based)."""
    size = cfg.canvas_size
    image = 128.0 + rng.integers(-32, 33, (size, size, 1)).astype(np.float64)
    image = np.repeat(image, 3, axis=2)
    class_mask = np.zeros((size, size), np.uint8)
    object_mask = np.zeros((size, size), np.uint8)
    placed: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(cfg.items_per_canvas[0], cfg.items_per_canvas[1] + 1))):
        index = int(rng.integers(len(items)))
        side = max(8, int(round(rng.uniform(*cfg.scale) * size)))
        ink = np.asarray(Image.fromarray(items[index]).resize((side, side), Image.BILINEAR), np.float64)
        inside = ink >= cfg.ink_threshold
        local = _tight_box(inside)
        if local is None:
            continue
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            box = local + np.array([x0, y0, x0, y0])
            if all(_overlap(box, other) <= cfg.max_overlap for other in placed):
                break
        else:
            continue  # no place with little enough overlap: the canvas gets one item fewer
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(), 1.0, rng.uniform(0.75, 1.0))) * 255.0
        alpha = (ink / 255.0)[..., None]
        window = (slice(y0, y0 + side), slice(x0, x0 + side))
        image[window] = image[window] * (1 - alpha) + colour * alpha
        class_mask[window][inside] = item_labels[index] + 1
        object_mask[window][inside] = len(placed) + 1
        placed.append(box)
        labels.append(int(item_labels[index]) + 1)
    return _finish_canvas(image, class_mask, object_mask, placed, labels)


def _finish_canvas(image: np.ndarray, class_mask: np.ndarray, object_mask: np.ndarray, placed: Sequence[np.ndarray],
                   labels: Sequence[int]) -> ComposedCanvas:
    """Boxes from the visible pixels, hidden items dropped (and the objects renumbered), the ignore ring."""
    boxes, kept_labels, occluded = [], [], []
    renumbered = np.zeros_like(object_mask)
    for number, (box, label) in enumerate(zip(placed, labels, strict=True), start=1):
        visible = object_mask == number
        tight = _tight_box(visible)
        if tight is None:
            continue
        boxes.append(tight)
        kept_labels.append(label)
        occluded.append(not np.array_equal(tight, box))
        renumbered[visible] = len(boxes)
    ring = _ring(class_mask > 0)
    class_mask[ring] = IGNORE_INDEX
    renumbered[ring] = IGNORE_INDEX
    return ComposedCanvas(
        image=np.clip(np.rint(image), 0, 255).astype(np.uint8), class_mask=class_mask, object_mask=renumbered,
        boxes=np.asarray(boxes, np.int64).reshape(-1, 4), labels=np.asarray(kept_labels, np.int64),
        occluded=np.asarray(occluded, bool))


def _annotation_xml(stem: str, canvas: ComposedCanvas, classes: Sequence[str]) -> bytes:
    root = ET.Element('annotation')
    ET.SubElement(root, 'folder').text = YEAR
    ET.SubElement(root, 'filename').text = f'{stem}.jpg'
    ET.SubElement(ET.SubElement(root, 'source'), 'database').text = 'pce_timm make_dense_dataset (Fashion-MNIST)'
    size = ET.SubElement(root, 'size')
    for tag, value in zip(('width', 'height', 'depth'), (canvas.image.shape[1], canvas.image.shape[0], 3),
                          strict=True):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, 'segmented').text = '1'
    for box, label, occluded in zip(canvas.boxes, canvas.labels, canvas.occluded, strict=True):
        obj = ET.SubElement(root, 'object')
        ET.SubElement(obj, 'name').text = classes[label]
        ET.SubElement(obj, 'pose').text = 'Unspecified'
        ET.SubElement(obj, 'truncated').text = '0'
        ET.SubElement(obj, 'occluded').text = str(int(occluded))
        ET.SubElement(obj, 'difficult').text = '0'
        bndbox = ET.SubElement(obj, 'bndbox')
        for tag, value in zip(('xmin', 'ymin', 'xmax', 'ymax'), box, strict=True):
            ET.SubElement(bndbox, tag).text = str(int(value))
    ET.indent(root)
    return ET.tostring(root, encoding='utf-8') + b'\n'


def _png(ids: np.ndarray, palette: list[int]) -> bytes:
    image = Image.fromarray(ids, mode='P')
    image.putpalette(palette)
    buffer = BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels, mode='RGB').save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def _write_split(year_dir: Path, split: str, count: int, cfg: ComposeConfig, progress: bool) -> dict:
    items, item_labels = read_fashion_mnist(cfg.source_dir, _SOURCE_SPLIT[split])
    if cfg.num_test and split in ('val', 'test'):  # disjoint halves: no item of a test canvas is seen in val
        half = slice(0, len(items) // 2) if split == 'val' else slice(len(items) // 2, None)
        items, item_labels = items[half], item_labels[half]
    palette = voc_palette()
    split_id = SPLITS.index(split)
    stems, objects, per_class = [], 0, Counter()
    for index in progress_bar(range(count), desc=f'composing {split}', unit='canvas', disable=not progress):
        rng = np.random.default_rng([cfg.seed, split_id, index])
        canvas = compose_canvas(items, item_labels, rng, cfg)
        stem = f'{split}_{index:06d}'
        (year_dir / 'JPEGImages' / f'{stem}.jpg').write_bytes(_jpeg(canvas.image, cfg.jpeg_quality))
        (year_dir / 'Annotations' / f'{stem}.xml').write_bytes(_annotation_xml(stem, canvas, COMPOSED_CLASSES))
        (year_dir / 'SegmentationClass' / f'{stem}.png').write_bytes(_png(canvas.class_mask, palette))
        (year_dir / 'SegmentationObject' / f'{stem}.png').write_bytes(_png(canvas.object_mask, palette))
        stems.append(stem)
        objects += len(canvas.labels)
        per_class.update(COMPOSED_CLASSES[label] for label in canvas.labels.tolist())
    text = ''.join(f'{stem}\n' for stem in stems)
    for sets in ('Main', 'Segmentation'):
        (year_dir / 'ImageSets' / sets / f'{split}.txt').write_text(text, encoding='utf-8')
    return {'images': count, 'objects': objects, 'objects_per_class': {n: per_class[n] for n in COMPOSED_CLASSES[1:]}}


def write_composed_voc(output_dir: str | Path, cfg: ComposeConfig, overwrite: bool = False,
                       progress: bool = True) -> dict:
    """Write a composed set as `output_dir/VOC2012/...` (a VOCdevkit) and return its summary.

    The VOC2012 folder holds `JPEGImages/`, `Annotations/`, `SegmentationClass/`, `SegmentationObject/`,
    `ImageSets/{Main,Segmentation}/{train,val,trainval}.txt` (and `test.txt` when `num_test` > 0),
    `class_names.txt` (labelme's format) and `dataset.json` (the config and the summary).

    Raises:
        FileExistsError: `output_dir` is a file, or a non-empty folder and `overwrite` is False.
        DatasetNotFoundError: Fashion-MNIST's IDX files are not in `cfg.source_dir`.
    """
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f'--output-dir {output_dir} is a file; choose a folder.')
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'--output-dir {output_dir} is not empty; pass --overwrite to replace it (the old '
                              'folder stays until the new set is complete) or choose another folder.')
    summary = {'root': str(output_dir / YEAR), 'classes': list(COMPOSED_CLASSES), 'splits': {}}
    with atomic_folder(output_dir) as tmp:
        year_dir = tmp / YEAR
        for sub in ('JPEGImages', 'Annotations', 'SegmentationClass', 'SegmentationObject', 'ImageSets/Main',
                    'ImageSets/Segmentation'):
            (year_dir / sub).mkdir(parents=True)
        for split, count in zip(SPLITS, (cfg.num_train, cfg.num_val, cfg.num_test), strict=True):
            if count or split != 'test':
                summary['splits'][split] = _write_split(year_dir, split, count, cfg, progress)
        for sets in ('Main', 'Segmentation'):
            folder = year_dir / 'ImageSets' / sets  # trainval: train + val, as in VOC (test is apart)
            (folder / 'trainval.txt').write_text(''.join((folder / f'{s}.txt').read_text() for s in ('train', 'val')))
        (year_dir / 'class_names.txt').write_text(''.join(f'{n}\n' for n in COMPOSED_CLASSES), encoding='utf-8')
        record = {'config': asdict(cfg), 'ignore_index': IGNORE_INDEX, **summary}
        record.pop('root')
        (year_dir / 'dataset.json').write_text(json.dumps(record, indent=2) + '\n', encoding='utf-8')
    return summary
