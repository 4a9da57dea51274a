"""The training flags: :func:`build_parser`, importable without torch, timm or accelerate (stdlib + PyYAML).

``scripts/train.py --help`` and ``scripts/finetune.py --help`` load this file on its own (importing any other
pce_timm module first registers the models with timm, which imports torch, ~5 s), so nothing here may import
the rest of the package. :mod:`.recipe` reads recipes and checks the values these flags parse.
"""
import argparse
from typing import Any

import yaml

__all__ = ['DENSE_IMG_SIZE', 'DETECTION_ARCHS', 'MIXED_PRECISION', 'SEGMENTATION_ARCH_NAMES', 'TRACKERS',
           'build_dense_parser', 'build_parser']

MIXED_PRECISION = ('no', 'fp16', 'bf16')
DETECTION_ARCHS = ('fasterrcnn', 'retinanet', 'fcos')  # torchvision detectors (pce_timm.tasks.detection)
SEGMENTATION_ARCH_NAMES = ('unet', 'fpn', 'deeplabv3plus')  # smp segmenters (pce_timm.tasks.segmentation)
DENSE_IMG_SIZE = 128  # the dense scripts' default image size
TRACKERS = ('csv', 'tensorboard', 'wandb', 'mlflow', 'aim', 'comet_ml', 'clearml', 'dvclive', 'swanlab', 'trackio')


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line (the training parser's usage is 40 lines long)."""

    def error(self, message: str):
        self.exit(2, f'error: {message} ({self.prog} --help lists the options)\n')


def _top_k(value: str) -> Any:
    """``--top-k``: an int k (sparse, k experts per patch) or 'soft' (all experts, weighted)."""
    if isinstance(value, str) and value.strip().lower() in ('soft', 'none', 'all'):
        return 'soft'
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer k or 'soft', got {value!r}") from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'on'):
        return True
    if text in ('0', 'false', 'no', 'off'):
        return False
    raise ValueError(f'expected a boolean (true/false), got {value!r}')


def _key_value(text: str) -> Any:
    """``key=value`` of ``--model-kwargs``; the value is parsed as YAML (``3``, ``0.1``, ``[1, 2]``, ``true``)."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE (e.g. channels=[16,32,64,128]), got {text!r}')
    key, value = text.split('=', 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    """The full training parser; ``scripts/train.py`` and ``scripts/finetune.py`` extend it."""
    parser = _Parser(
        description='Train a pce_timm (or any timm) model with accelerate.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', '-c', default=None, metavar='YAML',
                        help='recipe whose keys (argument dest names + phases) set the defaults below')

    group = parser.add_argument_group('data')
    group.add_argument('--dataset', default=None, help='dataset name (pce_timm.data.list_datasets())')
    group.add_argument('--data-dir', default=None, help='local folder holding the dataset (else searched)')
    group.add_argument('--eval-split', default='test', help='split evaluated after each epoch and at the end')
    group.add_argument('--val-fraction', type=float, default=None,
                       help="hold out this share of each class of the training split (every round(1/f)-th image, no "
                            "randomness) and evaluate on it instead of --eval-split (recorded as 'train-holdout'): "
                            'choose recipes on it, report the test split only (scripts/evaluate.py, sweep.py)')
    group.add_argument('--max-train-samples', type=int, default=None, help='train on a fixed random subset')
    group.add_argument('--max-eval-samples', type=int, default=None, help='evaluate on a fixed random subset')
    group.add_argument('--workers', type=int, default=0, help='DataLoader worker processes per rank')
    group.add_argument('--img-size', type=int, default=None, help='input size (default: the dataset native size)')
    group.add_argument('--in-chans', type=int, default=None, help='model input channels (default: the dataset)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default=None,
                       help='timm model name; or trained weights to start from: local-dir:DIR, hf-hub:ID, a run '
                            'folder, a model folder or a checkpoint folder')
    group.add_argument('--pretrained', type=_bool, nargs='?', const=True, default=False,
                       help='load the pretrained weights of --model')
    group.add_argument('--num-experts', type=int, default=None)
    group.add_argument('--top-k', type=_top_k, default=None, help="k experts per patch, or 'soft'")
    group.add_argument('--router', default=None, choices=('cosine', 'mlp', 'positional', 'uniform'))
    group.add_argument('--choice', default=None, choices=('token', 'expert'),
                       help='token: each patch picks its top-k experts; expert: each expert picks its top patches '
                            'of every image (expert choice)')
    group.add_argument('--balance', default=None, choices=('loss', 'bias'),
                       help='loss: the load-balance aux loss (aux_balance); bias: loss-free balancing bias, '
                            'updated after every step (no load-balance loss for those layers)')
    group.add_argument('--bias-update-rate', type=float, default=None,
                       help="largest step of the balance bias per update (balance: bias), in logit units")
    group.add_argument('--bias-update', default=None, choices=('sign', 'proportional'),
                       help="how the balance bias moves after each update: sign (the full rate, DeepSeek-V3's; "
                            "the default) or proportional (to the expert's relative over- or under-load)")
    group.add_argument('--pce-stages', type=int, nargs='*', default=None, help='stages whose convs are PCE')
    group.add_argument('--patch-size', type=int, default=None)
    group.add_argument('--attention', type=_bool, nargs='?', const=True, default=None)
    group.add_argument('--stem-type', default=None)
    group.add_argument('--drop-rate', type=float, default=None)
    group.add_argument('--drop-path-rate', type=float, default=None)
    group.add_argument('--freeze', nargs='*', default=None, choices=('experts', 'router', 'backbone'),
                       help='keep these parts unchanged for the whole run (fine-tuning)')
    group.add_argument('--model-kwargs', type=_key_value, nargs='*', default=None, metavar='KEY=VALUE',
                       help='further timm.create_model kwargs (in a recipe: a mapping)')
    group.add_argument('--channels-last', type=_bool, nargs='?', const=True, default=False,
                       help='train and evaluate with the model and its inputs in channels-last memory')

    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', type=int, default=10)
    group.add_argument('--batch-size', '-b', type=int, default=128, help='per-process batch size')
    group.add_argument('--eval-batch-size', type=int, default=None, help='default: 2 x batch size')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--opt', default='adamw', help='timm optimizer name (timm.optim.list_optimizers())')
    group.add_argument('--lr', type=float, default=1e-3)
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--opt-eps', type=float, default=None)
    group.add_argument('--opt-betas', type=float, nargs=2, default=None)
    group.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    group.add_argument('--sched', default='cosine', help="timm scheduler name, or 'none'")
    group.add_argument('--sched-on-updates', type=_bool, nargs='?', const=True, default=True,
                       help='step the schedule per optimizer update (else per epoch)')
    group.add_argument('--warmup-epochs', type=float, default=0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--decay-epochs', type=float, default=None)
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')

    group = parser.add_argument_group('augmentation (passed to timm / pce_timm.data)')
    group.add_argument('--no-aug', type=_bool, nargs='?', const=True, default=False)
    group.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random-resized-crop area')
    group.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), help='random-resized-crop aspect')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--color-jitter', type=float, default=0.0)
    group.add_argument('--aa', default=None, help="timm auto-augment, e.g. 'rand-m9-mstd0.5'")
    group.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    group.add_argument('--crop-pct', type=float, default=1.0, help='eval centre-crop fraction')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (> 0 enables)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (> 0 enables)')
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--black-patches-prob', type=float, default=0.0)
    group.add_argument('--channel-boost-prob', type=float, default=0.0)

    group = parser.add_argument_group('routing')
    group.add_argument('--key-init', default='kmeans', choices=('kmeans', 'none'),
                       help='fit cosine-router keys by K-Means on real patch embeddings before training')
    group.add_argument('--key-init-batches', type=int, default=4)
    group.add_argument('--aux-entropy', type=float, default=0.0, help='weight of the router entropy loss')
    group.add_argument('--aux-balance', type=float, default=0.01, help='weight of the load-balance loss')
    group.add_argument('--aux-z-loss', type=float, default=0.0, help='weight of the router z-loss')
    group.add_argument('--phases', type=yaml.safe_load, default=None,
                       help='training phases as YAML/JSON (normally set in the recipe)')

    group = parser.add_argument_group('run')
    group.add_argument('--output-dir', default=None, help='run folder (default: runs/<model>-<dataset>)')
    group.add_argument('--resume', default=None, help="'auto' (latest checkpoint of --output-dir, if any), "
                       'a run folder or a checkpoint folder; checkpoints are unpickled: resume only your own or '
                       'trusted ones')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--mixed-precision', default='no', choices=MIXED_PRECISION)
    group.add_argument('--log-with', nargs='*', default=['csv', 'tensorboard'],
                       help=f'trackers, any of {TRACKERS}')
    group.add_argument('--log-interval', type=int, default=50, help='log train loss every N optimizer updates')
    group.add_argument('--checkpoint-every', type=int, default=1, help='save a checkpoint every N epochs')
    group.add_argument('--checkpoint-steps', type=int, default=None,
                       help='also save every N optimizer updates (exact mid-epoch resume needs --workers 0)')
    group.add_argument('--checkpoint-limit', type=int, default=2, help='keep the N newest checkpoints')
    group.add_argument('--progress', type=_bool, nargs='?', const=True, default=True,
                       help='progress bars: live on a terminal, a line every 30 s in a log file (pce_timm.progress)')
    return parser


def build_dense_parser(task: str) -> argparse.ArgumentParser:
    """train.py's parser (every flag and recipe key) plus ``--arch``, ``--output-stride``, ``--fpn-channels``,
    ``--decoder-channels`` (Unet), with dense defaults: eval split ``val``, 128 px images, batch size 8
    (``scripts/train_detection.py`` / ``train_segmentation.py``)."""
    parser = build_parser()
    group = parser.add_argument_group(task)
    if task == 'detection':
        group.add_argument('--arch', default='fasterrcnn', choices=DETECTION_ARCHS, help='torchvision detector')
        group.add_argument('--fpn-channels', type=int, default=128, help='FPN width')
        group.add_argument('--output-stride', type=int, default=None, help=argparse.SUPPRESS)
        group.add_argument('--decoder-channels', type=int, nargs=5, default=None, help=argparse.SUPPRESS)
    else:
        group.add_argument('--arch', default='unet', choices=SEGMENTATION_ARCH_NAMES, help='smp segmenter')
        group.add_argument('--output-stride', type=int, default=None, choices=(8, 16),
                           help='DeepLabV3+ encoder output stride (default 16)')
        group.add_argument('--fpn-channels', type=int, default=None, help=argparse.SUPPRESS)
        group.add_argument('--decoder-channels', type=int, nargs=5, default=None, metavar='C',
                           help='Unet decoder widths, deepest first (default: smp\'s 256 128 64 32 16)')
    parser.set_defaults(eval_split='val', img_size=DENSE_IMG_SIZE, batch_size=8, key_init_batches=2)
    return parser
