"""scripts/benchmark.py --section compile: fresh worker processes, first-call time, compiled vs eager rows.

Timings are never asserted; these check that the section measures what it says (graphs and graph breaks per
model, ratios to resnet18's row of the same mode) at toy sizes with Dynamo's eager backend; the worker
subprocess and inductor runs are slow tests.
"""
import json
from pathlib import Path

import pytest

from pce_timm import benchmark_compile
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_script():
    return load_module_from_path(ROOT / 'scripts' / 'benchmark.py', 'pce_benchmark_script')


def test_measure_counts_graphs_and_breaks():
    row = benchmark_compile.measure('resnet18', 'eval', 32, 1, 1, threads=1, backend='eager')
    assert row['graphs'] == 1 and row['graph_breaks'] == 0
    assert row['first_call_s'] > 0 and row['eager_ms'] > 0 and row['compiled_ms'] > 0
    with pytest.raises(ValueError, match='mode must be one of'):
        benchmark_compile.measure('resnet18', 'infer', 32, 1, 1)


def test_rows_divide_first_calls_by_resnet18s_of_the_same_mode(monkeypatch):
    first = {('resnet18', 'eval'): 2.0, ('pce_resnet18', 'eval'): 5.0, ('resnet18', 'train'): 4.0,
             ('pce_resnet18', 'train'): 6.0}

    def fake_worker(name, mode, size, batch_size, rounds, threads=None, backend='inductor'):
        return {'model': name, 'mode': mode, 'threads': 1, 'first_call_s': first[name, mode], 'eager_ms': 10.0,
                'compiled_ms': 8.0, 'graphs': 1, 'graph_breaks': 0}

    monkeypatch.setattr(benchmark_compile, 'run_worker', fake_worker)
    rows = benchmark_compile.compile_rows(['resnet18', 'pce_resnet18'], ['eval', 'train'], 32, 1, 1)
    assert [(r['model'], r['mode'], r['first_call_x']) for r in rows] == [
        ('resnet18', 'eval', 1.0), ('pce_resnet18', 'eval', 2.5), ('resnet18', 'train', 1.0),
        ('pce_resnet18', 'train', 1.5)]
    assert all(r['speedup'] == 1.25 for r in rows)
    table = benchmark_compile.format_compile_table(rows)
    assert '| pce_resnet18 | eval | 5.0 | 2.50 | 10.0 | 8.0 | 1.25 | 1 | 0 |' in table
    alone = benchmark_compile.compile_rows(['pce_resnet18'], ['eval'], 32, 1, 1)
    assert alone[0]['first_call_x'] is None and '| pce_resnet18 | eval | 5.0 |  |' in \
        benchmark_compile.format_compile_table(alone)


@pytest.mark.slow  # a fresh worker process imports timm and traces a model: ~20-45 s on a shared 2-core machine
def test_compile_section_runs_each_model_in_a_fresh_worker(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    argv = ['--section', 'compile', '--compile-models', 'resnet18', '--compile-img-size', '32',
            '--compile-batch-size', '1', '--compile-rounds', '1', '--compile-backend', 'eager', '--threads', '1',
            '--json', str(out)]
    assert _benchmark_script().main(argv) == 0
    rows = json.loads(out.read_text())['compile']['rows']
    assert [(r['model'], r['mode'], r['size'], r['graphs'], r['graph_breaks']) for r in rows] == [
        ('resnet18', 'eval', 32, 1, 0)]
    assert '| resnet18 | eval |' in capsys.readouterr().out


def test_compile_section_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        _benchmark_script().parse_args(['--section', 'compile', '--compile-img-size', '0'])
    assert '--compile-img-size must be >= 1' in capsys.readouterr().err


@pytest.mark.slow
def test_compile_section_with_inductor():
    rows = benchmark_compile.compile_rows(['resnet18', 'pce_resnet18'], ['eval'], 32, 1, 1, threads=1)
    assert [(r['graphs'], r['graph_breaks']) for r in rows] == [(1, 0), (1, 0)] and rows[1]['first_call_x'] > 0
