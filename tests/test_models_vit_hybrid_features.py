"""features_only on the PCE-ViT hybrids: a 2-4-8-16-32 pyramid (the CNN stem's maps, the ViT's map, the ViT's
map pooled) whose feature_info matches its tensors, built from exactly what the classifier computes; timm's
block features stay behind feature_cls='getter'."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import pce_timm  # noqa: F401
from pce_timm.layers import pce_layers
from pce_timm.models.pce_vit_hybrid import PCEHybridFeatures

HYBRIDS = timm.list_models('pce_vit_hybrid_*')
SMALL_VIT = dict(embed_dim=32, depth=2, num_heads=2)  # ViT args; the CNN stem keeps the model's widths


@pytest.mark.parametrize('name', HYBRIDS)
def test_pyramid_levels_are_the_classifiers_own_maps(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL_VIT).eval()
    features = timm.create_model(name, features_only=True, **SMALL_VIT).eval()
    assert isinstance(features, PCEHybridFeatures)
    result = features.model.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {'norm.weight', 'norm.bias', 'head.weight',
                                                                         'head.bias'}  # pruned: unused in features
    x = torch.randn(2, 3, 72, 56)
    stem_maps = {}
    for module_name in ('act1', 'layer1', 'layer2'):
        model.patch_embed.backbone[module_name].register_forward_hook(
            lambda m, args, out, key=module_name: stem_maps.__setitem__(key, out))
    with torch.no_grad():
        last_block = model.forward_intermediates(x, indices=[len(model.blocks) - 1], intermediates_only=True)[0]
        levels = features(x)
    assert features.feature_info.reduction() == [2, 4, 8, 16, 32]
    for level, reference in zip(levels, [stem_maps['act1'], stem_maps['layer1'], stem_maps['layer2'], last_block,
                                         F.max_pool2d(last_block, 2, 2, ceil_mode=True)], strict=True):
        torch.testing.assert_close(level, reference, rtol=0, atol=0)
    assert [tuple(f.shape[-2:]) for f in levels] == [(math.ceil(72 / r), math.ceil(56 / r)) for r in
                                                     features.feature_info.reduction()]
    assert [f.shape[1] for f in levels] == features.feature_info.channels()
    assert all(layer.last_router_logits is not None for layer in pce_layers(features).values())


@pytest.mark.parametrize('output_stride,kwargs,reductions', [
    (32, dict(in_chans=1, out_indices=(1, 2, 3, 4)), [4, 8, 16, 32]),
    (16, dict(), [2, 4, 8, 16, 16]),
    (8, dict(pce_stages=(1,)), [2, 4, 8, 8, 8]),  # layer3 dilated: the ViT runs on stride-8 tokens
])
def test_feature_info_matches_the_tensors_at_each_output_stride(output_stride, kwargs, reductions):
    features = timm.create_model('pce_vit_hybrid_small_r18', features_only=True, output_stride=output_stride,
                                 **SMALL_VIT, **kwargs).eval()
    x = torch.randn(1, kwargs.get('in_chans', 3), 64, 96)
    with torch.no_grad():
        levels = features(x)
    assert features.feature_info.reduction() == reductions
    assert [tuple(f.shape[1:]) for f in levels] == [
        (c, 64 // r, 96 // r) for c, r in zip(features.feature_info.channels(), reductions, strict=True)]
    if output_stride == 16:
        assert levels[3] is levels[4]  # the deepest map stays at stride 16, unpooled


def test_train_mode_backward_reaches_every_parameter_and_checkpointing_matches():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        features = timm.create_model('pce_vit_hybrid_small_r18', features_only=True, **SMALL_VIT).train()
        features.set_grad_checkpointing(checkpointing)
        sum(f.square().mean() for f in features(x)).backward()
        assert not [n for n, p in features.named_parameters() if p.grad is None]  # DDP needs no unused params
        grads.append([p.grad for p in features.parameters()])
    for with_cp, without in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(with_cp, without)


def test_getter_keeps_timms_block_features():
    getter = timm.create_model('pce_vit_hybrid_small_r18', features_only=True, feature_cls='getter')
    assert type(getter).__name__ == 'FeatureGetterNet' and getter.feature_info.reduction() == [16, 16, 16]
    assert getter.feature_info.module_name() == ['blocks.9', 'blocks.10', 'blocks.11']  # the last 3, as before


@pytest.mark.parametrize('kwargs,match', [
    (dict(out_indices=(0, 1, 2)), r"only the CNN stem's maps.*'pce_resnet18', features_only=True"),
    (dict(out_indices=(3, 1)), 'increasing indices in 0-4'),
    (dict(out_indices=(5,)), 'increasing indices in 0-4'),
    (dict(output_stride=4), r'output_stride must be one of \(32, 16, 8\)'),
    (dict(output_stride=8), r'output_stride=8 dilates stage\(s\) \(2, 3\).*8: pce_stages within \(0, 1\)'),
])
def test_bad_feature_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('pce_vit_hybrid_small_r18', features_only=True, device='meta', **kwargs)
