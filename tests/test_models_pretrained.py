"""pretrained=True on pce_* registry names: the bare name loads the best release, and loaded weights are checked.

A release is written and installed into an HF cache inside tmp_path, then loaded offline (HF_HUB_OFFLINE), as
after `make release`.
"""
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants

import pce_timm  # noqa: F401
from pce_timm.hub import ReleaseError, install_into_hf_cache, write_release
from pce_timm.models._pretrained import NoReleasedWeightsError

ROOT = Path(__file__).resolve().parents[1]
REPO = 'pce-timm/pce_resnet18.fmnist'
FMNIST_ARGS = dict(stem_type='cifar', channels=(16, 32, 64, 128), pce_stages=(2, 3), num_experts=4, top_k=1,
                   router='cosine', attention=False, num_classes=10, in_chans=1)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / 'hub'
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache


def _release(tmp_path, model, name='release') -> Path:
    return write_release(model, tmp_path / name, model_card='---\nlibrary_name: timm\n---\n# test\n')


def _fmnist_model(seed=0, **changes):
    torch.manual_seed(seed)
    if changes:  # another architecture than the tag's: built from the bare name
        return timm.create_model('pce_resnet18', **{**FMNIST_ARGS, 'patch_size': 2, **changes}).eval()
    return timm.create_model('pce_resnet18.fmnist').eval()


def _same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_the_bare_name_loads_the_best_release(tmp_path, offline_cache):
    released = _fmnist_model()
    install_into_hf_cache(_release(tmp_path, released), REPO)
    model = timm.create_model('pce_resnet18', pretrained=True)
    assert model.pretrained_cfg['tag'] == 'fmnist' and model.num_classes == 10
    _same(model, released)
    _same(torch.hub.load(str(ROOT), 'pce_resnet18', source='local', pretrained=True), released)
    assert timm.create_model('pce_resnet18').num_classes == 1000  # untrained: the ImageNet-shaped architecture


def test_an_architecture_without_released_weights_says_what_exists(offline_cache):
    with pytest.raises(NoReleasedWeightsError, match=r'pce_resnet34 has no released weights yet \(released: '
                                                     r'pce_resnet18\.fmnist, pce_vit_hybrid_tiny_d4_r18\.fmnist\)\. '
                                                     r'Build it untrained with pretrained='):
        timm.create_model('pce_resnet34', pretrained=True)
    with pytest.raises(NoReleasedWeightsError, match='pce_vit_hybrid_small_r18 has no released weights yet'):
        timm.create_model('pce_vit_hybrid_small_r18', pretrained=True)


def test_a_corrupted_cached_blob_is_refused(tmp_path, offline_cache):
    snapshot = install_into_hf_cache(_release(tmp_path, _fmnist_model()), REPO)
    blob = (snapshot / 'model.safetensors').resolve()
    tensors = safetensors.torch.load_file(blob)
    tensors['fc.bias'] = tensors['fc.bias'] + 1  # same size, other bytes
    safetensors.torch.save_file(tensors, blob, metadata={'format': 'pt'})
    with pytest.raises(ReleaseError, match=r'cached weights of .pce_resnet18\.fmnist. are corrupted'):
        timm.create_model('pce_resnet18.fmnist', pretrained=True)


def test_a_cached_release_of_another_architecture_is_refused(tmp_path, offline_cache):
    install_into_hf_cache(_release(tmp_path, _fmnist_model(patch_size=4)), REPO)  # same tensors, other routing
    with pytest.raises(ReleaseError, match=r'another architecture than the tag builds \(patch_size: config\.json '
                                           r'4, built 2\)'):
        timm.create_model('pce_resnet18.fmnist', pretrained=True)


def test_non_finite_loaded_weights_warn(tmp_path, offline_cache):
    release = _release(tmp_path, _fmnist_model())
    tensors = safetensors.torch.load_file(release / 'model.safetensors')
    tensors['fc.bias'][0] = float('nan')
    safetensors.torch.save_file(tensors, release / 'model.safetensors', metadata={'format': 'pt'})
    install_into_hf_cache(release, REPO)  # hashed as it is now: an intact blob of bad weights
    with pytest.warns(UserWarning, match=r'pretrained weights hold NaN / inf values in fc\.bias \(1\)'):
        timm.create_model('pce_resnet18.fmnist', pretrained=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        install_into_hf_cache(_release(tmp_path, _fmnist_model(), 'good'), REPO)
        timm.create_model('pce_resnet18.fmnist', pretrained=True)
