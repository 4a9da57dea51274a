#!/usr/bin/env python
"""Run a sweep: a grid of training recipes x seeds (scripts/train.py runs), selected on validation, summarised.

    python scripts/sweep.py --config scripts/configs/sweeps/fmnist_factors.yaml --output-dir runs/sweeps/fmnist
    python scripts/sweep.py --config ... --output-dir ... --summary-only     # rebuild summary.* from the runs
    python scripts/sweep.py --config ... --output-dir ... --cells dense 'pce base'   # only these cells

Two processes may share one --output-dir if their --cells differ (a cell that starts from another cell's runs
goes in the same process as that cell, after it).

Resumable: rerun the same command after an interruption; finished runs are never rerun. Writes
summary.json, summary.md and summary.png into --output-dir (pce_timm.sweep has the config format).
Exit codes: 0 done, 2 bad config, 5 a run failed (its log is named).
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--config', required=True, help='sweep config YAML (scripts/configs/sweeps/)')
    parser.add_argument('--output-dir', required=True, help='where the runs and the summary go')
    parser.add_argument('--summary-only', action='store_true', help='only rebuild the summary from finished runs')
    parser.add_argument('--cells', nargs='+', default=None, metavar='NAME',
                        help='run only these cells (by name); the summary covers every finished run')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)  # --help answers here, before torch is imported
    from pce_timm.sweep import SweepConfigError, SweepError, format_summary, load_sweep_config, run_sweep, summarize
    from pce_timm.train.cli import run_cli

    def run():
        cfg = load_sweep_config(args.config)
        if args.summary_only:
            summary = summarize(cfg, args.output_dir)
        else:
            summary = run_sweep(cfg, args.output_dir, progress=not args.no_progress, only=args.cells)
        print(format_summary(summary))
        print(f'wrote {args.output_dir}/summary.json, summary.md, summary.png')

    return run_cli(run, extra_errors=(((SweepConfigError,), 2), ((SweepError,), 5)))


if __name__ == '__main__':
    sys.exit(main())
