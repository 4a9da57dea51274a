#!/usr/bin/env python
"""Benchmark PCE layers (and models) against dense baselines, side by side in one run.

    python scripts/benchmark.py                      # layer table at B=32, C=64, 32x32, patch 8, k=3
    python scripts/benchmark.py --rounds 20 --json bench.json
    python scripts/benchmark.py --tuned              # + a row per case with glibc malloc tuning
    python scripts/benchmark.py --old-rev main       # + the same cases on the code of git revision main
    python scripts/benchmark.py --section models     # PCE models next to timm's dense models, 224 px, b32
    python scripts/benchmark.py --section models --models pce_resnet18_e8 --model-rounds 5
    python scripts/benchmark.py --section grid       # pce_resnet18(_e8) at several routing grids vs resnet18, 224 px
    python scripts/benchmark.py --section dense      # detector + segmenter, PCE vs dense backbone, 128 px, b8
    python scripts/benchmark.py --section campaign --threads 1   # a training step of the campaign's cells vs dense
    python scripts/benchmark.py --profile 'pce E=8 top-1'   # where one layer case spends its training step
    python scripts/benchmark.py --section bound --rounds 30  # top-1 with free gathers: can faster gathers reach 1.25x?
    python scripts/benchmark.py --section compile    # torch.compile: first-call time, compiled vs eager, 64 px, b8
    python scripts/benchmark.py --section compile --compile-modes eval train --compile-img-size 224

Speed is measured as a user's process gets it: every case runs in a plain worker subprocess, and nothing
changes the allocator unless asked. --tuned adds a worker with glibc malloc tuning (PCE_TIMM_MALLOC_TUNING=1,
pce_timm.runtime), --jemalloc one with jemalloc preloaded (Debian: apt-get install libjemalloc2); each shows
as a second row per case, labelled in the "process" column. --old-rev REV times the code of REV (a temporary
git worktree, timed by this harness) in workers of its own. All workers' rounds are interleaved, so ratios are
measured in this run (medians), never compared across runs. The goals are read on this tree's plain rows.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--section', choices=('layers', 'bound', 'models', 'grid', 'dense', 'campaign', 'compile',
                                                  'all'),
                        default='layers',
                        help="layers: the layer table and its goals; bound: top-1 PCE with its two gathers made free "
                             "(a lower bound for any gather implementation) next to its dense blocks; "
                             "models: whole PCE models next to timm's dense ones; grid: pce_resnet18(_e8) at several "
                             "routing grids (the old pixel default, the default patch_grid, finer) next to resnet18 "
                             "in one process, and the zoo's speed goals at each; dense: the dense recipes' "
                             "detector and segmenter with a PCE vs a dense backbone; campaign: a training step of "
                             "a sweep's cells (the Fashion-MNIST campaign's winners and their controls) next to its "
                             "dense cell, each in its recipe's last phase; compile: torch.compile's "
                             "first-call time and compiled vs eager speed per model, each in a fresh process with "
                             "a cold inductor cache; all: the first five")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, default=32, help='layer input height = width')
    parser.add_argument('--patch-size', type=int, default=8)
    parser.add_argument('--kernel-size', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds per case (median is reported)')
    parser.add_argument('--models', nargs='+', default=None,
                        help='models section: pce_* models (and efficientnet_cc_b0_*) to time next to their dense '
                             'baselines (default: every PCE-ResNet, pce_vit_hybrid_small_r18, efficientnet_cc_b0_4e)')
    parser.add_argument('--grid-models', nargs='+', default=None,
                        help='grid section: PCE-ResNet-18s to time at every grid (default: pce_resnet18 '
                             'pce_resnet18_e8)')
    parser.add_argument('--model-size', type=int, default=224, help='models and grid sections: input height = width')
    parser.add_argument('--model-batch-size', type=int, default=32, help='models and grid sections: batch size')
    parser.add_argument('--model-rounds', type=int, default=3,
                        help='models and grid sections: timed rounds per model')
    parser.add_argument('--dense-size', type=int, default=128, help='dense section: image height = width')
    parser.add_argument('--dense-batch-size', type=int, default=8)
    parser.add_argument('--dense-rounds', type=int, default=3, help='dense section: timed rounds per model')
    parser.add_argument('--campaign-config', default=None, metavar='YAML',
                        help='campaign section: the sweep config whose cells are timed (default: '
                             'scripts/configs/sweeps/fmnist_factors.yaml)')
    parser.add_argument('--campaign-cells', nargs='+', default=None, metavar='CELL',
                        help="campaign section: cell names, the first is the reference (default: dense, pce base, "
                             "the two winners and the two widened dense controls)")
    parser.add_argument('--campaign-rounds', type=int, default=10, help='campaign section: timed rounds per cell')
    parser.add_argument('--compile-models', nargs='+', default=None,
                        help='compile section: timm / pce_* models (default: resnet18 pce_resnet18 pce_resnet18_e8)')
    parser.add_argument('--compile-modes', nargs='+', choices=('eval', 'train'), default=['eval'],
                        help='compile section: eval (no_grad forward) and / or train (forward + backward); a cold '
                             'compile of a PCE training step takes several minutes even at 64 px')
    parser.add_argument('--compile-img-size', type=int, default=64, help='compile section: input height = width')
    parser.add_argument('--compile-batch-size', type=int, default=8)
    parser.add_argument('--compile-backend', default='inductor',
                        help="compile section: torch.compile's backend (eager: Dynamo's tracing alone, aot_eager: "
                             'and AOTAutograd; the difference to inductor is the code generation)')
    parser.add_argument('--compile-rounds', type=int, default=5,
                        help='compile section: timed rounds of eager and compiled calls after the first call')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--tuned', action='store_true',
                        help='also time every case in a worker with glibc malloc tuning (PCE_TIMM_MALLOC_TUNING=1: '
                             'glibc malloc keeps freed memory; pce_timm.runtime)')
    parser.add_argument('--jemalloc', nargs='?', const='auto', metavar='LIB',
                        help='also time every case in a worker with jemalloc preloaded (LD_PRELOAD=LIB; default: the '
                             'libjemalloc the dynamic loader finds, Debian: apt-get install libjemalloc2)')
    parser.add_argument('--old-rev', metavar='REV',
                        help='also time the same cases on the code of git revision REV (a temporary git worktree, '
                             'removed afterwards), rounds interleaved with this tree, and print new/old ratios')
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    parser.add_argument('--profile', metavar='CASE',
                        help="instead of timing, print torch.profiler's table for training steps of one case "
                             "(a name from the layer or bound table, e.g. 'pce E=8 top-1'), in this plain process")
    args = parser.parse_args(argv)
    for name in ('batch_size', 'channels', 'size', 'patch_size', 'kernel_size', 'rounds', 'model_size',
                 'model_batch_size', 'model_rounds', 'dense_size', 'dense_batch_size', 'dense_rounds',
                 'campaign_rounds', 'compile_img_size', 'compile_batch_size', 'compile_rounds'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.jemalloc == 'auto':
        args.jemalloc = find_jemalloc()
        if not args.jemalloc:
            parser.error('--jemalloc: no libjemalloc found (Debian: apt-get install libjemalloc2), or pass its path')
    return args



if __name__ == '__main__' and any(arg in ('-h', '--help') for arg in sys.argv[1:]):
    parse_args()  # prints the options and exits, before torch is imported below

import torch  # noqa: E402

from pce_timm.benchmark import (  # noqa: E402
    PROCESSES,
    ROOT,
    THIS_TREE,
    VariantTimings,
    bound_cases,
    bound_verdict,
    find_jemalloc,
    format_new_over_old,
    format_table,
    git_worktree,
    layer_cases,
    layer_goals,
    make_variants,
    new_over_old,
    profile_case,
    resolve_commit,
    time_variants,
    timings_to_dict,
)


def layer_input_shape(args: argparse.Namespace) -> tuple:
    return (args.batch_size, args.channels, args.size, args.size)


def _layer_spec(args: argparse.Namespace, section: str) -> dict:
    return {'section': section, 'input_shape': list(layer_input_shape(args)), 'patch_size': args.patch_size,
            'kernel_size': args.kernel_size, 'threads': args.threads}


def _by_label(results: List[VariantTimings]) -> Optional[Dict[str, list]]:
    """``{label: timings}`` for a table with a process column, or None when there is one variant."""
    return {r.variant.label: r.timings for r in results} if len(results) > 1 else None


def _section_json(results: List[VariantTimings], primary: dict, judge) -> dict:
    """This tree's plain figures at the top (``timings`` and what they are judged by), every variant below."""
    out = dict(primary)
    out['variants'] = {r.variant.label: {'code': r.variant.code, 'process': r.variant.process, **r.meta,
                                         'timings': timings_to_dict(r.timings), **judge(r.timings)}
                       for r in results}
    out['new_over_old'] = new_over_old(results)
    return out


def _print_new_over_old(results: List[VariantTimings], forward: bool = True) -> None:
    rows = new_over_old(results)
    if rows:
        print(f'\nNew / old: time of {THIS_TREE} / time of {rows[0]["old"]} (below 1: the new code is faster)\n')
        print(format_new_over_old(rows, forward=forward))


def _setting(results: List[VariantTimings], rounds: int) -> str:
    return f'{results[0].meta["threads"]} threads, median of {rounds} interleaved rounds'


def run_layers(args: argparse.Namespace, variants: list) -> dict:
    results = time_variants(_layer_spec(args, 'layers'), variants, rounds=args.rounds, desc='layers')
    timings = results[0].timings
    goals = layer_goals(timings)
    print(f'\nLayers: input {list(layer_input_shape(args))}, patch {args.patch_size}, kernel {args.kernel_size}, '
          f'{_setting(results, args.rounds)}; x = time / the dense block in "vs" (lower is better)\n')
    print(format_table(timings, ['E', 'routing', 'mix_conv', 'vs'], variants=_by_label(results)))
    print()
    for goal in goals:
        status = 'OK ' if goal['ok'] else 'MISS'
        target = f", goal {goal['target']}" if goal['target'] else ''
        print(f"[{status}] {goal['goal']}: {goal['value']} (limit {goal['limit']}{target}) [{goal['case']}, "
              f'{results[0].variant.label}]')
    _print_new_over_old(results)
    primary = {'input_shape': list(layer_input_shape(args)), 'timings': timings_to_dict(timings), 'goals': goals}
    return _section_json(results, primary, lambda t: {'goals': layer_goals(t)})


def run_bound(args: argparse.Namespace, variants: list) -> dict:
    results = time_variants(_layer_spec(args, 'bound'), variants, rounds=args.rounds, desc='bound')
    timings = results[0].timings
    verdict = bound_verdict(timings)
    print(f'\nLower bound for the training step: input {list(layer_input_shape(args))}, patch {args.patch_size}, '
          f'kernel {args.kernel_size}, {_setting(results, args.rounds)}. "free gathers": the window gather '
          'and the gather back to pixels return stored tensors and cost nothing, forward and backward; x = time / '
          'the dense block in "vs".\n')
    print(format_table(timings, ['vs'], forward=False, variants=_by_label(results)))
    answer = 'yes' if verdict['reachable_by_faster_gathers'] else 'no'
    print(f"\n[bound] {verdict['case']}: {verdict['value']} x dense + 1x1 fwd+bwd (limit {verdict['limit']}); "
          f'can faster gathers alone meet the limit: {answer}')
    _print_new_over_old(results, forward=False)
    primary = {'input_shape': list(layer_input_shape(args)), 'timings': timings_to_dict(timings), 'verdict': verdict}
    return _section_json(results, primary, lambda t: {'verdict': bound_verdict(t)})


def run_models(args: argparse.Namespace, variants: list) -> dict:
    from pce_timm.benchmark_models import DEFAULT_MODELS, format_model_table, model_goals, model_rows

    size, batch = args.model_size, args.model_batch_size
    spec = {'section': 'models', 'models': list(args.models or DEFAULT_MODELS), 'size': size, 'batch_size': batch,
            'threads': args.threads}
    results = time_variants(spec, variants, rounds=args.model_rounds, warmup=1, desc='models')
    rows = {r.variant.label: model_rows(r.timings, batch) for r in results}
    primary_rows = rows[results[0].variant.label]
    goals = model_goals(primary_rows)
    print(f'\nModels: batch {batch}, {size}x{size} px, {_setting(results, args.model_rounds)}; '
          'x = throughput / the dense baseline in "vs" (higher is better)\n')
    if len(results) == 1:
        print(format_model_table(primary_rows))
    else:
        labels = list(rows)
        by_model = {label: {row['model']: row for row in rows[label]} for label in labels}  # an older tree may lack
        interleaved = [(label, by_model[label][row['model']]) for row in primary_rows  # some models
                       for label in labels if row['model'] in by_model[label]]
        print(format_model_table([row for _, row in interleaved], processes=[label for label, _ in interleaved]))
    print()
    for goal in goals:
        print(f"[{'OK ' if goal['ok'] else 'MISS'}] {goal['goal']}: {goal['value']} (at least {goal['limit']}) "
              f'[{results[0].variant.label}]')
    _print_new_over_old(results)
    primary = {'input_size': [batch, 3, size, size], 'rows': primary_rows, 'goals': goals}
    out = _section_json(results, primary, lambda t: {'goals': model_goals(model_rows(t, batch))})
    for r in results:
        out['variants'][r.variant.label]['rows'] = rows[r.variant.label]
    return out


def run_grid(args: argparse.Namespace, variants: list) -> dict:
    from pce_timm.benchmark_models import GRID_MODELS, format_grid_table, grid_goals, model_rows

    size, batch = args.model_size, args.model_batch_size
    spec = {'section': 'grid', 'models': list(args.grid_models or GRID_MODELS), 'size': size, 'batch_size': batch,
            'threads': args.threads}
    results = time_variants(spec, variants, rounds=args.model_rounds, warmup=1, desc='grid')
    print(f'\nRouting grids: batch {batch}, {size}x{size} px, {_setting(results, args.model_rounds)}, every case in '
          'one worker per process setting; x = throughput / resnet18 (higher is better); the grids are each PCE '
          "stage's (its stride-1 layers') patch grid at this size, with the output patch in px\n")
    out = {'input_size': [batch, 3, size, size], 'variants': {}}
    for r in results:
        rows = model_rows(r.timings, batch)
        grids = {t.name: t.info.get('grids', '') for t in r.timings}
        goals = grid_goals(rows)
        if len(results) > 1:
            print(f'{r.variant.label}:\n')
        print(format_grid_table(rows, grids))
        print()
        for goal in goals:
            print(f"[{'OK ' if goal['ok'] else 'MISS'}] pce_resnet18_e8, {goal['routing']}: train {goal['train_x']} "
                  f"(at least 0.9), inference {goal['infer_x']} (at least 0.95) [{r.variant.label}]")
        held = [g['routing'] for g in goals if g['ok']]
        print(f"goals hold at: {'; '.join(held) if held else 'none of these grids'} [{r.variant.label}]\n")
        out['variants'][r.variant.label] = {'code': r.variant.code, 'process': r.variant.process, **r.meta,
                                            'rows': [dict(row, grids=grids[row['model']]) for row in rows],
                                            'goals': goals}
    first = out['variants'][results[0].variant.label]
    out['rows'], out['goals'] = first['rows'], first['goals']
    out['new_over_old'] = new_over_old(results)
    _print_new_over_old(results)
    return out


def _model_rows_section(results: List[VariantTimings], batch: int, header: str, primary: dict) -> dict:
    """Print and return a section of model rows (throughput and x = ratio to the reference), one row per case
    and process; ``primary`` (the spec shown in the JSON) gets this tree's plain rows."""
    from pce_timm.benchmark_models import format_model_table, model_rows

    rows = {r.variant.label: model_rows(r.timings, batch) for r in results}
    print(header)
    labels = list(rows)
    primary_rows = rows[labels[0]]
    if len(labels) == 1:
        print(format_model_table(primary_rows))
    else:
        interleaved = [(label, rows[label][i]) for i in range(len(primary_rows)) for label in labels]
        print(format_model_table([row for _, row in interleaved], processes=[label for label, _ in interleaved]))
    _print_new_over_old(results)
    out = _section_json(results, dict(primary, rows=primary_rows), lambda t: {})
    for r in results:
        out['variants'][r.variant.label]['rows'] = rows[r.variant.label]
    return out


def run_dense(args: argparse.Namespace, variants: list) -> dict:
    size, batch = args.dense_size, args.dense_batch_size
    spec = {'section': 'dense', 'size': size, 'batch_size': batch, 'threads': args.threads}
    results = time_variants(spec, variants, rounds=args.dense_rounds, warmup=1, desc='dense')
    header = (f'\nDense tasks: batch {batch}, {size}x{size} px, {_setting(results, args.dense_rounds)}; backbone '
              'widths 16-128, PCE in stages 1-2 (4x4 patch grids), 4 experts top-1; x = throughput / the dense twin '
              '(higher is better); train = loss + backward (detector: torchvision losses)\n')
    return _model_rows_section(results, batch, header, {'input_size': [batch, 3, size, size]})


def run_campaign(args: argparse.Namespace, variants: list) -> dict:
    from pce_timm.benchmark_campaign import DEFAULT_CELLS, DEFAULT_SWEEP

    sweep, cells = str(args.campaign_config or DEFAULT_SWEEP), list(args.campaign_cells or DEFAULT_CELLS)
    spec = {'section': 'campaign', 'sweep': sweep, 'cells': cells, 'threads': args.threads}
    results = time_variants(spec, variants, rounds=args.campaign_rounds, warmup=2, desc='campaign')
    shape = results[0].meta['input_shape']
    shown = Path(sweep).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    header = (f'\nCampaign cells ({shown}): input {shape}, {_setting(results, args.campaign_rounds)}; each model '
              f"in its recipe's last phase; x = throughput / {cells[0]!r} (higher is better); train = forward + "
              'backward\n')
    return _model_rows_section(results, shape[0], header, {'sweep': sweep, 'input_size': shape})


def run_compile(args: argparse.Namespace, variants: list) -> dict:
    from pce_timm.benchmark_compile import DEFAULT_MODELS, compile_rows, format_compile_table
    from pce_timm.progress import progress_bar

    models, modes = list(args.compile_models or DEFAULT_MODELS), list(dict.fromkeys(args.compile_modes))
    size, batch = args.compile_img_size, args.compile_batch_size
    if len(variants) > 1:
        print('\n(compile section: this tree, plain processes only; --tuned / --jemalloc / --old-rev do not apply)')
    with progress_bar(total=len(models) * len(modes), desc='compile', leave=False) as bar:
        rows = compile_rows(models, modes, size, batch, args.compile_rounds, args.threads, progress=bar,
                            backend=args.compile_backend)
    print(f'\ntorch.compile (default mode, {args.compile_backend}): batch {batch}, {size}x{size} px, '
          f'{rows[0]["threads"]} threads, one fresh process and a cold inductor cache per row; '
          f'first call = compile + one call; eager / compiled ms: medians of {args.compile_rounds} interleaved '
          'calls; speed-up = eager ms / compiled ms (above 1: compiled is faster); eval: no_grad forward, '
          'train: forward + backward\n')
    print(format_compile_table(rows))
    return {'input_size': [batch, 3, size, size], 'backend': args.compile_backend, 'rows': rows}


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


def run(args: argparse.Namespace, old=None) -> dict:
    variants = make_variants(tuned=args.tuned, jemalloc=args.jemalloc, old=old)
    print(f'torch {torch.__version__}; processes: ' + '; '.join(
        f'{label} ({PROCESSES[label]})' for label in dict.fromkeys(v.process for v in variants))
          + (f'; code: {THIS_TREE} and {old[0]}' if old else ''))
    results = {'torch': torch.__version__,
               'variants': [{'label': v.label, 'code': v.code, 'process': v.process} for v in variants]}
    sections = ('layers', 'bound', 'models', 'grid', 'dense') if args.section == 'all' else (args.section,)
    runners = {'layers': run_layers, 'bound': run_bound, 'models': run_models, 'grid': run_grid, 'dense': run_dense,
               'campaign': run_campaign, 'compile': run_compile}
    for section in sections:
        results[section] = runners[section](args, variants)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return run_profile(args)
    if args.old_rev:
        try:
            resolve_commit(args.old_rev)
        except ValueError as e:
            print(f'error: --old-rev: {e}', file=sys.stderr)
            return 2
    with git_worktree(args.old_rev) if args.old_rev else contextlib.nullcontext() as old:
        results = run(args, old)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'\nwrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
