"""Side-by-side CPU timing of PCE layers and models against their dense baselines.

Cases are timed interleaved (one run of each case per round, many rounds), so load that comes and goes on
the machine hits every case alike and the ratios stay meaningful; each number is the median over rounds.
Each PCE case is compared with the dense block of the same structure (``Case.ref``): a sparse layer with its
1x1 mix conv with Conv-BN-ReLU + 1x1 conv, without it with Conv-BN-ReLU, and soft routing over E experts
with E of those blocks.

:func:`time_variants` runs the cases in worker subprocesses, one per *variant*: a code tree (this one, or a
git worktree of an older revision, :func:`git_worktree`) and a process setting (plain: the allocator as a
user's process has it; glibc malloc tuning, ``PCE_TIMM_MALLOC_TUNING=1``; jemalloc through ``LD_PRELOAD``).
The parent asks the workers for one round each in turn, so old and new code, tuned and plain, share the same
machine noise. Nothing here changes the parent process: only a worker asked to tune does.

This module is the measuring instrument, and it is the same for every tree: :func:`git_worktree` copies it
(and :mod:`pce_timm.benchmark_models`) over the old tree's copy. So it imports from the package only what a
case needs (``PCEConv2d``, ``timm.create_model``), and only when the case is built.
"""
import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

ENV_SWITCH = 'PCE_TIMM_MALLOC_TUNING'  # the same switch as pce_timm.runtime's
HARNESS_FILES = ('benchmark.py', 'benchmark_models.py')  # copied into an old tree by git_worktree


@dataclass
class Case:
    """A module to time. ``ref`` weighs the cases whose time this one is divided by (default: the first case)."""
    name: str
    build: Callable[[], nn.Module]
    info: Dict[str, object] = field(default_factory=dict)
    ref: Dict[str, float] = field(default_factory=dict)


@dataclass
class Timing:
    name: str
    info: Dict[str, object]
    forward_ms: float
    train_ms: float
    forward_ratio: float = 1.0
    train_ratio: float = 1.0


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _run_forward(module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


def _run_train(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.float().pow(2).mean().backward()


class CaseTimer:
    """Builds every case once; each :meth:`round` times one forward (eval, no grad) and one training step
    (forward + backward, train mode) of every case, in order, and returns ``{name: (forward_ms, train_ms)}``."""

    def __init__(self, cases: List[Case], make_input: Callable[[], torch.Tensor]):
        self.cases = cases
        self.modules = [case.build() for case in cases]
        self.x = make_input()
        self.x_grad = self.x.clone().requires_grad_()

    def round(self) -> Dict[str, Tuple[float, float]]:
        times = {}
        for case, module in zip(self.cases, self.modules, strict=True):
            module.eval()
            t0 = time.perf_counter()
            _run_forward(module, self.x)
            t1 = time.perf_counter()
            module.train()
            _run_train(module, self.x_grad)
            t2 = time.perf_counter()
            times[case.name] = ((t1 - t0) * 1e3, (t2 - t1) * 1e3)
        return times


def summarize(
        cases: List[Case],
        info: Dict[str, Dict[str, object]],
        refs: Dict[str, Dict[str, float]],
        samples: Dict[str, List[Tuple[float, float]]],
) -> List[Timing]:
    """Medians over rounds, and each case's ratios to its reference (``Case.ref``, default: the first case)."""
    names = [case.name if isinstance(case, Case) else case for case in cases]
    medians = {name: (_median([s[0] for s in samples[name]]), _median([s[1] for s in samples[name]]))
               for name in names}
    timings = []
    for name in names:
        ref = refs.get(name) or {names[0]: 1.0}
        ref_forward = sum(weight * medians[other][0] for other, weight in ref.items())
        ref_train = sum(weight * medians[other][1] for other, weight in ref.items())
        forward_ms, train_ms = medians[name]
        timings.append(Timing(name, info[name], forward_ms, train_ms, forward_ms / ref_forward, train_ms / ref_train))
    return timings


def time_cases(
        cases: List[Case],
        make_input: Callable[[], torch.Tensor],
        rounds: int = 10,
        warmup: int = 2,
        desc: str = 'timing',
) -> List[Timing]:
    """Median forward and training-step time of each case, interleaved, in this process."""
    from .progress import progress_bar  # parent side only (see the module docstring)

    timer = CaseTimer(cases, make_input)
    samples = {case.name: [] for case in cases}
    for step in progress_bar(range(warmup + rounds), desc=desc, leave=False):
        times = timer.round()
        if step >= warmup:
            for name, sample in times.items():
                samples[name].append(sample)
    return summarize(cases, {c.name: c.info for c in cases}, {c.name: c.ref for c in cases}, samples)


def profile_case(case: Case, make_input: Callable[[], torch.Tensor], steps: int = 5, row_limit: int = 25) -> str:
    """torch.profiler table of ``steps`` training steps (forward + backward) of one case, by self CPU time.

    The profiler adds overhead to every op, so its times run higher than :func:`time_cases`; read it for where
    the time goes, not for how much there is.
    """
    from torch.profiler import ProfilerActivity, profile

    module = case.build().train()
    x = make_input().requires_grad_()
    for _ in range(2):
        _run_train(module, x)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            _run_train(module, x)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by='self_cpu_time_total', row_limit=row_limit, max_name_column_width=40, max_shapes_column_width=60)


# ---------------------------------------------------------------------------------------------------------------
# The cases

DENSE, DENSE_MIX = 'dense', 'dense + 1x1 conv'


def dense_conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


def dense_then_mix(in_chs: int, out_chs: int, kernel_size: int = 3) -> nn.Module:
    """Conv-BN-ReLU followed by the 1x1 conv that PCE's ``mix_conv`` adds: the dense block of that structure."""
    return nn.Sequential(dense_conv_bn_relu(in_chs, out_chs, kernel_size), nn.Conv2d(out_chs, out_chs, 1))


def dense_reference(num_experts: int, soft: bool, mix_conv: bool) -> Tuple[str, Dict[str, float]]:
    """The dense block of the same structure as a PCE layer: a label and the weights of the dense cases.

    Soft routing runs every expert on every patch and then one mix conv, so its block is E Conv-BN-ReLU plus
    one 1x1 conv; its ratio is given per expert (divided by E), as the goal "soft E=8 <= 1.1x of 8 dense"
    reads it. The 1x1 conv's own cost is measured as (dense + 1x1 conv) - dense.
    """
    if not soft:
        return (DENSE_MIX, {DENSE_MIX: 1.0}) if mix_conv else (DENSE, {DENSE: 1.0})
    if not mix_conv:
        return DENSE, {DENSE: 1.0}
    e = num_experts
    return f'({e} dense + 1x1) / {e}', {DENSE: (e - 1) / e, DENSE_MIX: 1 / e}


def layer_cases(
        channels: int = 64,
        patch_size: int = 8,
        kernel_size: int = 3,
        experts: tuple = (4, 8),
        mix_conv_variants: tuple = (True, False),
) -> List[Case]:
    """Dense Conv-BN-ReLU and dense + 1x1 conv first, then PCEConv2d soft / top-1 / top-2 / expert choice (k=1:
    each expert picks n / E patches of every image) per expert count."""
    from .layers import PCEConv2d

    cases = [
        Case(DENSE, lambda: dense_conv_bn_relu(channels, channels, kernel_size), {'E': 1, 'routing': 'dense'}),
        Case(DENSE_MIX, lambda: dense_then_mix(channels, channels, kernel_size),
             {'E': 1, 'routing': 'dense', 'mix_conv': True, 'vs': DENSE}, {DENSE: 1.0}),
    ]
    disciplines = ((None, 'token'), (1, 'token'), (2, 'token'))
    if 'choice' in inspect.signature(PCEConv2d.__init__).parameters:  # an --old-rev tree may predate it
        disciplines += ((1, 'expert'),)
    for num_experts in experts:
        for top_k, choice in disciplines:
            for mix_conv in mix_conv_variants:
                routing = 'expert-choice' if choice == 'expert' else 'soft' if top_k is None else f'top-{top_k}'
                name = f'pce E={num_experts} {routing}' + ('' if mix_conv else ' no-mix')
                vs, ref = dense_reference(num_experts, top_k is None, mix_conv)
                info = {'E': num_experts, 'routing': routing, 'mix_conv': mix_conv, 'vs': vs}

                def build(e=num_experts, k=top_k, mix=mix_conv, c=choice) -> nn.Module:
                    extra = {} if c == 'token' else {'choice': c}
                    return PCEConv2d(channels, channels, kernel_size, num_experts=e, patch_size=patch_size,
                                     top_k=k, mix_conv=mix, **extra)
                cases.append(Case(name, build, info, ref))
    return cases


def layer_goals(timings: List[Timing]) -> List[Dict[str, object]]:
    """The issue's layer goals, checked on measured ratios. Missing cases are reported, not passed.

    Each ratio is to the dense block of the same structure (:func:`dense_reference`); soft's is per expert,
    so its goal divides by the 8 experts.
    """
    by_name = {t.name: t for t in timings}
    goals = []

    def check(label: str, name: str, value_fn: Callable[[Timing], float], limit: float, target: Optional[float]):
        timing = by_name.get(name)
        value = value_fn(timing) if timing else float('nan')
        goals.append({'goal': label, 'case': name, 'value': round(value, 3), 'limit': limit, 'target': target,
                      'ok': bool(timing) and value <= limit})

    for suffix, block, soft_block in (('', 'dense + 1x1', '(8 dense + 1x1)'), (' no-mix', 'dense', '8 dense')):
        check(f'top-1 E=8 fwd+bwd / {block}', f'pce E=8 top-1{suffix}', lambda t: t.train_ratio, 1.25, 1.15)
        check(f'soft E=8 fwd+bwd / {soft_block}', f'pce E=8 soft{suffix}', lambda t: t.train_ratio / 8, 1.1, None)
    return goals


class _FreeGather(torch.autograd.Function):
    """Returns a stored tensor as the gather's output; the backward hands back stored zeros."""

    @staticmethod
    def forward(ctx, source, other_input, output, source_zeros, other_zeros):
        ctx.zeros = (source_zeros, other_zeros)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_out):
        source_zeros, other_zeros = ctx.zeros
        return source_zeros, other_zeros, None, None, None


class _StoredTensors:
    """Tensors made once per shape and reused, so a stand-in costs no allocation or fill per step."""

    def __init__(self):
        self._store: Dict[tuple, torch.Tensor] = {}

    def get(self, kind: str, like: torch.Tensor, make: Callable[[], torch.Tensor], *shape) -> torch.Tensor:
        key = (kind, like.dtype) + tuple(shape)
        if key not in self._store:
            self._store[key] = make()
        return self._store[key]


@contextlib.contextmanager
def free_gathers(store: _StoredTensors) -> Iterator[None]:
    """Within the block, the top-1 sparse path's two gathers cost nothing (and compute nothing).

    ``gather_windows`` returns stored random windows of the right shape and layout, and ``gather_rows_top1``
    stored random rows; their backwards return stored zeros. Everything else in the layer runs as usual
    (embedding, router, slot assignment, index maps, grouped conv, BatchNorm, ReLU, 1x1 mix), so a layer
    timed inside this block gives a lower bound for any implementation of the two gathers, fused kernels
    included. Only the training step is bounded so: eval takes the layer's exact path, which gathers by other
    means. A timing tool only: the layer's output is meaningless inside the block.
    """
    def windows(x, pixel_index, slot_of_assignment, geometry):
        s, wh, ww, e = pixel_index.shape
        c = x.shape[1]
        out = store.get('windows', x, lambda: torch.randn(s, wh, ww, e * c, dtype=x.dtype), s, wh, ww, e, c)
        x_zeros = store.get('zeros', x, lambda: torch.zeros_like(x), *x.shape)
        no_second = store.get('empty', x, lambda: x.new_zeros(0))
        return _FreeGather.apply(x, no_second, out.permute(0, 3, 1, 2), x_zeros, None)

    def rows_top1(source, index, inverse, token_weight, pixel_token):
        m, d = index.shape[0], source.shape[1]
        out = store.get('rows', source, lambda: torch.randn(m, d, dtype=source.dtype), m, d)
        source_zeros = store.get('zeros', source, lambda: torch.zeros_like(source), *source.shape)
        weight_zeros = store.get('zeros', token_weight, lambda: torch.zeros_like(token_weight), *token_weight.shape)
        return _FreeGather.apply(source, token_weight, out, source_zeros, weight_zeros)

    try:  # the module that calls the training gathers: the slot dispatch in this tree
        from .layers.dispatch import slots as pce_module
    except ImportError:  # an older tree timed by --old-rev, where PCEConv2d called them itself
        from .layers import pce as pce_module

    originals = pce_module.gather_windows, pce_module.gather_rows_top1
    pce_module.gather_windows, pce_module.gather_rows_top1 = windows, rows_top1
    try:
        yield
    finally:
        pce_module.gather_windows, pce_module.gather_rows_top1 = originals


class FreeGathers(nn.Module):
    """A top-1 PCEConv2d whose two gathers cost nothing (:func:`free_gathers`): a timing lower bound."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if layer.soft or layer.top_k != 1 or layer.capacity_factor < 1:
            raise ValueError('FreeGathers times the top-1 sparse path with capacity_factor >= 1 (no choice dropped); '
                             f'got a layer with {layer.extra_repr()}, capacity_factor={layer.capacity_factor}')
        self.layer = layer
        self._store = _StoredTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with free_gathers(self._store):
            return self.layer(x)


def bound_cases(channels: int = 64, patch_size: int = 8, kernel_size: int = 3, num_experts: int = 8) -> List[Case]:
    """Dense, dense + the 1x1 conv the PCE design adds, and top-1 PCE with its real and with free gathers.

    Each PCE case is divided by its dense block of the same structure (with the mix: dense + 1x1 conv).
    """
    from .layers import PCEConv2d

    def top1(mix: bool = True) -> PCEConv2d:
        return PCEConv2d(channels, channels, kernel_size, num_experts=num_experts, patch_size=patch_size, top_k=1,
                         mix_conv=mix)

    name = f'pce E={num_experts} top-1'
    with_mix, without = {'vs': DENSE_MIX}, {'vs': DENSE}
    return [
        Case(DENSE, lambda: dense_conv_bn_relu(channels, channels, kernel_size), {'vs': DENSE}),
        Case(DENSE_MIX, lambda: dense_then_mix(channels, channels, kernel_size), {'vs': DENSE}, {DENSE: 1.0}),
        Case(name, top1, with_mix, {DENSE_MIX: 1.0}),
        Case(f'{name}, free gathers', lambda: FreeGathers(top1()), with_mix, {DENSE_MIX: 1.0}),
        Case(f'{name} no-mix, free gathers', lambda: FreeGathers(top1(mix=False)), without, {DENSE: 1.0}),
    ]


def bound_verdict(timings: List[Timing], num_experts: int = 8, limit: float = 1.25) -> Dict[str, object]:
    """Whether faster gathers alone could bring top-1 under ``limit``: not if it misses with free gathers."""
    by_name = {t.name: t for t in timings}
    bound = by_name.get(f'pce E={num_experts} top-1, free gathers')
    value = bound.train_ratio if bound else float('nan')
    return {'case': f'pce E={num_experts} top-1, free gathers', 'value': round(value, 3), 'limit': limit,
            'reachable_by_faster_gathers': bool(bound) and value <= limit}


def timings_to_dict(timings: List[Timing]) -> List[Dict[str, object]]:
    return [asdict(t) for t in timings]


def format_table(timings: List[Timing], columns: List[str], forward: bool = True,
                 variants: Optional[Dict[str, List[Timing]]] = None) -> str:
    """Markdown table of timings; ``columns`` picks keys of ``Timing.info`` to show after the name.

    ``forward=False`` leaves out the forward (eval) columns and shows only the training step. With
    ``variants`` (``{label: timings}``, e.g. from :func:`time_variants`), each case gets one row per variant,
    labelled in a ``process`` column, and ``timings`` is ignored. ``x`` is time / the case's reference
    (lower is better).
    """
    labelled = [(label, {t.name: t for t in ts}) for label, ts in (variants or {None: timings}).items()]
    header = ['case'] + (['process'] if variants else []) + columns
    header += (['fwd ms', 'fwd x'] if forward else []) + ['fwd+bwd ms', 'fwd+bwd x']
    rows = []
    for name in labelled[0][1]:
        for label, by_name in labelled:
            if name not in by_name:  # a case another tree does not have
                continue
            t = by_name[name]
            cells = [t.name] + ([label] if variants else []) + [str(t.info.get(c, '')) for c in columns]
            if forward:
                cells += [f'{t.forward_ms:.1f}', f'{t.forward_ratio:.2f}']
            rows.append(cells + [f'{t.train_ms:.1f}', f'{t.train_ratio:.2f}'])
    from .utils import markdown_table  # parent side only (see the module docstring)
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Variants: code trees and process settings, each timed in its own worker subprocess

PROCESSES = {
    'plain': 'the allocator as a user process has it',
    'glibc tuned': f'{ENV_SWITCH}=1: glibc malloc keeps freed memory (pce_timm.runtime)',
    'jemalloc': 'jemalloc preloaded (LD_PRELOAD)',
}


@dataclass
class Variant:
    """One worker: the tree whose ``pce_timm`` it imports and how its process is set up (see :data:`PROCESSES`)."""
    code: str  # 'this tree' or a git revision
    root: Path
    process: str = 'plain'
    env: Dict[str, str] = field(default_factory=dict)  # added to the worker's environment

    @property
    def label(self) -> str:
        return self.process if self.code == THIS_TREE else f'{self.code}, {self.process}'


THIS_TREE = 'this tree'
ROOT = Path(__file__).resolve().parents[1]


def make_variants(tuned: bool = False, jemalloc: Optional[str] = None, old: Optional[Tuple[str, Path]] = None,
                  root: Path = ROOT) -> List[Variant]:
    """This tree in a plain process first (the figures the goals are read on), then the asked-for extras.

    ``jemalloc`` is the library to preload (a path, or a name the dynamic loader finds); ``old`` is
    ``(label, root)`` of an older tree (:func:`git_worktree`), timed with the same process settings.
    """
    processes = [('plain', {})]
    if tuned:
        processes.append(('glibc tuned', {ENV_SWITCH: '1'}))
    if jemalloc:
        processes.append(('jemalloc', {'LD_PRELOAD': jemalloc}))
    trees = [(THIS_TREE, root)] + ([old] if old else [])
    return [Variant(code, tree, process, env) for code, tree in trees for process, env in processes]


def find_jemalloc() -> Optional[str]:
    """Debian's libjemalloc2 (``apt-get install libjemalloc2``), or None."""
    import ctypes.util

    return ctypes.util.find_library('jemalloc')


class _Worker:
    """A subprocess that builds one section's cases from ``variant.root`` and times a round per request."""

    def __init__(self, variant: Variant, spec: Dict[str, object]):
        self.variant = variant
        env = dict(os.environ)
        env.pop(ENV_SWITCH, None)  # plain unless the variant says otherwise
        env.update(variant.env)
        env['PYTHONPATH'] = os.pathsep.join([str(variant.root)] + [p for p in [env.get('PYTHONPATH')] if p])
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'pce_timm.benchmark', '--worker', json.dumps(spec)], cwd=variant.root, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.meta = self._receive()

    def _receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f'benchmark worker for {self.variant.label!r} ({self.variant.root}) exited with '
                               f'{code} (its error is printed above)')
        return json.loads(line)

    def request(self, command: str) -> dict:
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()
        return self._receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.write('quit\n')
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class VariantTimings:
    variant: Variant
    meta: Dict[str, object]  # what the worker reports about its process: torch, threads, malloc_tuned, pce_timm
    timings: List[Timing]


def time_variants(spec: Dict[str, object], variants: List[Variant], rounds: int = 10, warmup: int = 2,
                  desc: str = 'timing') -> List[VariantTimings]:
    """Time one section (``spec``, see :func:`section_cases`) in one worker per variant, rounds interleaved.

    Every round asks each worker in turn (alternating the order) for one run of each of its cases, so
    machine noise hits every variant alike.
    """
    workers = []
    try:
        for variant in variants:
            workers.append(_Worker(variant, spec))
        samples = [{case['name']: [] for case in w.meta['cases']} for w in workers]
        order = list(range(len(workers)))
        from .progress import progress_bar  # parent side only (see the module docstring)

        for step in progress_bar(range(warmup + rounds), desc=desc, leave=False):
            for i in (order if step % 2 == 0 else order[::-1]):
                times = workers[i].request('round')
                if step >= warmup:
                    for name, sample in times.items():
                        samples[i][name].append(sample)
    finally:
        for worker in workers:
            worker.close()
    results = []
    for worker, variant_samples in zip(workers, samples, strict=True):
        cases = worker.meta['cases']
        timings = summarize([c['name'] for c in cases], {c['name']: c['info'] for c in cases},
                            {c['name']: c['ref'] for c in cases}, variant_samples)
        meta = {k: v for k, v in worker.meta.items() if k != 'cases'}
        results.append(VariantTimings(worker.variant, meta, timings))
    return results


def new_over_old(results: List[VariantTimings]) -> List[Dict[str, object]]:
    """For each case and process: this tree's time / the old tree's (below 1: the new code is faster)."""
    rows = []
    for new in (r for r in results if r.variant.code == THIS_TREE):
        for old in (r for r in results if r.variant.code != THIS_TREE and r.variant.process == new.variant.process):
            old_by_name = {t.name: t for t in old.timings}
            for t in new.timings:
                if t.name in old_by_name:
                    o = old_by_name[t.name]
                    rows.append({'case': t.name, 'process': new.variant.process, 'old': old.variant.code,
                                 'old_forward_ms': o.forward_ms, 'new_forward_ms': t.forward_ms,
                                 'old_train_ms': o.train_ms, 'new_train_ms': t.train_ms,
                                 'forward_new_over_old': t.forward_ms / o.forward_ms,
                                 'train_new_over_old': t.train_ms / o.train_ms})
    return rows


def format_new_over_old(rows: List[Dict[str, object]], forward: bool = True) -> str:
    header = ['case', 'process'] + (['old fwd ms', 'new fwd ms', 'fwd new/old'] if forward else [])
    header += ['old fwd+bwd ms', 'new fwd+bwd ms', 'fwd+bwd new/old']
    table = []
    for r in rows:
        cells = [r['case'], r['process']]
        if forward:
            cells += [f"{r['old_forward_ms']:.1f}", f"{r['new_forward_ms']:.1f}", f"{r['forward_new_over_old']:.2f}"]
        cells += [f"{r['old_train_ms']:.1f}", f"{r['new_train_ms']:.1f}", f"{r['train_new_over_old']:.2f}"]
        table.append(cells)
    from .utils import markdown_table  # parent side only (see the module docstring)
    return markdown_table(header, table)


def resolve_commit(rev: str, repo: Path = ROOT) -> str:
    """The commit ``rev`` names in the git repository at ``repo``; ValueError if it names none."""
    result = subprocess.run(['git', '-C', str(repo), 'rev-parse', '--verify', '--quiet', f'{rev}^{{commit}}'],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f'{rev!r} is not a commit of the git repository at {repo}')
    return result.stdout.strip()


@contextlib.contextmanager
def git_worktree(rev: str, repo: Path = ROOT) -> Iterator[Tuple[str, Path]]:
    """A temporary git worktree of ``rev`` with this benchmark harness copied in; yields (label, root).

    The harness is the measuring instrument, so both trees are timed by this copy of it (see the module
    docstring); everything else, the code under test, is the old tree's. The worktree is removed afterwards.
    """
    sha = resolve_commit(rev, repo)
    git = ['git', '-C', str(repo)]
    tmp = Path(tempfile.mkdtemp(prefix='pce-bench-old-'))
    tree = tmp / 'tree'
    subprocess.run(git + ['worktree', 'add', '--detach', str(tree), sha], check=True, capture_output=True)
    try:
        for name in HARNESS_FILES:
            shutil.copyfile(Path(__file__).with_name(name), tree / 'pce_timm' / name)
        yield f'{rev} ({sha[:10]})', tree
    finally:
        subprocess.run(git + ['worktree', 'remove', '--force', str(tree)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(git + ['worktree', 'prune'], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# The worker side

def section_cases(spec: Dict[str, object]) -> Tuple[List[Case], Callable[[], torch.Tensor]]:
    """The cases of one section and their input, from a JSON-able spec.

    ``spec``: ``section`` ('layers', 'bound', 'models', 'grid' or 'dense'); for layers and bound ``input_shape``
    (B, C, H, W), ``patch_size``, ``kernel_size``; for models and grid ``models`` (names), ``size``, ``batch_size``;
    for dense ``size``, ``batch_size``; for campaign ``sweep`` (a sweep config) and ``cells`` (names, the first is
    every other's reference).
    """
    section = spec['section']
    if section in ('layers', 'bound'):
        shape = tuple(spec['input_shape'])
        build = layer_cases if section == 'layers' else bound_cases
        return build(shape[1], spec['patch_size'], spec['kernel_size']), lambda: torch.randn(shape)
    if section == 'models':
        from .benchmark_models import model_cases

        size, batch = spec['size'], spec['batch_size']
        return model_cases(spec['models'], size, batch), lambda: torch.randn(batch, 3, size, size)
    if section == 'grid':
        from .benchmark_models import grid_cases

        size, batch = spec['size'], spec['batch_size']
        return grid_cases(spec['models'], size, batch), lambda: torch.randn(batch, 3, size, size)
    if section == 'dense':
        from .benchmark_dense import dense_cases

        size, batch = spec['size'], spec['batch_size']
        return dense_cases(size, batch), lambda: torch.rand(batch, 3, size, size)
    if section == 'campaign':
        from .benchmark_campaign import campaign_cases

        cases, shape = campaign_cases(spec['sweep'], spec['cells'])
        return cases, lambda: torch.randn(shape)
    raise ValueError(f"section must be 'layers', 'bound', 'models', 'grid', 'dense' or 'campaign', got {section!r}")


def _apply_process_setting() -> bool:
    """In a worker asked for glibc tuning (``PCE_TIMM_MALLOC_TUNING=1``), apply it; True if applied."""
    if os.environ.get(ENV_SWITCH) != '1':
        return False
    try:
        from .runtime import keep_freed_memory
    except ImportError:  # a tree without pce_timm.runtime
        return False
    return bool(keep_freed_memory())


def _jemalloc_loaded() -> bool:
    """Whether a jemalloc library is mapped into this process (so ``LD_PRELOAD`` took)."""
    try:
        return 'jemalloc' in Path('/proc/self/maps').read_text()
    except OSError:  # no procfs
        return False


def worker_main(spec: Dict[str, object]) -> int:
    """Serve :class:`_Worker`: one JSON line when the cases are built, then one per 'round' request."""
    protocol = os.fdopen(os.dup(1), 'w', buffering=1)
    os.dup2(2, 1)  # anything else printed, by Python or C, goes to stderr and leaves the protocol alone

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + '\n')

    malloc_tuned = _apply_process_setting()
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    torch.manual_seed(0)
    cases, make_input = section_cases(spec)
    timer = CaseTimer(cases, make_input)
    import pce_timm

    send({'cases': [{'name': c.name, 'info': c.info, 'ref': c.ref} for c in cases], 'torch': torch.__version__,
          'input_shape': list(timer.x.shape), 'threads': torch.get_num_threads(), 'malloc_tuned': malloc_tuned,
          'pce_timm': str(Path(pce_timm.__file__).parent), 'jemalloc_loaded': _jemalloc_loaded()})
    for line in sys.stdin:
        if line.strip() != 'round':
            break
        send(timer.round())
    return 0


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] != '--worker':
        sys.exit('usage: python -m pce_timm.benchmark --worker SPEC_JSON (scripts/benchmark.py starts workers)')
    from pce_timm.benchmark import worker_main as _worker_main  # the module proper, not this __main__ copy

    sys.exit(_worker_main(json.loads(sys.argv[2])))
