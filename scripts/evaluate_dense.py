#!/usr/bin/env python
"""Evaluate a saved detection / segmentation run on its own (its model/, its dataset and eval split unless
given): prints map_50 / map or miou, per-class values and routing statistics, writes RUN_DIR/eval_<split>.json.

    python scripts/evaluate_dense.py runs/det-pce
    python scripts/evaluate_dense.py runs/seg-pce --split val --data-dir data/composed
"""
import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', help='a train_detection.py / train_segmentation.py run folder')
    parser.add_argument('--split', default=None, help="split to evaluate (default: the run's eval split)")
    parser.add_argument('--data-dir', default=None, help="the dataset folder (default: the run's)")
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--max-samples', type=int, default=None)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)  # --help answers here, before torch is imported
    from pce_timm.data.dense import DenseDataError
    from pce_timm.tasks.loop import evaluate_dense_run
    from pce_timm.train.cli import run_cli

    def run():
        result = evaluate_dense_run(args.run_dir, args.split, args.data_dir, args.batch_size, args.max_samples,
                                    args.progress, args.device)
        print(json.dumps({k: v for k, v in result.items() if k != 'routing'}, indent=2))

    return run_cli(run, extra_errors=(((DenseDataError, FileNotFoundError, ValueError), 3),))


if __name__ == '__main__':
    sys.exit(main())
