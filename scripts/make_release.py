#!/usr/bin/env python
"""Train, measure and release pce_timm's pretrained models (`make release`), reproducibly, on this machine.

    python scripts/make_release.py                      # train (or reuse) all runs, write + install releases
    python scripts/make_release.py --overwrite          # replace existing good releases
    python scripts/make_release.py --only pce           # only pce_resnet18.fmnist (no dense baseline)
    python scripts/make_release.py --only vit-pce vit-dense   # the PCE-ViT hybrid and its dense baseline
    python scripts/make_release.py -- --max-train-samples 512 --epochs 1   # extra scripts/train.py args

Releases (--only keys): pce / dense: pce_resnet18.fmnist and its dense ResNet-18 (recipe
scripts/configs/pce_resnet18_fmnist_release.yaml); vit-pce / vit-dense: pce_vit_hybrid_tiny_d4_r18.fmnist and
its dense ViT hybrid (scripts/configs/pce_vit_hybrid_tiny_d4_r18_fmnist_release.yaml). The steps (train,
measure, card YAML, release folder, HF cache, offline check, README table) are pce_timm.release.pipeline.
Uploading is separate: scripts/push_to_hub.py releases/<name> --repo-id pce-timm/<name> (needs a token).
Exit codes: 0 done, 2 bad input / refused (message on stderr), 3 dataset missing, 4 loss diverged, 5 a release
check failed.
"""
import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, train_extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__.split('\n\n', 2)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # None: ReleaseConfig's defaults, in this checkout (imported after parsing, so --help imports no torch)
    p.add_argument('--recipe', type=Path, help="training recipe (YAML) for the selected releases, which must share one "
                   "(default: each release's own, scripts/configs/*_release.yaml)")
    p.add_argument('--only', nargs='+', metavar='KEY', help='release only these (pce, dense, vit-pce, vit-dense; '
                   'default: all)')
    p.add_argument('--runs-dir', type=Path, help='training runs (default: runs/release)')
    p.add_argument('--releases-dir', type=Path, help='release folders (default: releases)')
    p.add_argument('--cards', type=Path, help="model card folder: the releases' family YAMLs to update, and the "
                   'README table rendered from all of them (default: model_cards)')
    p.add_argument('--readme', type=Path, help='README whose model table is rewritten (if marked; default: README.md)')
    p.add_argument('--cache-dir', type=Path, help='HF hub cache to install into (default: HF_HUB_CACHE)')
    p.add_argument('--overwrite', action='store_true', help='replace existing good release folders')
    p.add_argument('--retrain', action='store_true', help='train again even if a completed run matches')
    p.add_argument('--no-install', action='store_true', help='do not install into the HF cache')
    p.add_argument('--no-verify', action='store_true', help='skip the offline load check')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's); on shared cores 1 avoids "
                   'oversubscription, which can slow training several times')
    p.add_argument('--train-only', action='store_true', help='only train (or resume) and report the numbers; lets '
                   'the runs go in parallel (one process per --only); a later full run reuses them')
    args = p.parse_args(argv)
    if args.cards is not None and args.cards.is_file():
        p.error(f'--cards {args.cards}: takes the card folder (e.g. model_cards), which holds each family\'s YAML, '
                'not one YAML file')
    args.train_extra = train_extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)  # before the imports below (torch): --help is instant
    from pce_timm.release import (
        RELEASES,
        CardDataError,
        ReleaseCheckFailed,
        ReleaseConfig,
        ReleaseRefused,
        make_release,
    )
    from pce_timm.train.cli import run_cli

    keys = [spec.key for spec in RELEASES]
    unknown = [key for key in a.only or () if key not in keys]
    if unknown:
        print(f'error: --only {" ".join(unknown)}: no such release; choose from {", ".join(keys)}', file=sys.stderr)
        return 2
    paths = {key: getattr(a, key) for key in ('recipe', 'runs_dir', 'releases_dir', 'cards', 'readme')
             if getattr(a, key) is not None}
    if a.threads is not None:
        import torch
        torch.set_num_threads(a.threads)
    cfg = ReleaseConfig(
        **paths, only=tuple(a.only) if a.only else None, cache_dir=a.cache_dir, overwrite=a.overwrite,
        retrain=a.retrain,
        install=not a.no_install, verify=not a.no_verify, progress=not a.no_progress, train_only=a.train_only,
        train_extra=tuple(a.train_extra))
    return run_cli(lambda: make_release(cfg),
                   extra_errors=[((ReleaseRefused, CardDataError), 2), ((ReleaseCheckFailed,), 5)])


if __name__ == '__main__':
    sys.exit(main())
