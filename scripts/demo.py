#!/usr/bin/env python
"""The pce_timm demo: a PCE-ResNet and the dense ResNet of the same widths, one recipe, Fashion-MNIST.

Trains both models with scripts/configs/demo_fmnist.yaml (the dense run is the same recipe with
`--pce-stages` set to no stages), then prints a side-by-side table (test top-1 / top-5 of the final
epoch, parameters, train time, usage entropy / imbalance of the PCE layers) and draws which expert each
patch of a few test images went to. The library side is pce_timm.demo.

    make demo                                               # = .venv/bin/python scripts/demo.py
    python scripts/demo.py --output-dir runs/demo2          # somewhere else
    python scripts/demo.py --overwrite                      # replace the demo in runs/demo
    python scripts/demo.py --max-train-samples 512 --epochs 2 --max-eval-samples 500   # a quick smoke run
    python scripts/demo.py --lr 0.003 --workers 1           # any other train option goes to both runs

Outputs (in --output-dir, default runs/demo):
    results.json   one row per model (top1, top5, num_params, train_time_s, routing statistics, ...)
    table.txt      the table printed at the end
    routing.png    expert of every patch, per PCE layer (columns), for a few test images (rows)
    pce/, dense/   the two training runs (config.yaml, results.json, model/, checkpoints/, logs/)

An existing, non-empty --output-dir is never replaced silently: the demo refuses to start unless
--overwrite is given, and then the old folder is kept aside until the new demo has completed (a failed or
interrupted demo puts it back).

Data: Fashion-MNIST from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist),
which `make demo` installs when apt is usable; or the Hugging Face cache, or --data-dir DIR.
Exit codes: 0 done, 2 bad arguments or output folder in the way, 3 data missing, 4 the loss diverged.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='scripts/demo.py', description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Every other option (e.g. --lr, --batch-size, --model-kwargs, --max-eval-samples, --progress, '
               '--data-dir) is a scripts/train.py option and is passed to both training runs.')
    # None: pce_timm.demo.DemoConfig's defaults (imported after parsing, so --help imports no torch)
    parser.add_argument('--output-dir', type=Path, default=None,
                        help='demo folder (default: runs/demo, relative to the current folder)')
    parser.add_argument('--config', default=None, metavar='YAML',
                        help='the recipe both models train with (default: scripts/configs/demo_fmnist.yaml)')
    parser.add_argument('--epochs', type=int, default=None, help="override the recipe's epochs")
    parser.add_argument('--max-train-samples', type=int, default=None,
                        help='train on a fixed random subset of this many images (quick smoke runs)')
    parser.add_argument('--num-images', type=int, default=4,
                        help='test images (of different classes) in routing.png (default: %(default)s)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing demo in --output-dir (kept until the new one completes)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    from pce_timm.demo import DemoConfig, TrainingFailed, run_demo
    from pce_timm.train.cli import run_cli

    paths = {key: value for key, value in (('output_dir', args.output_dir), ('recipe', args.config)) if value}
    demo = DemoConfig(**paths, epochs=args.epochs, max_train_samples=args.max_train_samples,
                      num_images=args.num_images, overwrite=args.overwrite, train_extra=tuple(extra))
    try:
        return run_cli(lambda: run_demo(demo))
    except TrainingFailed as e:  # the training process printed why
        return e.exit_code


if __name__ == '__main__':
    sys.exit(main())
