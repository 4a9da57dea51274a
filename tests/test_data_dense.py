"""Detection / segmentation data: the VOC reader on real VOC files (labelme-examples) and on corrupted copies,
the composed Fashion-MNIST set, Camelyon tiles and PCam's HDF5 files."""
import hashlib
import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from pce_timm.data import DatasetNotFoundError, load_image_dataset
from pce_timm.data.camelyon import TileSegmentation, load_pcam
from pce_timm.data.compose import COMPOSED_CLASSES, ComposeConfig, voc_palette, write_composed_voc
from pce_timm.data.dense import (
    CAMELYON_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    DenseDataError,
    VOCDetection,
    VOCSegmentation,
    dense_dataset,
    detection_collate,
    find_voc_root,
)
from pce_timm.utils import load_module_from_path

LABELME = Path('/usr/share/doc/labelme-examples/examples')
LABELME_DET = LABELME / 'bbox_detection' / 'data_dataset_voc'
LABELME_SEG = LABELME / 'semantic_segmentation' / 'data_dataset_voc'
FMNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'make_dense_dataset.py'

needs_labelme = pytest.mark.skipif(
    not (LABELME_DET / 'Annotations').is_dir() or not (LABELME_SEG / 'SegmentationClassPNG').is_dir(),
    reason=f'labelme VOC examples not in {LABELME}: apt-get install labelme-examples (make venv installs it)')
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / 'train-images-idx3-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST not in {FMNIST_DIR}: apt-get install dataset-fashion-mnist (make venv installs it)')


def _tight(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


# ---------------------------------------------------------------------------------------------------------
# real VOC files (labelme-examples: three Pascal VOC 2011 photos)


@needs_labelme
def test_labelme_voc_boxes_and_class_names(caplog):
    with caplog.at_level(logging.INFO, logger='pce_timm.data.voc'):
        data = dense_dataset('voc', LABELME_DET, 'train', 'detection')
    assert 'no ImageSets/Main/' in caplog.text and len(data) == 3  # every image, with a note
    assert data.classes[0] == '_background_' and data.classes[16] == 'potted plant' and len(data.classes) == 21
    image, target = data[0]
    assert target['file'] == '2011_000003' and target['image_id'] == 0
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 338, 500)
    boxes = target['boxes']
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.canvas_size == (338, 500)
    assert boxes.dtype == torch.float32 and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    expected = torch.tensor([[191.0, 107.36900369003689, 313.0, 329.36900369003695], [365.0, 83.0, 500.0, 333.0]])
    torch.testing.assert_close(boxes.as_subclass(torch.Tensor), expected)
    assert target['labels'].tolist() == [15, 15] and target['labels'].dtype == torch.int64  # person
    assert target['difficult'].tolist() == [False, False]
    assert [data.classes[i] for i in data[2][1]['labels']] == ['bus', 'bus', 'car']


@needs_labelme
def test_labelme_voc_masks_match_labelme_arrays():
    data = VOCSegmentation(LABELME_SEG)
    assert len(data) == 3 and data.classes == VOCDetection(LABELME_DET).classes
    for index, stem in enumerate(data.stems):
        image, mask = data[index]
        labelme = np.load(LABELME_SEG / 'SegmentationClass' / f'{stem}.npy')  # labelme's own ids, -1 = ignore
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == image.shape[-2:]
        np.testing.assert_array_equal(mask.numpy(), np.where(labelme < 0, IGNORE_INDEX, labelme))
    assert set(data[0][1].unique().tolist()) == {0, 5, 15, 255}  # background, bottle, person, ignore


# ---------------------------------------------------------------------------------------------------------
# finding the folder


def test_find_voc_root_layouts(tmp_path):
    (tmp_path / 'devkit' / 'VOC2007' / 'JPEGImages').mkdir(parents=True)
    assert find_voc_root(tmp_path / 'devkit') == tmp_path / 'devkit' / 'VOC2007'
    (tmp_path / 'devkit' / 'VOC2012' / 'Annotations').mkdir(parents=True)
    assert find_voc_root(tmp_path / 'devkit') == tmp_path / 'devkit' / 'VOC2012'
    assert find_voc_root(tmp_path / 'devkit' / 'VOC2007') == tmp_path / 'devkit' / 'VOC2007'
    (tmp_path / 'VOCdevkit').symlink_to(tmp_path / 'devkit')
    assert find_voc_root(tmp_path) == tmp_path / 'VOCdevkit' / 'VOC2012'
    (tmp_path / 'empty' / 'images').mkdir(parents=True)
    with pytest.raises(DenseDataError, match=r'looked for .*Annotations/ or .*JPEGImages/.*VOC2012/.*holds: images/'):
        find_voc_root(tmp_path / 'empty')
    with pytest.raises(DenseDataError, match='does not exist'):
        dense_dataset('voc', tmp_path / 'nowhere', 'train', 'detection')


def test_dense_dataset_rejects_unknown_names_and_tasks(tmp_path):
    with pytest.raises(ValueError, match="Unknown dense dataset 'coco'; known: voc, camelyon"):
        dense_dataset('coco', tmp_path, 'train', 'detection')
    with pytest.raises(ValueError, match="'camelyon' has no 'detection' task; it has: segmentation"):
        dense_dataset('Camelyon', tmp_path, 'train', 'detection')
    with pytest.raises(DenseDataError, match='pass data_dir'):
        dense_dataset('voc', None, 'train', 'segmentation')


# ---------------------------------------------------------------------------------------------------------
# the composed set


@pytest.fixture(scope='module')
def composed(tmp_path_factory) -> Path:
    if not (FMNIST_DIR / 'train-images-idx3-ubyte.gz').is_file():
        pytest.skip(f'Fashion-MNIST not in {FMNIST_DIR}: apt-get install dataset-fashion-mnist')
    out = tmp_path_factory.mktemp('composed') / 'voc'
    write_composed_voc(out, ComposeConfig(num_train=8, num_val=4, canvas_size=64, seed=3), progress=False)
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@needs_fmnist
def test_composed_set_is_deterministic_and_atomic(composed, tmp_path):
    cfg = ComposeConfig(num_train=8, num_val=4, canvas_size=64, seed=3)
    write_composed_voc(tmp_path / 'again', cfg, progress=False)
    assert _digest(tmp_path / 'again') == _digest(composed)  # the same bytes
    with pytest.raises(FileExistsError, match='not empty; pass --overwrite'):
        write_composed_voc(tmp_path / 'again', cfg, progress=False)
    write_composed_voc(tmp_path / 'again', ComposeConfig(num_train=8, num_val=4, canvas_size=64, seed=4),
                       overwrite=True, progress=False)
    changed = _digest(tmp_path / 'again')
    assert changed.keys() == _digest(composed).keys() and changed != _digest(composed)
    bad = ComposeConfig(num_train=2, num_val=0, source_dir=str(tmp_path / 'no-fmnist'))
    with pytest.raises(DatasetNotFoundError, match='apt-get install dataset-fashion-mnist'):
        write_composed_voc(tmp_path / 'failed', bad, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['again']  # nothing half-written left behind


@needs_fmnist
def test_composed_test_split_draws_items_val_never_sees(composed, tmp_path, monkeypatch):
    import pce_timm.data.compose as compose
    pools, compose_canvas = {}, compose.compose_canvas

    def recording(items, item_labels, rng, cfg):  # the item pools the canvases draw from, in split order
        pools.setdefault((len(items), items[0].tobytes()), None)
        return compose_canvas(items, item_labels, rng, cfg)

    monkeypatch.setattr(compose, 'compose_canvas', recording)
    cfg = ComposeConfig(num_train=8, num_val=4, num_test=3, canvas_size=64, seed=3)
    write_composed_voc(tmp_path / 'tested', cfg, progress=False)
    root, before = tmp_path / 'tested' / 'VOC2012', composed / 'VOC2012'
    t10k, _ = compose.read_fashion_mnist(FMNIST_DIR, 't10k')
    half = len(t10k) // 2
    assert [(n, b == t10k[0].tobytes(), b == t10k[half].tobytes()) for n, b in list(pools)[1:]] == [
        (half, True, False), (len(t10k) - half, False, True)]  # val: first half, test: second half, no item shared
    for sets in ('Main', 'Segmentation'):
        listed = {s: (root / 'ImageSets' / sets / f'{s}.txt').read_text().split()
                  for s in ('train', 'val', 'test', 'trainval')}
        assert listed['test'] == [f'test_{i:06d}' for i in range(3)]
        assert listed['trainval'] == listed['train'] + listed['val']  # trainval leaves test apart, as in VOC

    def jpeg(folder, stem):
        return (folder / 'JPEGImages' / f'{stem}.jpg').read_bytes()

    for stem, unchanged in (('train_000000', True), ('train_000007', True), ('val_000000', False)):
        assert (jpeg(root, stem) == jpeg(before, stem)) == unchanged  # only val's item pool changed
    test = VOCDetection(tmp_path / 'tested', 'test', transforms=None)
    assert len(test) == 3 and test[0][1]['boxes'].shape[-1] == 4
    with pytest.raises(ValueError, match='num_test must be an int >= 0'):
        ComposeConfig(num_train=1, num_val=1, num_test=-1)


@needs_fmnist
def test_composed_boxes_match_masks(composed):
    root = find_voc_root(composed)
    assert root.name == 'VOC2012' and (root / 'class_names.txt').read_text().split('\n')[0] == '_background_'
    detection, segmentation = VOCDetection(composed, 'train'), VOCSegmentation(composed, 'train')
    assert detection.classes == segmentation.classes == COMPOSED_CLASSES and len(detection) == 8
    objects = 0
    for index in range(len(detection)):
        (image, target), (_, mask) = detection[index], segmentation[index]
        stem = target['file']
        instances = np.asarray(Image.open(root / 'SegmentationObject' / f'{stem}.png'))
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        assert set(np.unique(instances)) - {0, 255} == set(range(1, len(target['labels']) + 1))
        pairs = zip(target['boxes'].tolist(), target['labels'].tolist(), strict=True)
        for number, (box, label) in enumerate(pairs, start=1):
            pixels = instances == number
            assert _tight(pixels) == box  # the box is the object's visible extent
            assert (mask.numpy()[pixels] == label).all()  # its pixels carry its class in the class mask
        assert ((instances == 0) == (mask.numpy() == 0)).all() and ((instances == 255) == (mask.numpy() == 255)).all()
        objects += len(target['labels'])
    assert objects >= 8 and VOCDetection(composed, 'val').stems == [f'val_{i:06d}' for i in range(4)]
    assert len(VOCSegmentation(composed, 'trainval')) == 12


@needs_fmnist
def test_composed_ignore_ring_and_palette(composed):
    root = find_voc_root(composed)
    png = Image.open(root / 'SegmentationClass' / 'train_000000.png')
    assert png.mode == 'P' and png.getpalette()[:9] == voc_palette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    ids = np.asarray(png)
    item, ring = (ids > 0) & (ids < 255), ids == 255
    grown = np.zeros_like(item)
    padded = np.pad(item, 1)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + 64, dx:dx + 64]
    np.testing.assert_array_equal(ring, grown & ~item)  # exactly the 1-pixel background ring around the items


@needs_fmnist
@pytest.mark.parametrize('size', [(128, 128), (50, 80)])
def test_transforms_v2_resize_moves_boxes_with_masks(composed, size):
    root = find_voc_root(composed)
    data = VOCDetection(composed, 'train')
    image, target = data[1]
    instances = tv_tensors.Mask(torch.from_numpy(np.asarray(Image.open(root / 'SegmentationObject' /
                                                                       f'{target["file"]}.png')).astype(np.int64)))
    resize = v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST)
    image, target, instances = resize(image, target, instances)
    assert image.shape[-2:] == size and target['boxes'].canvas_size == size and instances.shape == size
    tolerance = 0 if size == (128, 128) else 1  # an exact 2x resize maps pixels and box edges exactly
    for number, box in enumerate(target['boxes'].tolist(), start=1):
        extent = _tight(instances.numpy() == number)
        assert np.abs(np.subtract(extent, box)).max() <= tolerance + 1e-4, (number, extent, box)
    loader = torch.utils.data.DataLoader(VOCDetection(composed, 'val'), batch_size=3, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3 and [t['image_id'] for t in targets] == [0, 1, 2]


@needs_fmnist
def test_make_dense_dataset_script(tmp_path, capsys):
    script = load_module_from_path(SCRIPT, 'make_dense_dataset_script')
    out = tmp_path / 'set'
    argv = ['--output-dir', str(out), '--num-train', '3', '--num-val', '2', '--canvas-size', '48',
            '--items-per-canvas', '2-3', '--no-progress']
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert 'train: 3 images' in printed and 'val: 2 images' in printed
    assert all(2 <= len(VOCDetection(out, 'train')[i][1]['labels']) <= 3 for i in range(3))
    assert script.main(argv) == 2 and 'pass --overwrite' in capsys.readouterr().err
    assert script.main([*argv, '--overwrite', '--items-per-canvas', '4-1']) == 2


# ---------------------------------------------------------------------------------------------------------
# bad data


@pytest.fixture
def small_voc(composed, tmp_path) -> Path:
    """A corruptible copy of the composed set's year folder."""
    root = tmp_path / 'VOC2012'
    shutil.copytree(find_voc_root(composed), root)
    return root


def _edit_xml(path: Path, edit) -> None:
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)


def _set_box(root: ET.Element, **values) -> None:
    box = root.find('object/bndbox')
    for tag, value in values.items():
        box.find(tag).text = str(value)


@needs_fmnist
@pytest.mark.parametrize('edit, message', [
    (lambda r: _set_box(r, xmax=65), r'object 0 .* outside the 64x64 image'),
    (lambda r: _set_box(r, xmin=-1), r'outside the 64x64 image'),
    (lambda r: _set_box(r, xmin=30, xmax=30), r'empty box: xmin=30.0, xmax=30.0'),
    (lambda r: _set_box(r, ymin=20, ymax=10), r'need xmax > xmin and ymax > ymin'),
    (lambda r: setattr(r.find('object/name'), 'text', 'Hat'), r"unknown class name 'Hat'; known: T-shirt/top"),
    (lambda r: r.find('object/bndbox').remove(r.find('object/bndbox/ymax')), r'needs a <bndbox> with numeric'),
])
def test_bad_boxes_name_the_file(small_voc, edit, message):
    xml = small_voc / 'Annotations' / 'train_000002.xml'
    _edit_xml(xml, edit)
    with pytest.raises(DenseDataError, match=message) as error:
        VOCDetection(small_voc, 'train')
    assert str(xml) in str(error.value)


@needs_fmnist
def test_bad_masks_name_the_file(small_voc):
    mask_path = small_voc / 'SegmentationClass' / 'train_000001.png'
    ids = np.asarray(Image.open(mask_path)).copy()
    ids[0, 0] = 11  # one past the 10 Fashion-MNIST classes
    image = Image.fromarray(ids, mode='P')
    image.putpalette(voc_palette())
    image.save(mask_path)
    data = VOCSegmentation(small_voc, 'train')
    with pytest.raises(DenseDataError, match=r'train_000001.png holds class ids \[11\] outside the 11 classes'):
        data[1]
    Image.fromarray(ids[:, :60], mode='L').save(mask_path)
    with pytest.raises(DenseDataError, match=r'train_000001.png is 60x64 \(WxH\) but its image is 64x64'):
        data[1]
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(mask_path)
    with pytest.raises(DenseDataError, match=r'train_000001.png is a RGB image; expected a palette'):
        data[1]


@needs_fmnist
def test_bad_splits_and_folders_name_the_file(small_voc):
    split_file = small_voc / 'ImageSets' / 'Main' / 'train.txt'
    stems = split_file.read_text()
    split_file.write_text(stems + 'missing_000\n')
    with pytest.raises(DenseDataError, match=rf"{split_file} lists 'missing_000', but .*missing_000.jpg does not"):
        VOCDetection(small_voc, 'train')
    split_file.write_text(stems)
    (small_voc / 'JPEGImages' / 'train_000000.jpg').write_bytes(b'')
    with pytest.raises(DenseDataError, match=r'Cannot read image .*train_000000.jpg'):
        VOCDetection(small_voc, 'train')[0]
    with pytest.raises(DenseDataError, match=r'ImageSets/Main/holdout.txt does not exist; splits in .*: train, '
                                             r'trainval, val'):
        VOCDetection(small_voc, 'holdout')
    (small_voc / 'JPEGImages' / 'val_000000.jpg').unlink()
    with pytest.raises(DenseDataError, match=r"Segmentation/val.txt lists 'val_000000', but .*JPEGImages"):
        VOCSegmentation(small_voc, 'val')
    (small_voc / 'SegmentationClass' / 'val_000001.png').unlink()
    (small_voc / 'Annotations' / 'val_000001.xml').unlink()
    shutil.copy(small_voc / 'JPEGImages' / 'val_000002.jpg', small_voc / 'JPEGImages' / 'val_000000.jpg')
    with pytest.raises(DenseDataError, match=r"lists 'val_000001', but its mask .*val_000001.png does not exist"):
        VOCSegmentation(small_voc, 'val')
    with pytest.raises(DenseDataError, match=r"lists 'val_000001', but its annotation .*val_000001.xml does not"):
        VOCDetection(small_voc, 'val')
    shutil.rmtree(small_voc / 'SegmentationClass')
    with pytest.raises(DenseDataError, match=r'has no class masks: looked for PNGs in .*SegmentationClass and '
                                             r'.*SegmentationClassPNG'):
        VOCSegmentation(small_voc, 'train')


@needs_fmnist
def test_class_names_file_and_difficult(small_voc):
    _edit_xml(small_voc / 'Annotations' / 'train_000000.xml',
              lambda r: setattr(r.find('object/difficult'), 'text', '1'))
    everything, easy = VOCDetection(small_voc, 'train'), VOCDetection(small_voc, 'train', keep_difficult=False)
    assert everything[0][1]['difficult'][0] and len(easy[0][1]['labels']) == len(everything[0][1]['labels']) - 1
    (small_voc / 'class_names.txt').write_text('__ignore__\nbackground\n' + '\n'.join(COMPOSED_CLASSES[1:]))
    assert VOCDetection(small_voc, 'train').classes[0] == 'background'
    (small_voc / 'class_names.txt').write_text('\n'.join(COMPOSED_CLASSES[1:]))
    with pytest.raises(DenseDataError, match='class_names.txt: the first class .* must be _background_'):
        VOCDetection(small_voc, 'train')
    (small_voc / 'class_names.txt').unlink()  # back to VOC's 20 classes, which know no Trouser
    assert VOCSegmentation(small_voc, 'train').classes == VOC_CLASSES
    with pytest.raises(DenseDataError, match="unknown class name '(T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|"
                                             "Shirt|Sneaker|Bag|Ankle boot)'; known: aeroplane"):
        VOCDetection(small_voc, 'train')


@needs_fmnist
def test_subset_and_voc_without_image_sets(small_voc, caplog):
    subset = VOCDetection(small_voc, 'train', max_samples=3, seed=1)
    assert len(subset) == 3 and subset.stems == sorted(subset.stems)
    assert subset.stems == VOCDetection(small_voc, 'train', max_samples=3, seed=1).stems
    shutil.rmtree(small_voc / 'ImageSets')
    with caplog.at_level(logging.INFO, logger='pce_timm.data.voc'):
        assert len(VOCSegmentation(small_voc, 'val')) == 12  # every image with a mask, for any split
    assert 'no ImageSets/Segmentation/: using all 12 images' in caplog.text


@needs_fmnist
def test_empty_split_is_an_error(small_voc):
    (small_voc / 'ImageSets' / 'Main' / 'val.txt').write_text('\n')
    with pytest.raises(DenseDataError, match=r"Main/val.txt gives no images for split 'val'"):
        VOCDetection(small_voc, 'val')


# ---------------------------------------------------------------------------------------------------------
# Camelyon tiles and PCam


def _write_tiles(root: Path, split: str, count: int, mask_value: int = 255) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    (root / split / 'images').mkdir(parents=True)
    (root / split / 'masks').mkdir(parents=True)
    masks = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / split / 'images' / f't{i}.png')
        mask = np.zeros((32, 40), np.uint8)
        mask[4:4 + 3 * i, 10:30] = mask_value
        Image.fromarray(mask).save(root / split / 'masks' / f't{i}.png')
        masks.append(mask)
    return masks


def test_camelyon_tiles(tmp_path):
    masks = _write_tiles(tmp_path, 'train', 4)
    _write_tiles(tmp_path, 'valid', 2, mask_value=1)
    data = dense_dataset('camelyon', tmp_path, 'train', 'segmentation')
    assert data.classes == CAMELYON_CLASSES == ('background', 'tumor') and len(data) == 4
    for i, expected in enumerate(masks):
        image, mask = data[i]
        assert image.shape == (3, 32, 40) and isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
        np.testing.assert_array_equal(mask.numpy(), expected // 255)
    val = TileSegmentation(tmp_path, 'val', transforms=v2.Resize((16, 20), v2.InterpolationMode.NEAREST))
    image, mask = val[1]
    assert image.shape == (3, 16, 20) and set(mask.unique().tolist()) == {0, 1}
    assert len(TileSegmentation(tmp_path, 'train', max_samples=2)) == 2
    (tmp_path / 'train' / 'masks' / 't2.png').unlink()
    with pytest.raises(DenseDataError, match=r'Tile .*t2.png has no mask: expected .*masks/t2.png'):
        TileSegmentation(tmp_path, 'train')
    Image.fromarray(np.full((32, 40), 7, np.uint8)).save(tmp_path / 'valid' / 'masks' / 't0.png')
    with pytest.raises(DenseDataError, match=r't0.png holds values \[7\]; expected 0 .* and 1 or 255'):
        val[0]
    with pytest.raises(DenseDataError, match=r"No 'test' tiles in .*: looked for .*test/images/, .*val/images/"):
        TileSegmentation(tmp_path / 'valid', 'test')


def _write_pcam(folder: Path, split: str, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (count, 1, 1, 1), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f'camelyonpatch_level_2_split_{split}_x.h5', 'w') as f:
        f.create_dataset('x', data=x, chunks=(4, 96, 96, 3), compression='gzip')  # as PCam ships them
    with h5py.File(folder / f'camelyonpatch_level_2_split_{split}_y.h5', 'w') as f:
        f.create_dataset('y', data=y)
    return x, y.reshape(-1)


def test_pcam_from_hdf5(tmp_path):
    x, y = _write_pcam(tmp_path / 'pcam', 'train', 10)
    x_test, y_test = _write_pcam(tmp_path / 'pcam', 'test', 5, seed=1)
    train = load_image_dataset('pcam', 'train', tmp_path, cache_dir=str(tmp_path / 'cache'))  # torchvision's pcam/
    assert len(train) == 10 and train.features['label'].names == ['normal', 'tumor']
    assert train['label'] == y.tolist()
    for i in (0, 9):
        np.testing.assert_array_equal(np.asarray(train[i]['image']), x[i])
    test = load_image_dataset('pcam', 'valid', tmp_path / 'pcam', cache_dir=str(tmp_path / 'cache'))
    assert test['label'] == y_test.tolist() and np.array_equal(np.asarray(test[4]['image']), x_test[4])
    with pytest.raises(DatasetNotFoundError, match='read from local files only: pass --data-dir'):
        load_image_dataset('pcam', 'train')
    with pytest.raises(ValueError, match="Unknown PCam split 'val'; PCam has train, valid, test"):
        load_pcam(tmp_path, 'val')


def test_pcam_errors(tmp_path):
    import h5py

    with pytest.raises(DatasetNotFoundError, match=r'camelyonpatch_level_2_split_train_x.h5 and .*_train_y.h5 in'):
        load_image_dataset('pcam', 'train', tmp_path)
    (tmp_path / 'camelyonpatch_level_2_split_train_x.h5.gz').write_bytes(b'')
    (tmp_path / 'camelyonpatch_level_2_split_train_y.h5.gz').write_bytes(b'')
    with pytest.raises(DatasetNotFoundError, match='gunzip them first'):
        load_image_dataset('pcam', 'train', tmp_path)
    _write_pcam(tmp_path, 'test', 4)
    with h5py.File(tmp_path / 'camelyonpatch_level_2_split_test_y.h5', 'w') as f:
        f.create_dataset('y', data=np.zeros((3, 1, 1, 1), np.uint8))
    with pytest.raises(DatasetNotFoundError, match=r'y has shape \(3, 1, 1, 1\); expected \[4, 1, 1, 1\]'):
        load_image_dataset('pcam', 'test', tmp_path, cache_dir=str(tmp_path / 'cache'))
    with h5py.File(tmp_path / 'camelyonpatch_level_2_split_test_x.h5', 'w') as f:
        f.create_dataset('x', data=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(DatasetNotFoundError, match=r'x has shape \(4, 32, 32, 3\) .*PCam has \[N, 96, 96, 3\]'):
        load_image_dataset('pcam', 'test', tmp_path, cache_dir=str(tmp_path / 'cache'))
    (tmp_path / 'camelyonpatch_level_2_split_test_x.h5').write_bytes(b'not hdf5')
    with pytest.raises(DatasetNotFoundError, match=r'Cannot open PCam file .*test_x.h5 as HDF5'):
        load_image_dataset('pcam', 'test', tmp_path, cache_dir=str(tmp_path / 'cache'))
