#!/usr/bin/env python
"""Train a pce_timm (or any timm) model with accelerate.

    python scripts/train.py --model pce_resnet18 --stem-type cifar --model-kwargs channels=[16,32,64,128] \
        --dataset fashion_mnist --epochs 2 --output-dir runs/x   # 28 px: 1.5 M params, 2x2 routing grids
    python scripts/train.py --config scripts/configs/demo_fmnist.yaml --output-dir runs/x
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py --config ... # N processes (CPU: gloo)
    python scripts/train.py --resume runs/x                                       # continue a run

Recipe keys are the argument names with underscores (``batch_size``) plus ``phases``; see
``pce_timm/train/recipe.py`` (flags), ``pce_timm/train/config.py`` (the typed config they fill) and
``pce_timm/train/schedule.py`` (phases).
"""
import sys


def main(argv=None) -> int:
    from pce_timm.train.cli import run_cli
    from pce_timm.train.config import parse_args
    from pce_timm.train.trainer import train

    return run_cli(lambda: train(parse_args(argv)))


if __name__ == '__main__':
    from _fast_help import flags_module, wants_help

    if wants_help():  # print the flags without importing torch (scripts/_fast_help.py)
        flags_module().build_parser().parse_args()
    sys.exit(main())
