#!/usr/bin/env python
"""Compose a detection + segmentation set from real Fashion-MNIST items, written as a Pascal VOCdevkit.

    python scripts/make_dense_dataset.py --output-dir data/fmnist_voc --num-train 2000 --num-val 500
    python scripts/train_detection.py --dataset voc --data-dir data/fmnist_voc ...   # read as any VOC set

Several items per canvas, random scale and place with limited overlap, boxes from each item's visible pixels,
palette-PNG class masks with a 1-pixel ignore (255) ring; see pce_timm/data/compose.py. The same arguments
write the same bytes. Needs Fashion-MNIST's IDX files (Debian: apt-get install dataset-fashion-mnist).
"""
import argparse
import sys


def _int_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition('-')
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected N or MIN-MAX (e.g. 1-4), got {text!r}') from None
    return bounds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--output-dir', required=True, help='the VOCdevkit folder to write (VOC2012/ inside)')
    parser.add_argument('--num-train', type=int, required=True, help='train canvases (Fashion-MNIST train items)')
    parser.add_argument('--num-val', type=int, required=True, help='val canvases (Fashion-MNIST test items)')
    parser.add_argument('--num-test', type=int, default=0, help='test canvases (items from the half of Fashion-MNIST '
                        'test that val does not use): report on test, choose on val; 0: no test split')
    parser.add_argument('--canvas-size', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--items-per-canvas', type=_int_range, default=(1, 4), help='N or MIN-MAX')
    parser.add_argument('--source-dir', default=None, help='folder with the Fashion-MNIST IDX files; None: the '
                        "Debian package dataset-fashion-mnist's (/usr/share/datasets/fashion-mnist)")
    parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --output-dir')
    parser.add_argument('--no-progress', action='store_true')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # before the imports below (torch): --help is instant
    from pce_timm.data.compose import DEFAULT_SOURCE_DIR, ComposeConfig, write_composed_voc
    from pce_timm.data.voc import DenseDataError
    from pce_timm.train.cli import run_cli

    def run():
        cfg = ComposeConfig(num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                            canvas_size=args.canvas_size,
                            seed=args.seed, items_per_canvas=args.items_per_canvas,
                            source_dir=args.source_dir or DEFAULT_SOURCE_DIR)
        summary = write_composed_voc(args.output_dir, cfg, overwrite=args.overwrite, progress=not args.no_progress)
        print(f'wrote {summary["root"]} ({len(summary["classes"]) - 1} classes + background, '
              f'{cfg.canvas_size}x{cfg.canvas_size} canvases, seed {cfg.seed})')
        for split, numbers in summary['splits'].items():
            counts = ', '.join(f'{name} {n}' for name, n in numbers['objects_per_class'].items())
            print(f'  {split}: {numbers["images"]} images, {numbers["objects"]} objects ({counts})')

    return run_cli(run, extra_errors=(((ValueError, FileExistsError, DenseDataError), 2),))


if __name__ == '__main__':
    sys.exit(main())
