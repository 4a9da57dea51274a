#!/usr/bin/env python
"""Evaluate a trained model: top-1 / top-5 / loss on a dataset split, with per-layer routing statistics.

    python scripts/evaluate.py --model runs/demo/pce_resnet18 --dataset fashion_mnist
    python scripts/evaluate.py --model local-dir:runs/x/model --dataset fashion_mnist --split test --output r.json
    accelerate launch --num_processes 2 scripts/evaluate.py --model runs/x --dataset fashion_mnist

--model takes a run folder, a model folder, a checkpoint folder, local-dir:DIR, hf-hub:ID or a timm name with
pretrained weights. Writes JSON (default: <run>/eval-<dataset>-<split>.json) and prints a table.
"""
import argparse
import sys


def build_parser(mixed_precision) -> argparse.ArgumentParser:
    """The flags (``mixed_precision``: the accepted values, :data:`pce_timm.train.flags.MIXED_PRECISION`)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--model', required=True, help='run / model / checkpoint folder, local-dir:, hf-hub:, name')
    parser.add_argument('--dataset', required=True)
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--split', default='test')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--max-samples', type=int, default=None)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--mixed-precision', default='no', choices=mixed_precision)
    parser.add_argument('--output', default=None, help='JSON file to write')
    parser.add_argument('--no-progress', action='store_true')
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    from pce_timm.train.flags import MIXED_PRECISION

    return build_parser(MIXED_PRECISION).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pce_timm.train.cli import run_cli
    from pce_timm.train.evaluation import default_output, evaluate_model, results_table, save_results

    def run():
        results = evaluate_model(args.model, args.dataset, args.split, args.data_dir, args.batch_size,
                                 args.max_samples, args.workers, args.mixed_precision,
                                 progress=not args.no_progress)
        path = save_results(results, args.output or default_output(args.model, args.dataset, args.split))
        print(results_table(results))
        print(f'\nwrote {path}')

    return run_cli(run)


if __name__ == '__main__':
    from _fast_help import flags_module, wants_help

    if wants_help():  # print the flags without importing torch (scripts/_fast_help.py)
        build_parser(flags_module().MIXED_PRECISION).parse_args()
    sys.exit(main())
