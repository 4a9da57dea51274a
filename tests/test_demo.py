"""scripts/demo.py + pce_timm.demo: a tiny end-to-end demo (2 rows, routing.png), the output-folder guard, data hint.

The end-to-end test trains both demo models (widths 8..64) for 2 epochs on 256 Fashion-MNIST images and
evaluates on 200, with one torch thread; it needs the Debian package dataset-fashion-mnist and is skipped
without it.
"""
import json
from pathlib import Path

import pytest

from pce_timm import demo as demo_lib
from pce_timm.data import DatasetNotFoundError, load_image_dataset
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
ROW_KEYS = {'name', 'kind', 'model', 'pce_stages', 'pce_layers', 'top1', 'top5', 'num_params', 'train_time_s',
            'mean_usage_entropy', 'max_imbalance', 'dead_experts', 'routing', 'model_dir'}
TINY = ['--max-train-samples', '256', '--epochs', '2', '--max-eval-samples', '200', '--batch-size', '64',
        '--model-kwargs', 'channels=[8, 16, 32, 64]', '--key-init-batches', '1',
        '--progress', 'false', '--num-images', '3']


def _load_demo():
    return load_module_from_path(ROOT / 'scripts' / 'demo.py', 'pce_demo_script')


demo = _load_demo()


def _has_fashion_mnist() -> bool:
    try:
        load_image_dataset('fashion_mnist', 'test')
    except DatasetNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(not _has_fashion_mnist(), reason='Fashion-MNIST missing '
                                  '(apt-get install dataset-fashion-mnist)')


pytestmark = pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py


@needs_fmnist
def test_tiny_demo_writes_two_rows_and_the_routing_png(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert demo.main(['--output-dir', str(out), *TINY]) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / 'results.json').read_text())
    rows = results['rows']
    assert [row['kind'] for row in rows] == ['pce', 'dense']
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert 0 <= row['top1'] <= 100 and row['top1'] <= row['top5'] <= 100
        assert row['num_params'] > 0 and row['train_time_s'] > 0
        assert (out / row['model_dir'] / 'config.json').is_file()
    pce, dense = rows
    assert pce['pce_layers'] == 4 and pce['pce_stages'] == [1, 2] and 0 < pce['mean_usage_entropy'] <= 1
    assert dense['pce_layers'] == 0 and dense['pce_stages'] == [] and dense['mean_usage_entropy'] is None
    assert pce['num_params'] > dense['num_params']  # same widths, plus experts and routers
    assert results['rows'][0]['routing'].keys() == {'layer2.0.conv1', 'layer2.1.conv1', 'layer3.0.conv1',
                                                    'layer3.1.conv1'}

    png = out / 'routing.png'
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == PNG_MAGIC
    assert (out / 'table.txt').read_text().strip() in printed
    assert str(png) in printed and 'test top-1' in printed


def test_refuses_a_non_empty_output_dir_without_overwrite(tmp_path, capsys):
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'results.json').write_text('{"rows": []}')
    assert demo.main(['--output-dir', str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert 'already holds a completed demo' in err and '--overwrite' in err
    assert (out / 'results.json').read_text() == '{"rows": []}'


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert demo.main(['--output-dir', str(out), '--data-dir', str(tmp_path / 'nowhere'), *TINY]) == 3
    err = capsys.readouterr().err
    assert 'make demo' in err and 'apt-get install dataset-fashion-mnist' in err
    assert not out.exists(), 'nothing is written before the data is found'


def test_bad_train_option_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert demo.main(['--output-dir', str(out), *TINY, '--lr', '-1']) == 2
    assert 'lr' in capsys.readouterr().err and not out.exists()


def test_a_failed_training_process_gives_its_exit_code(tmp_path, capfd):
    """Each demo run trains in a spawned process; its error message and exit code reach the demo's caller."""
    with pytest.raises(demo_lib.TrainingFailed) as info:
        demo_lib.run_training(['--config', str(demo_lib.DEFAULT_RECIPE), '--output-dir', str(tmp_path / 'x'),
                               '--lr', '-1'])
    assert info.value.exit_code == 2 and 'lr' in capfd.readouterr().err


def test_overwrite_restores_the_old_demo_when_the_new_one_fails(tmp_path, monkeypatch):
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'results.json').write_text('old')
    monkeypatch.setattr(demo_lib, 'check_data', lambda args: None)

    def failing_training(argv):
        assert not (out / 'results.json').exists(), 'the new demo starts in an empty folder'
        raise RuntimeError('boom')

    monkeypatch.setattr(demo_lib, 'run_training', failing_training)
    with pytest.raises(RuntimeError, match='boom'):
        demo.main(['--output-dir', str(out), '--overwrite', *TINY])
    assert (out / 'results.json').read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['demo']


def test_help_describes_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(['--help'])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert 'runs/demo' in text and '--overwrite' in text and 'routing.png' in text
