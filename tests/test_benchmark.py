"""scripts/benchmark.py end to end at toy sizes: every case runs, goals are checked, JSON is written.

Timing goals themselves are never asserted in tests (a shared CI machine is no place for them); this checks
that the benchmark that measures them works and reports what it says it does.
"""
import json
from pathlib import Path

import pytest
import torch

from pce_timm.benchmark import FreeGathers, Timing, bound_verdict, layer_goals
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
    assert len(names) == 13
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
