#!/usr/bin/env python
"""Train a detection model on a pce_timm (or any timm) backbone with accelerate: train.py's flags and recipes
(phases, aux routing losses, K-Means key init, checkpoints, --resume, trackers) plus --arch.

    python scripts/make_dense_dataset.py --output-dir data/composed --num-train 600 --num-val 200
    python scripts/train_detection.py --config scripts/configs/dense_detection.yaml \
        --data-dir data/composed --output-dir runs/x
    accelerate launch --multi_gpu --num_processes 2 scripts/train_detection.py --config ...  # 2 ranks (CPU: gloo)
    python scripts/train_detection.py --resume runs/x                                        # continue a run
    python scripts/evaluate_dense.py runs/x                                              # evaluate it again

The run folder holds results.json (map_50, map, per-class values, routing statistics), model/
(dense_config.json + model.safetensors) and routing.png; see pce_timm/tasks/loop.py.
"""
import sys


def main(argv=None) -> int:
    from pce_timm.data.dense import DenseDataError
    from pce_timm.tasks.loop import train_dense
    from pce_timm.train.cli import run_cli

    return run_cli(lambda: train_dense('detection', argv), extra_errors=(((DenseDataError,), 3),))


if __name__ == '__main__':
    from _fast_help import flags_module, wants_help

    if wants_help():  # print the flags without importing torch (scripts/_fast_help.py)
        flags_module().build_dense_parser('detection').parse_args()
    sys.exit(main())
