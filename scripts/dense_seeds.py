#!/usr/bin/env python
"""Detection / segmentation runs of several seeds side by side: mean ± sample std per group, each metric on the
runs' eval split (where choices are made) and on a report split (eval_<split>.json, from evaluate_dense.py).

    for r in runs/seg-*-s?; do python scripts/evaluate_dense.py $r --split test; done
    python scripts/dense_seeds.py --group PCE runs/seg-pce-s0 runs/seg-pce-s1 runs/seg-pce-s2 \
        --group dense runs/seg-dense-s0 runs/seg-dense-s1 runs/seg-dense-s2 --json seg_seeds.json
"""
import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--group', action='append', nargs='+', required=True, metavar=('NAME', 'RUN_DIR'),
                        help='a row: its name, then its run folders (one per seed); repeat for each row')
    parser.add_argument('--report-split', default='test', help='the split reported (eval_<split>.json of each run)')
    parser.add_argument('--json', metavar='PATH', help='also write the summary (every value per seed) as JSON')
    args = parser.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            parser.error(f'--group {group[0]}: give the group a name, then at least one run folder')
    from pce_timm.tasks.seeds import format_seed_table, seed_summary
    from pce_timm.train.checkpoint import write_json_atomic
    from pce_timm.train.cli import run_cli

    def run():
        summary = seed_summary({g[0]: [Path(p) for p in g[1:]] for g in args.group}, args.report_split)
        print(format_seed_table(summary))
        if args.json:
            write_json_atomic(summary, Path(args.json))
            print(f'\nwrote {args.json}')

    return run_cli(run, extra_errors=(((FileNotFoundError, ValueError), 2),))


if __name__ == '__main__':
    sys.exit(main())
