"""The pce_* models: features vs intermediates, routing records, dense equivalence and upcycling, CIFAR stem,
model args round trip, argument errors, timm's norm_layer / act_layer and device / dtype, torch.compile /
torch.export, torch.hub.

timm's own test-suite runs on every pce_* model separately (tools/timm_conformance); these tests cover what
is particular to PCE. Inputs are small (64 px) to keep the file fast on a CPU.
"""
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_model_args, group_parameters, save_for_hf

from pce_timm.layers import PCEConv2d
from pce_timm.models import PCE_HUB_ORG, checkpoint_filter_fn, hub_id, upcycle_dense_state_dict
from pce_timm.models.pce_vit_hybrid import TAG_ARCH_ARGS

PCE_MODELS = timm.list_models('pce_*')
RESNET_MODELS = timm.list_models('pce_resnet*')
REPO_ROOT = Path(__file__).resolve().parents[1]


def _dense_name(pce_name: str) -> str:
    """The timm ResNet of the same widths: pce_resnet18_e8 -> resnet18."""
    return pce_name[len('pce_'):].split('_')[0]


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affines, so eval outputs depend on every norm being mapped right."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_mean.copy_(torch.rand(c, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 summation order: errors are measured against the output's scale (randomised norms
    make ResNet-50's logits reach ~1e3, where another conv algorithm moves the last digits)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def _pce_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PCEConv2d)]


def test_registry():
    assert set(PCE_MODELS) == {
        'pce_resnet18', 'pce_resnet34', 'pce_resnet50', 'pce_resnet18_e8', 'pce_resnet34_e8', 'pce_resnet50_e8',
        'pce_vit_hybrid_tiny_d4_r18', 'pce_vit_hybrid_small_r18', 'pce_vit_hybrid_base_r50'}
    # the tags with weights (made by `make release`); every bare name keeps its untrained default cfg
    assert timm.list_pretrained('pce_*') == ['pce_resnet18.fmnist', 'pce_vit_hybrid_tiny_d4_r18.fmnist']
    for name in PCE_MODELS:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == 'untrained' and not cfg.has_weights and cfg.license and cfg.first_conv and cfg.classifier
    fmnist = timm.models.get_pretrained_cfg('pce_resnet18.fmnist')
    assert fmnist.hf_hub_id == hub_id('pce_resnet18.fmnist') == f'{PCE_HUB_ORG}/pce_resnet18.fmnist'
    assert fmnist.num_classes == 10 and fmnist.input_size == (1, 28, 28) and len(fmnist.mean) == len(fmnist.std) == 1
    assert len(fmnist.label_names) == 10 and fmnist.crop_pct == 1.0
    vit = timm.models.get_pretrained_cfg('pce_vit_hybrid_tiny_d4_r18.fmnist')
    assert vit.hf_hub_id == hub_id('pce_vit_hybrid_tiny_d4_r18.fmnist') and vit.input_size == fmnist.input_size
    assert (vit.mean, vit.std, vit.num_classes, vit.label_names) == (fmnist.mean, fmnist.std, 10, fmnist.label_names)


def test_the_fmnist_hybrid_tag_builds_its_architecture():
    """pce_vit_hybrid_tiny_d4_r18.fmnist: 1 channel, 10 classes, a 7x7 token grid at 28 px, a 4x4 routing grid in
    both PCE stages; its dense baseline (pce_stages=()) builds, and kwargs that contradict the tag raise."""
    model = timm.create_model('pce_vit_hybrid_tiny_d4_r18.fmnist').eval()
    assert (model.embed_dim, len(model.blocks), model.num_classes) == (192, 4, 10)
    assert model.patch_embed.grid_size == (7, 7) and model.pos_embed.shape == (1, 1 + 49, 192)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    layers = dict(_pce_layers(model))
    assert sorted({name.split('.')[2] for name in layers}) == ['layer2', 'layer3']  # CNN stages 1 and 2
    assert all(layer.last_grid_size == (4, 4) for layer in layers.values())
    assert get_model_args(model)['channels'] == (16, 32, 64, 128) and get_model_args(model)['in_chans'] == 1
    args = dict(TAG_ARCH_ARGS['pce_vit_hybrid_tiny_d4_r18.fmnist'], in_chans=1, num_classes=10)
    dense = timm.create_model('pce_vit_hybrid_tiny_d4_r18', **dict(args, pce_stages=()))
    assert not _pce_layers(dense) and dense.pos_embed.shape == model.pos_embed.shape
    with pytest.raises(ValueError, match=r'pce_vit_hybrid_tiny_d4_r18\.fmnist is a fixed architecture.*pce_stages='):
        timm.create_model('pce_vit_hybrid_tiny_d4_r18.fmnist', pce_stages=())


@pytest.mark.parametrize('model_name', RESNET_MODELS)  # the hybrids' feature pyramid: test_models_vit_hybrid_features
def test_features_match_intermediates_and_routing_is_recorded(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    features = timm.create_model(model_name, features_only=True).eval()
    result = features.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys  # the features model is the model, minus what features_only prunes

    x = torch.randn(2, 3, 64, 64)
    input_sizes = {}
    layers = _pce_layers(model)
    assert layers, f'{model_name} has no PCE layer'
    for name, layer in layers:
        layer.register_forward_pre_hook(lambda m, args, name=name: input_sizes.__setitem__(name, args[0].shape[-2:]))
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=features.out_indices, intermediates_only=True)
        actual = features(x)
    assert len(actual) == len(expected) == len(features.feature_info.channels())
    for a, e, c in zip(actual, expected, features.feature_info.channels(), strict=True):
        assert a.shape[1] == c
        torch.testing.assert_close(a, e, rtol=0, atol=0)

    for name, layer in layers:  # every layer's routing is on the module, over its own patch grid
        (h, w), (ph, pw) = input_sizes[name], layer.patch_size
        grid = (math.ceil(h / ph), math.ceil(w / pw))
        assert layer.last_grid_size == grid, name
        assert layer.last_expert_indices.shape == (2, grid[0] * grid[1], layer.top_k), name
        assert layer.last_router_logits.shape == (2, grid[0] * grid[1], layer.num_experts), name
        stats = layer.routing_stats()
        assert stats['usage_counts'].sum() == 2 * grid[0] * grid[1]


@pytest.mark.parametrize('model_name', RESNET_MODELS)
def test_one_uniform_expert_is_the_dense_resnet(model_name):
    torch.manual_seed(0)
    dense = timm.create_model(_dense_name(model_name)).eval()
    model = timm.create_model(model_name, num_experts=1, router='uniform').eval()
    _randomize_norms(dense)
    dense_params = dict(dense.named_parameters())
    pce_params = dict(model.named_parameters())
    assert len(pce_params) == len(dense_params)
    assert sum(p.numel() for p in pce_params.values()) == sum(p.numel() for p in dense_params.values())

    state_dict = checkpoint_filter_fn(dense.state_dict(), model)
    assert set(state_dict) == set(model.state_dict())
    for key, value in model.state_dict().items():  # one-to-one, the experts' weight has a leading E = 1
        assert state_dict[key].shape == value.shape, key
    model.load_state_dict(state_dict)  # strict: no missing, no unexpected keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_close_to_scale(model(x), dense(x))


@pytest.mark.parametrize('model_name,top_k', [('pce_resnet18_e8', 1), ('pce_resnet18_e8', None), ('pce_resnet50', 1)])
def test_upcycled_identical_experts_equal_the_dense_resnet(model_name, top_k):
    """With E copies of the dense conv and no mix conv, routing cannot change the output."""
    torch.manual_seed(0)
    dense = timm.create_model(_dense_name(model_name)).eval()
    _randomize_norms(dense)
    model = timm.create_model(model_name, pce_stages=(0, 1, 2, 3), top_k=top_k).eval()
    model.load_state_dict(checkpoint_filter_fn(dense.state_dict(), model))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_close_to_scale(model(x), dense(x))
    assert any(len(layer.last_expert_indices.unique()) > 1 for _, layer in _pce_layers(model))  # routing varied

    key = 'layer3.0.conv1.experts.weight' if 'resnet18' in model_name else 'layer3.0.conv2.experts.weight'
    noisy = upcycle_dense_state_dict(dense.state_dict(), model, noise_std=0.01, seed=3)[key]
    again = upcycle_dense_state_dict(dense.state_dict(), model, noise_std=0.01, seed=3)[key]
    torch.testing.assert_close(noisy, again, rtol=0, atol=0)  # deterministic
    assert torch.equal(noisy[0], model.state_dict()[key][0]) and not torch.equal(noisy[0], noisy[1])


@pytest.mark.parametrize('size', [28, 32])
def test_cifar_stem(size):
    model = timm.create_model('pce_resnet18', stem_type='cifar', in_chans=1, num_classes=10).eval()
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    assert model.feature_info[-1]['reduction'] == 8
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        final, intermediates = model.forward_intermediates(x)
    assert [f.shape[-1] for f in intermediates] == [math.ceil(size / r) for r in (1, 1, 2, 4, 8)]
    stage2_grid = min(2, math.ceil(size / 4))  # stage 2 (layer3): a 1/4-scale map, the default patch_grid's 2x2
    assert model.layer3[1].conv1.last_grid_size == (stage2_grid, stage2_grid)


@pytest.mark.parametrize('model_name', ['pce_resnet18', 'pce_vit_hybrid_small_r18'])
def test_model_args_round_trip(model_name, tmp_path):
    args = dict(num_experts=3, top_k='soft', pce_stages=(1, 2), patch_size=4, attention=True, num_classes=7)
    model = timm.create_model(model_name, **args).eval()
    save_for_hf(model, tmp_path)
    rebuilt = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert all(layer.num_experts == 3 and layer.soft for _, layer in _pce_layers(rebuilt))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_model_args_record_the_tag_architecture_and_defaults():
    """What save_for_hf writes (timm's public get_model_args): the tag's architecture, PCE defaults filled in."""
    args = get_model_args(timm.create_model('pce_resnet18', pretrained_cfg='fmnist', device='meta'))
    assert {k: args[k] for k in ('stem_type', 'channels', 'patch_size', 'num_experts', 'num_classes', 'in_chans')} == {
        'stem_type': 'cifar', 'channels': (16, 32, 64, 128), 'patch_size': 2, 'num_experts': 4, 'num_classes': 10,
        'in_chans': 1}
    soft = get_model_args(timm.models.model_entrypoint('pce_resnet18')(top_k=None, device='meta'))  # no factory
    assert soft['top_k'] == 'soft' and soft['pce_stages'] == (2, 3) and soft['mix_conv'] is False
    vit = get_model_args(timm.create_model('pce_vit_hybrid_small_r18', device='meta'))
    assert vit['pce_stages'] == (1, 2) and vit['num_experts'] == 4  # the backbone's args


@pytest.mark.parametrize('model_name', PCE_MODELS)
def test_unknown_kwarg_raises_type_error(model_name):
    with pytest.raises(TypeError):
        timm.create_model(model_name, device='meta', not_a_model_arg=1)


@pytest.mark.parametrize('kwargs,match', [
    (dict(pce_stages=(4,)), 'pce_stages'),
    (dict(patch_size=(8, 4)), 'patch_size'),
    (dict(stem_type='tiny'), 'stem_type'),
    (dict(pce_kwargs=dict(num_experts=2)), 'pce_kwargs'),
    (dict(top_k=5), 'top_k'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('pce_resnet18', device='meta', **kwargs)


def _module_types(model: nn.Module) -> dict:
    return {name: type(m) for name, m in model.named_modules() if name}


def test_norm_and_act_layers_as_timm_resnet():
    """norm_layer / act_layer reach the stem, the dense stages and the downsampling as in timm's resnet18."""
    kwargs = dict(norm_layer='groupnorm', act_layer=nn.SiLU)
    torch.manual_seed(0)
    dense = timm.create_model('resnet18', **kwargs).eval()
    model = timm.create_model('pce_resnet18', pce_stages=(), **kwargs).eval()
    assert _module_types(model) == _module_types(dense)
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) == 17  # stem + 2 per BasicBlock
    model.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    # the experts' own norm and activation, by class or by timm's names, build the default model
    named = timm.create_model('pce_resnet18', norm_layer='batchnorm2d', act_layer='relu', device='meta')
    assert _module_types(named) == _module_types(timm.create_model('pce_resnet18', device='meta'))


@pytest.mark.parametrize('model_name', ['pce_resnet18', 'pce_resnet50'])
@pytest.mark.parametrize('kwargs', [
    dict(norm_layer='groupnorm'),
    dict(act_layer=nn.SiLU),
    dict(norm_layer=partial(nn.BatchNorm2d, eps=1e-3)),  # not the experts' BatchNorm either
    dict(pce_stages=(3,), act_layer='gelu'),
])
def test_pce_stages_name_the_norm_and_act_they_support(model_name, kwargs):
    """A PCE stage's experts are Conv-BatchNorm2d-ReLU: another norm or activation raises instead of being ignored."""
    with pytest.raises(ValueError, match=r"norm_layer=nn.BatchNorm2d \('batchnorm'\) and act_layer=nn.ReLU"):
        timm.create_model(model_name, device='meta', **kwargs)


@pytest.mark.parametrize('model_name', PCE_MODELS)
def test_built_on_the_meta_device(model_name):
    model = timm.create_model(model_name, device='meta')
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {'meta'}


def test_factory_kwargs_device_and_dtype():
    """device / dtype reach every block and PCE layer (also one rebuilt by expert_counts); a meta build
    materialised and loaded computes what a normal build does."""
    torch.manual_seed(0)
    kwargs = dict(num_classes=10, expert_counts={'layer3.0.conv1': 2})
    model = timm.create_model('pce_resnet18', **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)

    meta = timm.create_model('pce_resnet18', device='meta', **kwargs)
    assert {t.device.type for t in [*meta.parameters(), *meta.buffers()]} == {'meta'}
    meta = meta.to_empty(device='cpu').eval()
    meta.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(meta(x), expected, rtol=0, atol=0)

    double = timm.create_model('pce_resnet18', dtype=torch.float64, **kwargs).eval()
    assert {t.dtype for t in [*double.parameters(), *double.buffers()] if t.is_floating_point()} == {torch.float64}
    assert double.layer3[0].conv1.experts.weight.dtype == torch.float64 and double.layer3[0].conv1.num_experts == 2
    double.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()), expected.double(), rtol=1e-5, atol=1e-5)


def test_param_groups_and_no_weight_decay():
    model = timm.create_model('pce_resnet18', device='meta')
    router_keys = {n for n, _ in model.named_parameters() if n.endswith('router.keys')}
    assert model.no_weight_decay() == router_keys and len(router_keys) == 4
    group_of = group_parameters(model, model.group_matcher(), reverse=True)  # reverse: name -> group id
    assert group_of['layer3.0.conv1.router.keys'] == group_of['layer3.0.conv1.experts.weight']
    assert group_of['layer3.0.conv1.embed.proj.weight'] == group_of['layer3.0.conv2.weight']
    vit = timm.create_model('pce_vit_hybrid_small_r18', device='meta')
    assert {n for n in vit.no_weight_decay() if n.endswith('router.keys')} == {
        n for n, _ in vit.named_parameters() if n.endswith('router.keys')}


def test_compile_and_export_pce_resnet18():
    model = timm.create_model('pce_resnet18', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)


@pytest.mark.slow
def test_compile_inductor_pce_resnet18():
    model = timm.create_model('pce_resnet18', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_torch_hub_load():
    model = torch.hub.load(str(REPO_ROOT), 'pce_resnet18', source='local', pretrained=False, num_classes=10)
    assert type(model).__name__ == 'PCEResNet' and model.num_classes == 10
    hubconf = torch.hub._import_module('hubconf', str(REPO_ROOT / 'hubconf.py'))
    assert hubconf.dependencies == ['torch', 'timm', 'safetensors']
    assert all(callable(getattr(hubconf, name)) for name in PCE_MODELS)
