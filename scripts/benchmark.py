#!/usr/bin/env python
"""Benchmark PCE layers (and models) against dense baselines, side by side in one process.

    python scripts/benchmark.py                      # layer table at B=32, C=64, 32x32, patch 8, k=3
    python scripts/benchmark.py --rounds 20 --json bench.json
    python scripts/benchmark.py --section models     # PCE models next to timm's dense models, 224 px, b32
    python scripts/benchmark.py --section models --models pce_resnet18_e8 --model-rounds 5
    python scripts/benchmark.py --profile 'pce E=8 top-1'   # where one layer case spends its training step
    python scripts/benchmark.py --section bound --rounds 30  # top-1 with free gathers: can faster gathers reach 1.25x?

Ratios are measured in this run (interleaved rounds, medians), never compared across runs. Like every
script here, the benchmark first tells glibc malloc to keep freed memory (pce_timm.runtime; PyTorch's CPU
guide recommends jemalloc/TCMalloc for the same reason); PCE_TIMM_MALLOC_TUNING=0 measures without it.
"""
import argparse
import json
import sys

import torch

from pce_timm.benchmark import (
    bound_cases,
    bound_verdict,
    format_table,
    layer_cases,
    layer_goals,
    profile_case,
    time_cases,
    timings_to_dict,
)
from pce_timm.runtime import keep_freed_memory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--section', choices=('layers', 'bound', 'models', 'all'), default='layers',
                        help="layers: the layer table and its goals; bound: top-1 PCE with its two gathers made free "
                             "(a lower bound for any gather implementation) next to dense and dense + 1x1 conv; "
                             "models: whole PCE models next to timm's dense ones; all: the three")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, default=32, help='layer input height = width')
    parser.add_argument('--patch-size', type=int, default=8)
    parser.add_argument('--kernel-size', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds per case (median is reported)')
    parser.add_argument('--models', nargs='+', default=None,
                        help='models section: pce_* models (and efficientnet_cc_b0_*) to time next to their dense '
                             'baselines (default: every PCE-ResNet, pce_vit_hybrid_small_r18, efficientnet_cc_b0_4e)')
    parser.add_argument('--model-size', type=int, default=224, help='models section: input height = width')
    parser.add_argument('--model-batch-size', type=int, default=32)
    parser.add_argument('--model-rounds', type=int, default=3, help='models section: timed rounds per model')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    parser.add_argument('--profile', metavar='CASE',
                        help="instead of timing, print torch.profiler's table for training steps of one case "
                             "(a name from the layer or bound table, e.g. 'pce E=8 top-1')")
    args = parser.parse_args(argv)
    for name in ('batch_size', 'channels', 'size', 'patch_size', 'kernel_size', 'rounds', 'model_size',
                 'model_batch_size', 'model_rounds'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    return args


def layer_input_shape(args: argparse.Namespace) -> tuple:
    return (args.batch_size, args.channels, args.size, args.size)


def time_layer_cases(args: argparse.Namespace, cases: list, desc: str) -> tuple:
    """Time ``cases`` on the layer input (seeded); returns the timings and a line describing the setting."""
    torch.manual_seed(0)
    shape = layer_input_shape(args)
    timings = time_cases(cases, lambda: torch.randn(shape), rounds=args.rounds, desc=desc)
    setting = (f'input {list(shape)}, patch {args.patch_size}, kernel {args.kernel_size}, '
               f'{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds')
    return timings, setting


def run_layers(args: argparse.Namespace) -> dict:
    timings, setting = time_layer_cases(args, layer_cases(args.channels, args.patch_size, args.kernel_size), 'layers')
    goals = layer_goals(timings)
    print(f'\nLayers: {setting}\n')
    print(format_table(timings, ['E', 'routing', 'mix_conv']))
    print()
    for goal in goals:
        status = 'OK ' if goal['ok'] else 'MISS'
        target = f", goal {goal['target']}" if goal['target'] else ''
        print(f"[{status}] {goal['goal']}: {goal['value']} (limit {goal['limit']}{target}) [{goal['case']}]")
    return {'input_shape': list(layer_input_shape(args)), 'timings': timings_to_dict(timings), 'goals': goals}


def run_bound(args: argparse.Namespace) -> dict:
    timings, setting = time_layer_cases(args, bound_cases(args.channels, args.patch_size, args.kernel_size), 'bound')
    verdict = bound_verdict(timings)
    print(f'\nLower bound for the training step: {setting}. "free gathers": the window gather and the gather back '
          'to pixels return stored tensors and cost nothing, forward and backward.\n')
    print(format_table(timings, [], forward=False))
    answer = 'yes' if verdict['reachable_by_faster_gathers'] else 'no'
    print(f"\n[bound] {verdict['case']}: {verdict['value']} x dense fwd+bwd (limit {verdict['limit']}); "
          f'can faster gathers alone meet the limit: {answer}')
    return {'input_shape': list(layer_input_shape(args)), 'timings': timings_to_dict(timings), 'verdict': verdict}


def run_profile(args: argparse.Namespace) -> int:
    sizes = args.channels, args.patch_size, args.kernel_size
    cases = {case.name: case for case in layer_cases(*sizes) + bound_cases(*sizes)}
    if args.profile not in cases:
        print(f'error: --profile {args.profile!r} is not a layer or bound case; choose one of: {", ".join(cases)}',
              file=sys.stderr)
        return 2
    shape = layer_input_shape(args)
    torch.manual_seed(0)
    print(f'{args.profile}: input {list(shape)}, {torch.get_num_threads()} threads, 5 training steps\n')
    print(profile_case(cases[args.profile], lambda: torch.randn(shape)))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    malloc_tuned = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return run_profile(args)
    results = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'malloc_tuned': malloc_tuned}
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, glibc malloc keeps freed memory: '
          f'{"yes" if malloc_tuned else "no"}')
    if args.section in ('layers', 'all'):
        results['layers'] = run_layers(args)
    if args.section in ('bound', 'all'):
        results['bound'] = run_bound(args)
    if args.section in ('models', 'all'):
        from pce_timm.benchmark_models import run_models  # the model zoo is imported only when asked for
        results['models'] = run_models(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
