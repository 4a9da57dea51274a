"""scripts/dense_seeds.py: several seeds of dense-task runs side by side (the folders written by hand here, as
train_segmentation.py and evaluate_dense.py write them)."""
import json
from pathlib import Path

import pytest

from pce_timm.tasks.seeds import format_seed_table, seed_summary
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, seed: int, val: float, test: float, routing: bool = True, status: str = 'completed') -> Path:
    folder.mkdir(parents=True)
    summary = {'mean_usage_entropy': 0.99, 'max_imbalance': 1.0 + seed, 'dead_experts': seed % 2} if routing else None
    (folder / 'results.json').write_text(json.dumps({
        'status': status, 'task': 'segmentation', 'eval_split': 'val', 'miou': val, 'wall_time_s': 100.0 + seed,
        'num_params': 1234, 'routing_summary': summary, 'config': {'seed': seed}}))
    (folder / 'eval_test.json').write_text(json.dumps({'split': 'test', 'miou': test}))
    return folder


def test_seed_summary_gives_mean_and_std_per_group_on_both_splits(tmp_path, capsys):
    pce = [_run(tmp_path / f'pce-s{s}', s, 0.1 + s / 10, 0.2 + s / 10) for s in range(3)]
    dense = [_run(tmp_path / f'dense-s{s}', s, 0.5, 0.4 + s / 100, routing=False) for s in range(2)]
    summary = seed_summary({'PCE': pce, 'dense': dense})
    g = summary['groups']['PCE']
    assert g['select_miou']['mean'] == pytest.approx(0.2) and g['select_miou']['std'] == pytest.approx(0.1)
    assert g['report_miou']['values'] == pytest.approx([0.2, 0.3, 0.4]) and g['seeds'] == [0, 1, 2]
    assert g['imbalance']['mean'] == pytest.approx(2.0) and g['dead_experts'] == 1
    assert 'imbalance' not in summary['groups']['dense']
    table = format_seed_table(summary)
    assert '| PCE | 3 | 0.2000 ± 0.1000 | 0.3000 ± 0.1000 | 1,234 | 101 ± 1 | 2.00 ± 1.00 |' in table
    assert '| dense | 2 | 0.5000 ± 0.0000 | 0.4050 ± 0.0071 |' in table and 'miou (val) | miou (test)' in table
    out = tmp_path / 'seeds.json'
    script = load_module_from_path(ROOT / 'scripts' / 'dense_seeds.py', 'pce_dense_seeds_script')
    assert script.main(['--group', 'PCE', *map(str, pce), '--json', str(out)]) == 0
    assert json.loads(out.read_text())['groups']['PCE']['report_miou']['mean'] == pytest.approx(0.3)
    assert script.main(['--group', 'PCE', str(pce[0]), '--report-split', 'val']) == 2  # no eval_val.json
    assert 'evaluate_dense.py' in capsys.readouterr().err


def test_seed_summary_rejects_unfinished_runs_and_repeated_seeds(tmp_path):
    a, b = _run(tmp_path / 'a', 0, 0.1, 0.1), _run(tmp_path / 'b', 0, 0.2, 0.2)
    with pytest.raises(ValueError, match='runs share a seed'):
        seed_summary({'PCE': [a, b]})
    with pytest.raises(ValueError, match='--resume'):
        seed_summary({'PCE': [_run(tmp_path / 'c', 1, 0.1, 0.1, status='running')]})
    with pytest.raises(FileNotFoundError, match='not a finished'):
        seed_summary({'PCE': [tmp_path / 'missing']})
