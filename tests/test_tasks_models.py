"""Dense-task models: every pce_* model as an smp encoder (the ViT hybrids through their features_only pyramid),
output_stride on PCE-ResNets and the hybrids, torchvision detectors on pce_resnet18, resnet18 and a hybrid."""
import pytest
import timm
import torch

import pce_timm  # noqa: F401
from pce_timm.layers import pce_layers
from pce_timm.tasks import create_detector, create_segmenter

SMALL = dict(channels=(16, 32, 64, 128))
RESNETS = [name for name in timm.list_models('pce_*') if 'resnet' in name and 'vit' not in name]
HYBRIDS = [name for name in timm.list_models('pce_*') if 'vit' in name]


@pytest.mark.parametrize('name', RESNETS)
@pytest.mark.parametrize('arch', ['unet', 'fpn', 'deeplabv3plus'])
def test_every_pce_resnet_is_an_smp_encoder(name, arch):
    in_chans = 1 if arch == 'fpn' else 3
    # DeepLabV3+ dilates stage 3 (output stride 16): PCE must stay out of it (the next test checks the error)
    kwargs = dict(SMALL, pce_stages=(1, 2)) if arch == 'deeplabv3plus' else dict(SMALL)  # narrow: cheap
    model = create_segmenter(name, 3, arch, in_chans=in_chans, **kwargs).eval()
    assert pce_layers(model), 'the encoder must keep its PCE layers'
    with torch.no_grad():
        out = model(torch.randn(1, in_chans, 64, 64))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_deeplab_on_a_pce_stage_3_names_the_stages_that_fit():
    fits = r'output_stride=16 dilates stage\(s\) \(3,\).*16: pce_stages within \(0, 1, 2\)'
    with pytest.raises(ValueError, match=fits):
        create_segmenter('pce_resnet18', 3, 'deeplabv3plus')


def test_unet_decoder_channels_set_the_decoder_widths():
    model = create_segmenter('pce_resnet18', 3, 'unet', decoder_channels=(128, 64, 32, 16, 8), **SMALL).eval()
    widths = [block.conv2[0].out_channels for block in model.decoder.blocks]
    assert widths == [128, 64, 32, 16, 8] and model.segmentation_head[0].in_channels == 8
    default = create_segmenter('pce_resnet18', 3, 'unet', **SMALL)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in default.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize('arch,widths,match', [
    ('fpn', (128, 64, 32, 16, 16), "only unet takes decoder widths, got arch 'fpn'"),
    ('unet', (128, 64, 32), r'got \[128, 64, 32\]; accepted: five positive integers'),
    ('unet', (128, 64, 32, 16, 0), 'five positive integers'),
])
def test_decoder_channels_errors_name_the_problem(arch, widths, match):
    with pytest.raises(ValueError, match=match):
        create_segmenter('pce_resnet18', 3, arch, decoder_channels=widths, **SMALL)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if 'base' in n else n for n in HYBRIDS])
@pytest.mark.parametrize('arch', ['unet', 'fpn', 'deeplabv3plus'])
def test_every_vit_hybrid_is_an_smp_encoder(name, arch):
    """The features_only pyramid (strides 2-4-8-16-32; DeepLabV3+: 2-4-8-16-16) in smp, forward and backward."""
    torch.manual_seed(0)
    in_chans = 1 if arch == 'fpn' else 3
    model = create_segmenter(name, 3, arch, in_chans=in_chans, embed_dim=64, num_heads=2).train()
    reductions = [2, 4, 8, 16, 16] if arch == 'deeplabv3plus' else [2, 4, 8, 16, 32]
    assert model.encoder.model.feature_info.reduction() == reductions and pce_layers(model)
    out = model(torch.randn(2, in_chans, 64, 64))
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]  # every level feeds the decoder


def test_vit_hybrid_deeplab_at_output_stride_8_needs_a_dense_layer3():
    model = create_segmenter('pce_vit_hybrid_small_r18', 3, 'deeplabv3plus', output_stride=8, pce_stages=(1,),
                             embed_dim=64, num_heads=2).eval()
    assert model.encoder.model.feature_info.reduction() == [2, 4, 8, 8, 8]  # the ViT on stride-8 tokens
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r'8: pce_stages within \(0, 1\)'):
        create_segmenter('pce_vit_hybrid_small_r18', 3, 'deeplabv3plus', output_stride=8)


def test_single_stride_backbones_say_why_smp_cannot_take_them():
    with pytest.raises(ValueError, match='pyramid of strides.*smp.DPT takes single-stride ViTs'):
        create_segmenter('vit_tiny_patch16_224', 3, 'unet')


def test_vit_hybrid_detector_train_step():
    model = create_detector('pce_vit_hybrid_small_r18', 3, 'fasterrcnn', img_size=64, embed_dim=64, num_heads=2)
    assert model.backbone.strides == (4, 8, 16, 32, 64)  # levels 1-4 and the FPN's pooled level
    losses = model([torch.rand(3, 64, 64)], [{'boxes': torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
                                               'labels': torch.tensor([1])}])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.backbone.body.model.blocks[-1].mlp.fc2.weight.grad is not None


@pytest.mark.parametrize('output_stride', [16, 8])
def test_output_stride_matches_timm_resnet(output_stride):
    stages = (0, 1) if output_stride == 8 else (1, 2)
    pce = timm.create_model('pce_resnet18', features_only=True, output_stride=output_stride, pce_stages=stages,
                            **SMALL).eval()
    dense = timm.create_model('resnet18', features_only=True, output_stride=output_stride).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert [f.shape[-2:] for f in pce(x)] == [f.shape[-2:] for f in dense(x)]
    assert pce.feature_info.reduction() == dense.feature_info.reduction()
    with pytest.raises(ValueError, match='output_stride must be one of'):
        timm.create_model('pce_resnet18', output_stride=4)


@pytest.mark.parametrize('backbone', ['pce_resnet18', 'resnet18'])
def test_detector_train_step_and_inference(backbone):
    torch.manual_seed(0)
    kwargs = dict(SMALL, pce_stages=(1, 2), patch_size=(8, 4, 2, 2)) if backbone.startswith('pce') else {}
    model = create_detector(backbone, 4, 'fasterrcnn', img_size=128, **kwargs)
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{'boxes': torch.tensor([[4.0, 6.0, 30.0, 40.0]]), 'labels': torch.tensor([1])},
               {'boxes': torch.tensor([[20.0, 10.0, 60.0, 50.0], [2, 2, 12, 12]]), 'labels': torch.tensor([2, 3])}]
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.backbone.body.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:3])
    if backbone.startswith('pce'):
        layers = pce_layers(model)
        # the dense recipes' claim: at 128 px every PCE layer routes a 4x4 patch grid
        assert len(layers) == 4 and all(layer.last_grid_size == (4, 4) for layer in layers.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {'boxes', 'scores', 'labels'}


@pytest.mark.parametrize('arch', ['retinanet', 'fcos'])
def test_one_stage_detectors_build_and_train(arch):
    model = create_detector('pce_resnet18', 3, arch, img_size=64, **SMALL, pce_stages=(1, 2))
    losses = model([torch.rand(3, 64, 64)], [{'boxes': torch.tensor([[4.0, 6.0, 30.0, 40.0]]),
                                               'labels': torch.tensor([1])}])
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="arch: got 'yolo'"):
        create_detector('resnet18', 3, 'yolo')
    with pytest.raises(ValueError, match='num_classes'):
        create_detector('resnet18', 1)
    with pytest.raises(ValueError, match="arch: got 'segformer'"):
        create_segmenter('resnet18', 3, 'segformer')


def test_benchmark_dense_cases_pair_each_pce_model_with_its_dense_twin():
    from pce_timm.benchmark import CaseTimer
    from pce_timm.benchmark_dense import dense_cases

    cases = dense_cases(size=64, batch_size=1)
    assert [c.name for c in cases] == ['fasterrcnn resnet18 (dense twin)', 'fasterrcnn pce_resnet18',
                                       'unet resnet18 (dense twin)', 'unet pce_resnet18']
    for dense, pce in (cases[:2], cases[2:]):
        assert pce.info['baseline'] == dense.name and pce.ref == {dense.name: 1.0}
        assert pce.info['params_m'] > dense.info['params_m'] and pce.info['gmacs'] > 0
        assert pce_layers(pce.build()) and not pce_layers(dense.build())
    times = CaseTimer(cases, lambda: torch.rand(1, 3, 64, 64)).round()  # one eval forward + train step each
    assert set(times) == {c.name for c in cases} and all(f > 0 and t > 0 for f, t in times.values())


def test_small_patch_grids_are_warned_about(caplog):
    from pce_timm.tasks.loop import warn_small_patch_grids

    model = create_segmenter('pce_resnet18', 3, 'unet', **SMALL)  # zoo default: PCE in stages 2-3
    with caplog.at_level('WARNING'):
        grids = warn_small_patch_grids(model, 128, 'segmentation')
    assert grids and min(min(g) for g in grids.values()) < 4 and 'fewer than 4x4 patches at 128 px' in caplog.text
    caplog.clear()
    model = create_segmenter('pce_resnet18', 3, 'unet', **SMALL, pce_stages=(1, 2), patch_size=(8, 4, 2, 2))
    with caplog.at_level('WARNING'):
        grids = warn_small_patch_grids(model, 128, 'segmentation')
    assert set(grids.values()) == {(4, 4)} and not caplog.text
