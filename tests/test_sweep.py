"""scripts/sweep.py / pce_timm.sweep: the grid runner (resume, selection on validation, summary)."""
import json
import statistics
from pathlib import Path

import pytest
import yaml

from pce_timm.sweep import (
    SweepConfigError,
    SweepError,
    _repo_path,
    format_summary,
    load_sweep_config,
    run_sweep,
    select,
)
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]
sweep_cli = load_module_from_path(ROOT / 'scripts' / 'sweep.py', 'pce_sweep_cli')

# (val top-1, test top-1) per cell and seed: 'pce wide' wins on test, 'pce' on validation
NUMBERS = {
    'dense': {0: (90.0, 89.0), 1: (90.4, 89.6)},
    'pce': {0: (91.0, 89.2), 1: (91.2, 89.4)},
    'pce wide': {0: (90.6, 92.0), 1: (90.8, 92.2)},
}


def _write_config(tmp_path: Path, **changes) -> Path:
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump({'model': 'pce_resnet18', 'dataset': 'digits', 'epochs': 1}))
    config = {'recipe': 'recipe.yaml', 'seeds': [0, 1], 'options': {'max_train_samples': 64},
              'cells': [{'name': 'dense', 'kind': 'dense', 'options': {'pce_stages': []}}, {'name': 'pce'},
                        {'name': 'pce wide', 'options': {'num_experts': 8}}]}
    config.update(changes)
    path = tmp_path / 'sweep.yaml'
    path.write_text(yaml.safe_dump(config))
    return path


class FakeRunner:
    """Stands in for the train.py / evaluate.py subprocesses: writes what they would write."""

    def __init__(self):
        self.calls = []

    def __call__(self, command, log):
        script = Path(command[1]).name
        self.calls.append(command)
        if script == 'train.py':
            out = Path(command[command.index('--output-dir') + 1])
            recipe = yaml.safe_load(Path(command[command.index('--config') + 1]).read_text())
            cell = out.parent.name.replace('_', ' ')
            val, _ = NUMBERS[cell][recipe['seed']]
            out.mkdir(parents=True, exist_ok=True)
            (out / 'results.json').write_text(json.dumps({
                'status': 'completed', 'dataset': 'digits', 'eval_split': 'train-holdout', 'top1': val,
                'wall_time_s': 10.0 if cell == 'dense' else 12.0, 'num_params': 1000,
                'routing_summary': {'max_imbalance': None if cell == 'dense' else 1.5}, 'recipe': recipe}))
        else:
            out = Path(command[command.index('--model') + 1])
            seed = int(out.name.split('_')[1])
            _, test = NUMBERS[out.parent.name.replace('_', ' ')][seed]
            (out / 'eval-digits-test.json').write_text(json.dumps({'dataset': 'digits', 'split': 'test', 'top1': test}))
        return 0


def test_sweep_selects_on_validation_reports_test_and_resumes(tmp_path):
    cfg = load_sweep_config(_write_config(tmp_path))
    runner = FakeRunner()
    summary = run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False)
    assert len(runner.calls) == 12  # 3 cells x 2 seeds x (train + test evaluation)
    recipe = yaml.safe_load((tmp_path / 'out' / 'runs' / 'pce_wide' / 'seed_1.yaml').read_text())
    assert recipe['seed'] == 1 and recipe['num_experts'] == 8 and recipe['val_fraction'] == 0.1
    assert recipe['max_train_samples'] == 64 and recipe['model'] == 'pce_resnet18'

    cells = {c['name']: c for c in summary['cells']}
    for name, numbers in NUMBERS.items():
        cell = cells[name]
        assert cell['seeds'] == [0, 1]
        assert cell['values'] == [numbers[0][1], numbers[1][1]] and cell['val_values'] == [numbers[0][0], numbers[1][0]]
        assert cell['mean'] == pytest.approx(statistics.fmean(cell['values']))
        assert cell['std'] == pytest.approx(statistics.stdev(cell['values']))
    assert cells['pce']['imbalance'] == 1.5 and cells['dense']['imbalance'] is None
    selection = summary['selection']
    assert selection['selected'] == 'pce' and selection['baseline'] == 'dense'  # validation, not test, decides
    assert selection['test_gain'] == pytest.approx(89.3 - 89.3) and selection['time_ratio'] == pytest.approx(1.2)
    assert selection['goal_met'] is False and selection['best_val']['name'] == 'pce'
    assert json.loads((tmp_path / 'out' / 'summary.json').read_text()) == json.loads(json.dumps(summary))
    assert summary['config'] == str(tmp_path / 'sweep.yaml')  # outside the repository: as given
    assert _repo_path(ROOT / 'scripts' / 'configs' / 'demo_fmnist.yaml') == 'scripts/configs/demo_fmnist.yaml'
    table = (tmp_path / 'out' / 'summary.md').read_text()
    assert '| pce wide | pce | 2 | 90.70 ± 0.14 | 92.10 ± 0.14 | +2.80 | 12 (1.20x) |' in table
    assert 'within 1.25x the dense train time: **pce**' in table and 'not met' in table
    assert (tmp_path / 'out' / 'summary.png').stat().st_size > 10_000

    run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False)
    assert len(runner.calls) == 12  # finished runs are never rerun
    (tmp_path / 'out' / 'runs' / 'pce' / 'seed_0' / 'eval-digits-test.json').unlink()
    interrupted = tmp_path / 'out' / 'runs' / 'dense' / 'seed_1'
    (interrupted / 'results.json').unlink()
    (interrupted / 'checkpoints').mkdir()
    run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False)
    new = [Path(c[1]).name for c in runner.calls[12:]]
    assert sorted(new) == ['evaluate.py', 'train.py']  # the interrupted run's evaluation already exists
    train_call = next(c for c in runner.calls[12:] if Path(c[1]).name == 'train.py')
    assert train_call[-2:] == ['--resume', 'auto'] and str(interrupted) in train_call


def test_a_cell_starts_from_another_cells_run_of_the_same_seed(tmp_path):
    cells = [{'name': 'dense', 'kind': 'dense', 'options': {'pce_stages': []}},
             {'name': 'upcycled', 'options': {'model': '{runs}/dense/seed_{seed}', 'pce_stages': [1, 2]}}]
    runner = FakeRunner()
    NUMBERS['upcycled'] = NUMBERS['pce']
    try:
        summary = run_sweep(load_sweep_config(_write_config(tmp_path, cells=cells)), tmp_path / 'out', runner=runner,
                            progress=False)
    finally:
        del NUMBERS['upcycled']
    dense, upcycled = summary['cells']
    assert dense['starts_from'] is None and dense['total_train_time_s'] == dense['train_time_s'] == 10.0
    # the upcycled runs cost the dense runs too: the goal's time ratio counts both
    assert upcycled['starts_from'] == 'dense' and upcycled['total_train_time_s'] == 10.0 + 12.0
    # ... so no PCE cell is within the goal's 1.25x: none is selected, the best on validation is still named
    selection = summary['selection']
    assert selection['selected'] is None and selection['goal_met'] is False and '1.25x' in selection['reason']
    assert selection['best_val']['name'] == 'upcycled' and selection['best_val']['time_ratio'] == pytest.approx(2.2)
    assert '| upcycled | pce | 2 |' in (tmp_path / 'out' / 'summary.md').read_text()
    assert '| 10 + 12 (2.20x) |' in (tmp_path / 'out' / 'summary.md').read_text()
    runs = (tmp_path / 'out' / 'runs').resolve()
    for seed in (0, 1):
        recipe = yaml.safe_load((runs / 'upcycled' / f'seed_{seed}.yaml').read_text())
        assert recipe['model'] == str(runs / 'dense' / f'seed_{seed}') and recipe['pce_stages'] == [1, 2]
    trained = [c[c.index('--output-dir') + 1] for c in runner.calls if Path(c[1]).name == 'train.py']
    assert trained.index(str(runs / 'dense' / 'seed_1')) < trained.index(str(runs / 'upcycled' / 'seed_0'))


def test_only_the_named_cells_run_and_the_summary_covers_all_finished(tmp_path):
    cfg = load_sweep_config(_write_config(tmp_path))
    runner = FakeRunner()
    summary = run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False, only=['pce wide'])
    trained = {Path(c[c.index('--output-dir') + 1]).parent.name for c in runner.calls if '--output-dir' in c}
    assert trained == {'pce_wide'}
    assert [c['seeds'] for c in summary['cells']] == [[], [], [0, 1]]
    summary = run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False, only=['dense', 'pce'])
    assert len(runner.calls) == 12 and all(c['seeds'] == [0, 1] for c in summary['cells'])
    with pytest.raises(SweepConfigError, match=r"no cells named \['pce_wide'\]"):
        run_sweep(cfg, tmp_path / 'out', runner=runner, progress=False, only=['pce_wide'])


def test_a_failed_run_stops_the_sweep_naming_its_log(tmp_path, capsys):
    config = _write_config(tmp_path)

    def failing(command, log):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text('loading...\nerror: dataset: not found\n')
        return 3

    pattern = r'(?s)training dense seed 0 failed \(exit code 3\).*error: dataset: not found'
    with pytest.raises(SweepError, match=pattern):
        run_sweep(load_sweep_config(config), tmp_path / 'out', runner=failing, progress=False)


@pytest.mark.parametrize('changes, message', [
    ({'seeds': [0, 0]}, 'seeds must be a list of distinct integers'),
    ({'recipe': 'missing.yaml'}, "recipe 'missing.yaml' not found"),
    ({'cells': [{'name': 'a b'}, {'name': 'a_b'}]}, 'cell names must differ'),
    ({'cells': [{'name': 'x', 'kind': 'moe'}]}, 'kind must be pce or dense'),
    ({'val_fraction': 0.9}, r'val_fraction must be in \(0, 0.5\]'),
    ({'grid': {}}, r"unknown keys \['grid'\]"),
    ({'cells': [{'name': 'up', 'options': {'model': '{runs}/dense/seed_{sed}'}}]}, r'not a valid template.*sed'),
    ({'options': {'model': '{runs}/{sed}'}}, r'options: option model.*not a valid template.*sed'),
])
def test_bad_sweep_configs_are_clear_errors(tmp_path, changes, message, capsys):
    path = _write_config(tmp_path, **changes)
    with pytest.raises(SweepConfigError, match=message):
        load_sweep_config(path)
    assert sweep_cli.main(['--config', str(path), '--output-dir', str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.startswith('error: ')


@pytest.mark.slow
def test_a_real_toy_sweep_end_to_end(tmp_path):
    """Two cells x two seeds of real scripts/train.py + evaluate.py runs on sklearn digits (~2 min on 2 cores)."""
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump({
        'model': 'pce_resnet18', 'dataset': 'digits', 'stem_type': 'cifar', 'pce_stages': [1], 'patch_size': 2,
        'num_experts': 2, 'top_k': 1, 'model_kwargs': {'channels': [8, 16, 32, 64], 'stem_width': 8}, 'epochs': 1,
        'batch_size': 32, 'no_aug': True, 'max_train_samples': 128, 'log_with': ['csv'], 'key_init_batches': 1}))
    config = tmp_path / 'sweep.yaml'
    config.write_text(yaml.safe_dump({'recipe': 'recipe.yaml', 'seeds': [0, 1], 'test': {'batch_size': 256},
                                      'cells': [{'name': 'dense', 'kind': 'dense', 'options': {'pce_stages': []}},
                                                {'name': 'pce'}]}))
    assert sweep_cli.main(['--config', str(config), '--output-dir', str(tmp_path / 'out'), '--no-progress']) == 0
    summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
    for cell in summary['cells']:
        assert cell['seeds'] == [0, 1] and len(cell['values']) == 2 and cell['gmacs'] > 0
    selection = summary['selection']
    assert selection['baseline'] == 'dense' and selection['best_val']['name'] == 'pce'
    assert selection['selected'] == ('pce' if selection['best_val']['time_ratio'] <= 1.25 else None)


def test_selection_keeps_to_the_time_budget_and_names_the_best_at_any_cost():
    def cell(name, kind, val, test, time):
        return {'name': name, 'kind': kind, 'seeds': [0], 'val_mean': val, 'mean': test, 'train_time_s': time,
                'total_train_time_s': time}

    cells = [cell('dense', 'dense', 85.0, 84.0, 100.0), cell('big', 'pce', 87.0, 86.0, 200.0),
             cell('small', 'pce', 85.5, 84.5, 110.0), cell('cheap', 'pce', 85.2, 85.9, 90.0)]
    s = select(cells)
    assert s['selected'] == 'small' and s['time_ratio'] == pytest.approx(1.1)  # validation decides, not test
    assert s['test_gain'] == pytest.approx(0.5) and s['goal_met'] is True
    assert s['best_val'] == {'name': 'big', 'val_mean': 87.0, 'test_mean': 86.0, 'test_gain': pytest.approx(2.0),
                             'time_ratio': pytest.approx(2.0)}
    summary = {'cells': [dict(c, std=None, val_std=None, params=None, gmacs=None, imbalance=None, starts_from=None)
                         for c in cells], 'selection': s, 'test_split': 'test', 'val_fraction': 0.1}
    text = format_summary(summary)
    assert '**small**' in text and 'goal (test top-1 >= dense + 0.3 points at <= 1.25x its train time) met' in text
    assert 'Best on validation at any cost: big (val 87.00, test 86.00, 2.00x the dense train time).' in text
