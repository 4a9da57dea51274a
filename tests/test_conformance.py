"""The timm-conformance runner (tools/timm_conformance) tests what it should, and fails when it tests nothing.

Each test runs the real `run` script on a small stand-in for timm's tests/test_models.py, placed where the
runner caches the real one, so nothing is downloaded. The runner is pointed at timm's own resnet10t /
resnet14t, which exercises the same selection the pce_* models go through.
"""
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / 'tools' / 'timm_conformance' / 'run'

# The parametrizations of timm's test_models.py, in miniature.
STAND_IN = '''
import os

import pytest
from timm import list_models, list_pretrained

NON_STD_FILTERS = ['vit_*', 'deit*']


@pytest.mark.forward
@pytest.mark.parametrize('model_name', list_models(exclude_filters=['*enormous*']))
def test_forward(model_name):
    if os.environ.get('SKIP_ALL'):
        pytest.skip('over the input size limit')


@pytest.mark.cfg
@pytest.mark.parametrize('model_name', list_models(exclude_filters=NON_STD_FILTERS, include_tags=True))
def test_cfgs(model_name):
    pass


@pytest.mark.cfg_nonstd
@pytest.mark.parametrize('model_name', list_models(filter=NON_STD_FILTERS, include_tags=True))
def test_cfgs_non_std(model_name):
    pass


@pytest.mark.features
@pytest.mark.parametrize('model_name', list_models(module=['vision_transformer']))
def test_intermediates(model_name):
    pass


@pytest.mark.parametrize('model_name', list_pretrained('test_*'))
def test_inference(model_name):
    pass


@pytest.mark.parametrize('model_name', ['resnet18', 'convnext_atto'])
@pytest.mark.parametrize('batch_size', [1])
def test_pinned_to_timm_models(model_name, batch_size):
    pass


def test_not_parametrized():
    pass
'''


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cache = tmp_path / f'timm-{importlib.metadata.version("timm")}'
    cache.mkdir(exist_ok=True)
    (cache / 'test_models.py').write_text(STAND_IN)
    env = {**os.environ, 'TIMM_TESTS_CACHE': str(tmp_path), 'PYTHON': sys.executable, **env}
    return subprocess.run(
        ['bash', str(RUN), '--strict-markers', *args],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )


def test_runs_only_tests_parametrized_over_our_models(tmp_path):
    proc = _run(tmp_path, '-rA', PCE_FILTER='resnet1[04]t', PCE_NON_STD='resnet14t')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # test ids without the pretrained tags, which vary between timm versions
    passed = {re.sub(r'\.\w+\]$', ']', line.split('::')[1])
              for line in proc.stdout.splitlines() if line.startswith('PASSED ')}
    assert passed == {
        'test_forward[resnet10t]', 'test_forward[resnet14t]',
        'test_cfgs[resnet10t]',  # resnet14t is declared non-std ...
        'test_cfgs_non_std[resnet14t]',  # ... so it is tested like timm's ViTs
        'test_intermediates[resnet10t]', 'test_intermediates[resnet14t]',  # their module joins timm's list
    }


def test_no_matching_model_fails(tmp_path):
    proc = _run(tmp_path, PCE_FILTER='no_such_model_*')
    assert proc.returncode != 0
    assert "no test in timm test_models.py runs on a model matching PCE_FILTER='no_such_model_*'" in proc.stderr


def test_all_skipped_fails(tmp_path):
    proc = _run(tmp_path, '-m', 'forward', PCE_FILTER='resnet10t', SKIP_ALL='1')
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'no test passed' in proc.stdout

