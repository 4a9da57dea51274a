"""scripts/benchmark.py end to end at toy sizes: every case runs, goals are checked, JSON is written.

Timing goals themselves are never asserted in tests (a shared CI machine is no place for them); this checks
that the benchmark that measures them works and reports what it says it does: plain worker processes by
default, the tuned / jemalloc rows and the old tree only when asked, ratios to the right dense block.
"""
import json
import platform
import subprocess
from pathlib import Path

import pytest
import torch

import pce_timm.runtime
from pce_timm.benchmark import (
    FreeGathers,
    Timing,
    bound_verdict,
    find_jemalloc,
    layer_cases,
    layer_goals,
    new_over_old,
    summarize,
)
from pce_timm.benchmark_models import model_goals, model_rows
from pce_timm.layers import PCEConv2d
from pce_timm.layers import gather as gather_module
from pce_timm.layers.dispatch import slots as pce_module
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]
TOY = ['--batch-size', '2', '--channels', '4', '--size', '16', '--patch-size', '4', '--rounds', '1']


def _benchmark_script():
    return load_module_from_path(ROOT / 'scripts' / 'benchmark.py', 'pce_benchmark_script')


def test_layer_benchmark_writes_every_case_and_goal(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    assert _benchmark_script().main(TOY + ['--json', str(out)]) == 0
    results = json.loads(out.read_text())
    names = [t['name'] for t in results['layers']['timings']]
    assert names[0] == 'dense' and 'pce E=8 top-1' in names and 'pce E=8 soft no-mix' in names
    assert names[1] == 'dense + 1x1 conv'  # the dense block of the structure of a layer with its mix conv
    assert len(names) == 18  # 2 dense + E in (4, 8) x (soft, top-1, top-2, expert-choice) x (mix, no-mix)
    assert all(t['forward_ms'] > 0 and t['train_ms'] > 0 for t in results['layers']['timings'])
    assert [g['case'] for g in results['layers']['goals']] == [
        'pce E=8 top-1', 'pce E=8 soft', 'pce E=8 top-1 no-mix', 'pce E=8 soft no-mix']
    assert '| dense |' in capsys.readouterr().out


def test_goals_compare_ratios_with_their_limits():
    timings = [Timing('dense', {}, 1.0, 10.0), Timing('pce E=8 top-1', {}, 2.0, 12.0, 2.0, 1.2),
               Timing('pce E=8 soft', {}, 9.0, 90.0, 9.0, 9.0)]
    goals = {g['case']: g for g in layer_goals(timings)}
    assert goals['pce E=8 top-1']['ok'] and goals['pce E=8 top-1']['value'] == 1.2
    assert not goals['pce E=8 soft']['ok'] and goals['pce E=8 soft']['value'] == 1.125  # 9 / 8 > 1.1
    assert not goals['pce E=8 top-1 no-mix']['ok']  # a case that was not measured is reported, not passed


def test_profile_runs_one_case_and_rejects_unknown_ones(capsys):
    script = _benchmark_script()
    assert script.main(TOY + ['--profile', 'pce E=4 top-1']) == 0
    assert 'aten::' in capsys.readouterr().out
    assert script.main(TOY + ['--profile', 'pce E=3 top-9']) == 2
    assert 'not a layer or bound case' in capsys.readouterr().err


def test_bound_section_times_free_gathers_next_to_dense(tmp_path, capsys):
    out = tmp_path / 'bound.json'
    assert _benchmark_script().main(TOY + ['--section', 'bound', '--json', str(out)]) == 0
    bound = json.loads(out.read_text())['bound']
    assert [t['name'] for t in bound['timings']] == [
        'dense', 'dense + 1x1 conv', 'pce E=8 top-1', 'pce E=8 top-1, free gathers',
        'pce E=8 top-1 no-mix, free gathers']
    assert bound['verdict']['case'] == 'pce E=8 top-1, free gathers'
    assert '[bound]' in capsys.readouterr().out


def test_bound_verdict_asks_whether_free_gathers_fit_the_limit():
    timings = [Timing('dense', {}, 1.0, 10.0), Timing('pce E=8 top-1, free gathers', {}, 1.0, 13.0, 1.0, 1.3)]
    assert not bound_verdict(timings)['reachable_by_faster_gathers']
    timings[1].train_ratio = 1.2
    assert bound_verdict(timings)['reachable_by_faster_gathers']
    assert not bound_verdict(timings[:1])['reachable_by_faster_gathers']  # not measured: not reachable


def test_free_gathers_skip_both_gathers_and_restore_them():
    torch.manual_seed(0)
    layer = PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1).train()
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    calls = []
    original = gather_module.gather_windows

    def counting(*args):
        calls.append(1)
        return original(*args)

    pce_module.gather_windows = counting  # the layer gathers through this module attribute
    try:
        layer(x).sum().backward()
        assert len(calls) == 1
        free = FreeGathers(layer)
        y = free(x)
        assert len(calls) == 1 and y.shape == (2, 4, 8, 8)  # the stand-in ran, not the gather
        y.sum().backward()
        assert pce_module.gather_windows is counting  # restored after the block
        with pytest.raises(ValueError, match='in_chs'):
            free(torch.randn(2, 5, 8, 8))
        assert pce_module.gather_windows is counting  # also restored when the layer raises inside the block
    finally:
        pce_module.gather_windows = original
    assert pce_module.gather_rows_top1 is gather_module.gather_rows_top1


def test_free_gathers_only_time_the_top1_path():
    with pytest.raises(ValueError, match='top-1 sparse path'):
        FreeGathers(PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=None))
    with pytest.raises(ValueError, match='capacity_factor'):
        FreeGathers(PCEConv2d(4, 4, num_experts=4, patch_size=4, top_k=1, capacity_factor=0.5))


BOUND = TOY + ['--section', 'bound']


def _run_json(tmp_path, argv) -> dict:
    out = tmp_path / 'bench.json'
    assert _benchmark_script().main(argv + ['--json', str(out)]) == 0
    return json.loads(out.read_text())


def test_each_pce_case_is_divided_by_the_dense_block_of_its_structure():
    refs = {c.name: (c.ref, c.info.get('vs')) for c in layer_cases(4, 4, 3)}
    assert refs['pce E=8 top-1'] == ({'dense + 1x1 conv': 1.0}, 'dense + 1x1 conv')
    assert refs['pce E=8 top-1 no-mix'] == ({'dense': 1.0}, 'dense')
    assert refs['pce E=8 soft'] == ({'dense': 7 / 8, 'dense + 1x1 conv': 1 / 8}, '(8 dense + 1x1) / 8')
    assert refs['pce E=8 soft no-mix'] == ({'dense': 1.0}, 'dense')
    # known answers: dense 10 ms, its 1x1 conv 2 ms more, so 8 dense + 1x1 = 82 ms
    samples = {'dense': [(1.0, 10.0), (9.0, 90.0), (1.0, 10.0)], 'dense + 1x1 conv': [(1.2, 12.0)],
               'pce E=8 top-1': [(1.8, 18.0)], 'pce E=8 soft': [(8.2, 82.0 * 1.05)]}
    cases = [c for c in layer_cases(4, 4, 3) if c.name in samples]
    timings = {t.name: t for t in summarize(cases, {c.name: c.info for c in cases}, {c.name: c.ref for c in cases},
                                            samples)}
    assert timings['dense'].train_ms == 10.0 and timings['dense'].train_ratio == 1.0  # the median, not the mean
    assert timings['pce E=8 top-1'].train_ratio == pytest.approx(1.5)  # 18 / 12, not 18 / 10
    goals = {g['case']: g for g in layer_goals(list(timings.values()))}
    assert goals['pce E=8 soft']['value'] == pytest.approx(1.05)  # 86.1 / (8 dense + 1x1)
    assert goals['pce E=8 top-1']['value'] == 1.5 and not goals['pce E=8 top-1']['ok']  # 1.5 > 1.25


def test_model_goals_ask_for_0_9x_training_and_0_95x_inference():
    rows = [{'model': 'pce_resnet18_e8', 'train_x': 0.89, 'infer_x': 0.96}]
    goals = model_goals(rows)
    assert [g['limit'] for g in goals] == [0.9, 0.95] and [g['ok'] for g in goals] == [False, True]
    timings = [Timing('resnet18', {'baseline': None, 'params_m': 1.0, 'gmacs': 1.0}, 100.0, 400.0),
               Timing('pce_resnet18_e8', {'baseline': 'resnet18', 'params_m': 2.0, 'gmacs': 1.0}, 125.0, 500.0,
                      1.25, 1.25)]
    row = model_rows(timings, batch_size=32)[1]
    assert row['infer_x'] == pytest.approx(0.8) and row['train_img_s'] == pytest.approx(64.0)


def test_default_run_leaves_every_allocator_alone(tmp_path, monkeypatch):
    def no_tuning(*args, **kwargs):
        raise AssertionError('the benchmark tuned the allocator of its own process')

    monkeypatch.setattr(pce_timm.runtime, 'keep_freed_memory', no_tuning)
    monkeypatch.setenv('PCE_TIMM_MALLOC_TUNING', '1')  # a worker is plain unless a variant asks
    results = _run_json(tmp_path, BOUND)
    assert [v['label'] for v in results['variants']] == ['plain']
    plain = results['bound']['variants']['plain']
    assert plain['malloc_tuned'] is False and plain['jemalloc_loaded'] is False
    assert plain['pce_timm'] == str(ROOT / 'pce_timm')
    assert results['bound']['new_over_old'] == []


def test_tuned_adds_a_second_row_per_case_from_a_tuned_worker(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pce_timm.runtime, 'keep_freed_memory', lambda *a, **k: pytest.fail('tuned the parent'))
    results = _run_json(tmp_path, BOUND + ['--tuned'])
    variants = results['bound']['variants']
    assert list(variants) == ['plain', 'glibc tuned']
    assert variants['plain']['malloc_tuned'] is False
    if platform.libc_ver()[0] == 'glibc':
        assert variants['glibc tuned']['malloc_tuned'] is True
    assert [t['name'] for t in variants['glibc tuned']['timings']] == [t['name'] for t in results['bound']['timings']]
    out = capsys.readouterr().out
    assert '| dense | plain |' in out and '| dense | glibc tuned |' in out


@pytest.mark.skipif(find_jemalloc() is None, reason='no libjemalloc (Debian: libjemalloc2)')
def test_jemalloc_row_runs_with_jemalloc_preloaded(tmp_path):
    variants = _run_json(tmp_path, BOUND + ['--jemalloc'])['bound']['variants']
    assert list(variants) == ['plain', 'jemalloc']
    assert variants['jemalloc']['jemalloc_loaded'] is True and variants['plain']['jemalloc_loaded'] is False


def _benchmark_worktrees() -> list:
    listing = subprocess.run(['git', '-C', str(ROOT), 'worktree', 'list'], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if 'pce-bench-old-' in line]


@pytest.mark.skipif(not (ROOT / '.git').exists(), reason='not a git checkout')
def test_old_rev_times_a_worktree_of_that_commit_and_removes_it(tmp_path, capsys):
    before = _benchmark_worktrees()
    results = _run_json(tmp_path, BOUND + ['--old-rev', 'HEAD'])
    sha = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout
    old_label = f'HEAD ({sha[:10]}), plain'
    variants = results['bound']['variants']
    assert list(variants) == ['plain', old_label]
    assert variants[old_label]['code'] == f'HEAD ({sha[:10]})'
    assert 'pce-bench-old-' in variants[old_label]['pce_timm']  # the old worker imported the worktree's code
    ratios = results['bound']['new_over_old']
    assert [r['case'] for r in ratios] == [t['name'] for t in results['bound']['timings']]
    assert all(r['train_new_over_old'] == pytest.approx(r['new_train_ms'] / r['old_train_ms']) for r in ratios)
    assert 'fwd+bwd new/old' in capsys.readouterr().out
    assert _benchmark_worktrees() == before and not Path(variants[old_label]['pce_timm']).exists()


def test_old_rev_that_names_no_commit_is_an_error(capsys):
    assert _benchmark_script().main(BOUND + ['--old-rev', 'no-such-rev-xyz']) == 2
    assert "'no-such-rev-xyz' is not a commit" in capsys.readouterr().err


def test_new_over_old_pairs_the_same_process_only():
    from pce_timm.benchmark import THIS_TREE, Variant, VariantTimings

    def result(code, process, ms):
        return VariantTimings(Variant(code, ROOT, process), {}, [Timing('dense', {}, ms, 2 * ms)])

    rows = new_over_old([result(THIS_TREE, 'plain', 1.0), result(THIS_TREE, 'glibc tuned', 3.0),
                         result('v1', 'plain', 2.0), result('v1', 'glibc tuned', 4.0)])
    assert [(r['process'], r['train_new_over_old']) for r in rows] == [('plain', 0.5), ('glibc tuned', 0.75)]


def test_campaign_section_times_the_cells_models_in_their_last_phase(tmp_path, capsys):
    from pce_timm.benchmark_campaign import cell_model

    winner, shape = cell_model(ROOT / 'scripts' / 'configs' / 'sweeps' / 'fmnist_factors.yaml',
                               'winners: soft + B + no attention')
    assert shape == (128, 1, 28, 28)  # the demo recipe's batch, Fashion-MNIST's images
    layers = [m for m in winner.modules() if isinstance(m, PCEConv2d)]
    assert layers and all(layer.routing_mode == 'router' and not layer.attn_enabled for layer in layers)
    base, _ = cell_model(ROOT / 'scripts' / 'configs' / 'sweeps' / 'fmnist_factors.yaml', 'pce base')
    assert all(m.attn_enabled for m in base.modules() if isinstance(m, PCEConv2d))  # its phase 3: attention on
    out = tmp_path / 'bench.json'
    cells = ['dense', 'control: dense widened to the params', 'pce base']
    assert _benchmark_script().main(['--section', 'campaign', '--campaign-cells', *cells, '--campaign-rounds', '1',
                                     '--threads', '1', '--json', str(out)]) == 0
    rows = json.loads(out.read_text())['campaign']['rows']
    assert [r['model'] for r in rows] == cells and rows[0]['train_x'] == 1.0
    assert rows[1]['params_m'] == pytest.approx(0.945015) and rows[2]['baseline'] == 'dense'
    assert "x = throughput / 'dense'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="starts from another cell's runs"):
        cell_model(ROOT / 'scripts' / 'configs' / 'sweeps' / 'fmnist_factors.yaml', 'upcycled from dense')
    with pytest.raises(ValueError, match="has no cell 'nope'"):
        cell_model(ROOT / 'scripts' / 'configs' / 'sweeps' / 'fmnist_factors.yaml', 'nope')
