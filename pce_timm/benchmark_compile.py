"""Compile section of ``scripts/benchmark.py``: what ``torch.compile`` costs and buys, model by model.

Every (model, mode) runs in a fresh plain subprocess that does what a user's script does: build the model,
``torch.compile`` it (default mode, inductor) and call it. Each worker gets an empty inductor cache directory,
so the first call pays the whole compile, as a user's first run does (later runs of the same script reuse
inductor's on-disk caches and start faster). Then eager and compiled calls are timed in interleaved rounds
(median). ``eval`` is a forward in eval mode under ``torch.no_grad``; ``train`` one training step (forward +
backward of the mean logit, train mode). The workers run one after another; timing in parallel would share
the cores.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEFAULT_MODELS = ('resnet18', 'pce_resnet18', 'pce_resnet18_e8')
MODES = ('eval', 'train')
ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, mode: str, size: int, batch_size: int, rounds: int, threads: Optional[int] = None,
            backend: str = 'inductor') -> dict:
    """In this process: the first compiled call, then eager and compiled calls in interleaved rounds."""
    import timm
    import torch
    from torch._dynamo.utils import counters

    import pce_timm  # noqa: F401  (registers the pce_* models)

    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(name).train(mode == 'train')
    x = torch.randn(batch_size, 3, size, size)

    def call(module) -> None:
        if mode == 'eval':
            with torch.no_grad():
                module(x)
        else:
            module(x).float().mean().backward()

    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    call(compiled)
    first_s = time.perf_counter() - start
    times: Dict[str, List[float]] = {'eager': [], 'compiled': []}
    call(model)  # eager warm-up (plan caches, allocator)
    call(compiled)
    for _ in range(rounds):
        for label, module in (('eager', model), ('compiled', compiled)):
            start = time.perf_counter()
            call(module)
            times[label].append((time.perf_counter() - start) * 1e3)
    median = {label: sorted(values)[len(values) // 2] for label, values in times.items()}
    return {'model': name, 'mode': mode, 'size': size, 'batch_size': batch_size, 'threads': torch.get_num_threads(),
            'first_call_s': first_s, 'eager_ms': median['eager'], 'compiled_ms': median['compiled'],
            'graphs': counters['stats'].get('unique_graphs', 0),
            'graph_breaks': sum(counters['graph_break'].values())}


def run_worker(name: str, mode: str, size: int, batch_size: int, rounds: int, threads: Optional[int] = None,
               backend: str = 'inductor', timeout: Optional[float] = None) -> dict:
    """:func:`measure` in a fresh plain subprocess with an empty inductor cache; its result as a dict."""
    spec = {'name': name, 'mode': mode, 'size': size, 'batch_size': batch_size, 'rounds': rounds, 'threads': threads,
            'backend': backend}
    with tempfile.TemporaryDirectory(prefix='pce_compile_') as cache:
        env = dict(os.environ)
        env['TORCHINDUCTOR_CACHE_DIR'] = cache  # a cold compile, as a user's first run
        env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
        proc = subprocess.run([sys.executable, '-m', 'pce_timm.benchmark_compile', json.dumps(spec)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f'compile worker for {name} ({mode}) failed (exit {proc.returncode}):\n'
                           f'{proc.stderr[-3000:]}')
    return json.loads(lines[-1])


def compile_rows(models: Sequence[str], modes: Sequence[str], size: int, batch_size: int, rounds: int,
                 threads: Optional[int] = None, progress=None, backend: str = 'inductor') -> List[dict]:
    """One row per (model, mode), each from its own worker; ``first_call_x`` divides by resnet18's first call in
    the same mode (None when resnet18 was not timed), ``speedup`` is eager ms / compiled ms."""
    rows = []
    for mode in modes:
        for name in models:
            rows.append(run_worker(name, mode, size, batch_size, rounds, threads, backend))
            if progress is not None:
                progress.update(1)
    for row in rows:
        base = next((r for r in rows if r['model'] == 'resnet18' and r['mode'] == row['mode']), None)
        row['first_call_x'] = row['first_call_s'] / base['first_call_s'] if base else None
        row['speedup'] = row['eager_ms'] / row['compiled_ms']
    return rows


def format_compile_table(rows: List[dict]) -> str:
    from .utils import markdown_table

    header = ['model', 'mode', 'first call s', 'x resnet18', 'eager ms', 'compiled ms', 'compiled speed-up',
              'graphs', 'graph breaks']
    table = [[r['model'], r['mode'], f"{r['first_call_s']:.1f}",
              '' if r['first_call_x'] is None else f"{r['first_call_x']:.2f}", f"{r['eager_ms']:.1f}",
              f"{r['compiled_ms']:.1f}", f"{r['speedup']:.2f}", str(r['graphs']), str(r['graph_breaks'])]
             for r in rows]
    return markdown_table(header, table, align='<<>>>>>>>')


if __name__ == '__main__':
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
