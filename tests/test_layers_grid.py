"""Routing grids that adapt to the input (``patch_grid``), the 1x1-grid warning, empty batches and patches far
larger than their map: layers against fixed-pixel twins and nn.Conv2d, models against outputs of the code before
``patch_grid`` existed."""
import json
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_model_args, save_for_hf

import pce_timm  # noqa: F401  (registers the pce_* models)
from pce_timm.analysis import pce_layers
from pce_timm.layers import PCEConv2d
from pce_timm.layers.patches import grid_patch_size, grid_size
from pce_timm.layers.pce import MAX_PADDED_AREA
from pce_timm.models.pce_resnet import DEFAULT_PATCH_GRID, PCEResNet

OLD_DEFAULT_PATCH_SIZE = (8, 4, 7, 7)  # the zoo's default before patch_grid, px of each stage's output map
SMALL = dict(num_classes=3, channels=(8, 16, 32, 64), zero_init_last=False)  # PCE blocks change the output

# Outputs of the code before patch_grid (commit 920f863, tests' seeds below) for models saved with its defaults.
OLD_CODE_OUTPUTS = {
    'imagenet64': [2.8390121459960938, 2.485389232635498, -1.4932045936584473, 2.336622476577759,
                   2.246929168701172, -0.9293112754821777],
    'imagenet28': [0.8823794722557068, -0.023981034755706787, -1.8823959827423096, 0.5806012749671936,
                   -0.25232023000717163, -1.5497634410858154],
    'cifar28': [-0.38502636551856995, 0.23043064773082733, 0.8187819719314575, -0.4324357509613037,
                0.22017554938793182, 0.7416935563087463],
}

PATHS = {  # every dispatch discipline: (layer kwargs, training)
    'soft train': (dict(top_k=None), True),
    'soft eval': (dict(top_k=None), False),
    'top-1 train': (dict(top_k=1), True),
    'top-2 sorted eval': (dict(top_k=2), False),
    'top-1 static eval': (dict(top_k=1, eval_capacity_factor=1.0), False),
    'expert choice train': (dict(top_k=1, choice='expert'), True),
    'expert choice eval': (dict(top_k=1, choice='expert'), False),
    'top-1 attention train': (dict(top_k=1, attention=True), True),
    'top-1 attention eval': (dict(top_k=1, attention=True), False),
}


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args)


@pytest.mark.parametrize('size,grid,stride,expected', [
    ((14, 14), (2, 2), 1, (7, 7)),  # stage 2 at 224 px: the old default's 7 px
    ((7, 7), (2, 2), 1, (4, 4)),  # stage 3 at 224 px: 2x2 with the last patch padded
    ((28, 28), (2, 2), 2, (14, 14)),  # a stride-2 layer: sized on its 14 px output map, x 2
    ((7, 9), (2, 3), 2, (4, 4)),  # odd maps: output 4x5 px, patches 2x2 of it
    ((2, 2), (7, 7), 1, (1, 1)),  # a map smaller than the grid: 1 px patches
    ((56, 56), (7, 7), 1, (8, 8)), ((28, 28), (7, 7), 1, (4, 4)),  # stages 0-1 at 224 px: the old default's
])
def test_grid_patch_size_known_answers(size, grid, stride, expected):
    patch = grid_patch_size(size[0], size[1], grid, stride)
    assert patch == expected
    out = ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    routed = grid_size(out[0], out[1], (patch[0] // stride, patch[1] // stride))
    assert all(r <= min(g, o) for r, g, o in zip(routed, grid, out, strict=True))


@pytest.mark.parametrize('path', list(PATHS))
@pytest.mark.parametrize('stride', [1, 2])
def test_patch_grid_layer_equals_its_fixed_pixel_twin(path, stride):
    """A patch_grid layer computes exactly what a patch_size layer with the derived patch does, at every size."""
    kwargs, training = PATHS[path]
    torch.manual_seed(0)
    grid_layer = PCEConv2d(8, 12, stride=stride, num_experts=4, patch_grid=(2, 3), **kwargs).train(training)
    for h, w in ((16, 16), (13, 19), (16, 16)):  # back to the first size: the plan cache must not serve a stale plan
        patch = grid_patch_size(h, w, (2, 3), stride)
        fixed = PCEConv2d(8, 12, stride=stride, num_experts=4, patch_size=patch, **kwargs).train(training)
        fixed.load_state_dict(grid_layer.state_dict())
        x = torch.randn(3, 8, h, w)
        torch.manual_seed(1)
        out = grid_layer(x)
        torch.manual_seed(1)
        expected = fixed(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert grid_layer.last_grid_size == fixed.last_grid_size == grid_size(h, w, patch)


def test_patch_grid_layer_routes_its_grid_at_every_size_and_eval_is_batch_independent():
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, num_experts=4, top_k=1, patch_grid=4).eval()
    for size in (8, 16, 30, 64):
        x = torch.randn(5, 8, size, size)
        out = layer(x)
        assert layer.last_grid_size == (4, 4)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)  # the same routing; conv sums may round apart
    assert 'patch_grid=(4, 4)' in repr(layer) and layer.patch_size == (16, 16)  # the last forward's patch


def test_patch_grid_layer_scripts():
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, stride=2, num_experts=4, top_k=1, patch_grid=2).eval()
    scripted = torch.jit.script(layer)
    for size in (16, 11):
        x = torch.randn(2, 8, size, size)
        torch.testing.assert_close(scripted(x), layer(x), rtol=1e-5, atol=1e-5)  # eager: the CPU kernels
        assert tuple(scripted.last_grid_size) == layer.last_grid_size == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
def test_patch_grid_layer_compiles_fullgraph(train):
    """The patch a grid derives from each input is a Python int under Dynamo: one graph per input size, no break."""
    torch.manual_seed(0)
    layer = PCEConv2d(8, 8, stride=2, num_experts=4, top_k=1, patch_grid=2).train(train)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend='eager', fullgraph=True)
    for size in (16, 11):
        x = torch.randn(2, 8, size, size)
        torch.manual_seed(1)
        expected = layer(x)
        torch.manual_seed(1)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        assert layer.last_grid_size == (2, 2)
    torch._dynamo.reset()


def test_patch_size_and_patch_grid_arguments():
    assert PCEConv2d(8, 8).patch_size == (8, 8)  # the layer's default is still 8 px
    with pytest.raises(ValueError, match='not both'):
        PCEConv2d(8, 8, patch_size=4, patch_grid=2)
    with pytest.raises(ValueError, match='patch_grid must be an int >= 1'):
        PCEConv2d(8, 8, patch_grid=0)
    with pytest.raises(ValueError, match='give patch_size .* or patch_grid .* both are None'):
        PCEResNet(patch_grid=None, patch_size=None)  # (timm.create_model drops None: the default grid)
    model = timm.create_model('pce_resnet18', patch_size=2)  # pixels win over the default grid
    assert {layer.patch_size for layer in pce_layers(model).values()} == {(2, 2), (4, 4)}
    assert {layer.patch_grid for layer in pce_layers(model).values()} == {None}
    grid_model = timm.create_model('pce_resnet18', patch_grid=3)
    assert {layer.patch_size for layer in pce_layers(grid_model).values()} == {(0, 0)}  # no forward yet


def test_single_patch_grid_warns_once_per_layer_with_its_name():
    layer = PCEConv2d(8, 8, patch_size=8)
    with pytest.warns(UserWarning, match='routes a 1x1 patch grid: its 7x7 px input map is one patch of 8x8 px'):
        layer(torch.randn(1, 8, 7, 7))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        layer(torch.randn(1, 8, 7, 7))  # once per layer
        PCEConv2d(8, 8, patch_size=4)(torch.randn(1, 8, 8, 8))  # a 2x2 grid: no warning

    model = timm.create_model('pce_resnet18', in_chans=1, **SMALL).eval()  # ImageNet stem: 1 px stage-3 map at 28
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model(torch.randn(2, 1, 28, 28))
        model(torch.randn(2, 1, 28, 28))
    messages = [str(w.message) for w in caught if 'routes a 1x1 patch grid' in str(w.message)]
    assert len(messages) == 2 and "PCE layer 'layer4.0.conv1'" in messages[0] and "'layer4.1.conv1'" in messages[1]
    assert "stem_type='cifar'" in messages[0]


def test_default_grid_routes_at_28_px_with_the_cifar_stem_and_keeps_the_old_pixels_at_224():
    small = timm.create_model('pce_resnet18', stem_type='cifar', in_chans=1, **SMALL).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 1x1 grid anywhere
        small(torch.randn(2, 1, 28, 28))
    assert {n: layer.last_grid_size for n, layer in pce_layers(small).items()} == {
        'layer3.0.conv1': (2, 2), 'layer3.1.conv1': (2, 2), 'layer4.0.conv1': (2, 2), 'layer4.1.conv1': (2, 2)}

    torch.manual_seed(0)
    new = timm.create_model('pce_resnet18', pce_stages=(0, 1, 2, 3), **SMALL).eval()
    torch.manual_seed(0)
    old = timm.create_model('pce_resnet18', pce_stages=(0, 1, 2, 3), patch_size=OLD_DEFAULT_PATCH_SIZE, **SMALL).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        new(x)
        _quiet(old, x)  # stage 3 routes one patch per image
    for (name, a), b in zip(pce_layers(new).items(), pce_layers(old).values(), strict=True):
        stage = int(name[len('layer')]) - 1
        if stage < 3:  # the old default's pixels, so the same layers as before
            assert a.patch_size_for(*_input_size(name, 224)) == b.patch_size, name
            assert a.last_grid_size == b.last_grid_size, name
        else:  # 4 px patches: a 2x2 grid where 7 px made one patch
            assert (a.last_grid_size, b.last_grid_size) == ((2, 2), (1, 1)), name


def _input_size(name: str, image: int):
    """The input map of a PCE-ResNet-18 layer at ``image`` px (ImageNet stem: stage i's output is image / 2^(i+2))."""
    stage, block = int(name[len('layer')]) - 1, int(name.split('.')[1])
    size = image // 2 ** (stage + 2)
    return (size * 2, size * 2) if block == 0 and stage > 0 else (size, size)


def test_models_saved_before_patch_grid_load_and_give_the_old_outputs(tmp_path):
    """A run folder's config.json of the old code (explicit patch_size, no patch_grid) rebuilds the old model."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = timm.create_model('pce_resnet18', patch_size=OLD_DEFAULT_PATCH_SIZE, **SMALL).eval()
    x64, x28 = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 28, 28, generator=g)
    with torch.no_grad():
        out64, out28 = _quiet(model, x64), _quiet(model, x28)  # 1x1 grids in stage 3 (64 px) / stages 2-3 (28 px)
    torch.testing.assert_close(out64.flatten(), torch.tensor(OLD_CODE_OUTPUTS['imagenet64']), rtol=0, atol=1e-5)
    torch.testing.assert_close(out28.flatten(), torch.tensor(OLD_CODE_OUTPUTS['imagenet28']), rtol=0, atol=1e-5)

    save_for_hf(model, tmp_path)
    config_path = tmp_path / 'config.json'
    config = json.loads(config_path.read_text())
    assert config['model_args']['patch_size'] == list(OLD_DEFAULT_PATCH_SIZE)
    del config['model_args']['patch_grid']  # as the old code wrote it
    config_path.write_text(json.dumps(config))
    rebuilt = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(_quiet(rebuilt, x64), out64, rtol=0, atol=0)
        torch.testing.assert_close(_quiet(rebuilt, x28), out28, rtol=0, atol=0)

    torch.manual_seed(0)
    cifar = timm.create_model('pce_resnet18', stem_type='cifar', in_chans=1, pce_stages=(1, 2), patch_size=4,
                              **SMALL).eval()  # the demo / balance recipes' architecture
    with torch.no_grad():
        out = cifar(torch.randn(2, 1, 28, 28, generator=g))
    torch.testing.assert_close(out.flatten(), torch.tensor(OLD_CODE_OUTPUTS['cifar28']), rtol=0, atol=1e-5)


def test_recorded_model_args_rebuild_the_same_routing(tmp_path):
    release = timm.create_model('pce_resnet18.fmnist')  # the release's tag: explicit pixels, as its config.json
    assert get_model_args(release)['patch_size'] == 2 and get_model_args(release)['patch_grid'] is None
    model = timm.create_model('pce_resnet18', stem_type='cifar', in_chans=1, **SMALL).eval()
    args = get_model_args(model)
    assert args['patch_size'] is None and tuple(args['patch_grid']) == DEFAULT_PATCH_GRID
    save_for_hf(model, tmp_path)
    rebuilt = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    assert [layer.patch_grid for layer in pce_layers(rebuilt).values()] == [(2, 2)] * 4


def _conv_output_shape(layer: PCEConv2d, x: torch.Tensor):
    conv = nn.Conv2d(layer.in_chs, layer.out_chs, layer.kernel_size, layer.stride, layer.kernel_size // 2)
    return conv(x).shape


@pytest.mark.parametrize('path', list(PATHS))
@pytest.mark.parametrize('patches', [dict(patch_size=4), dict(patch_grid=2)])
def test_empty_batch_gives_an_empty_batch_like_nn_conv2d(path, patches):
    kwargs, training = PATHS[path]
    for stride, size in ((1, (16, 16)), (2, (15, 9))):
        layer = PCEConv2d(8, 12, stride=stride, num_experts=4, **patches, **kwargs).train(training)
        x = torch.randn(0, 8, *size, requires_grad=True)
        bn = layer.experts.bn
        before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        out = layer(x)
        assert out.shape == _conv_output_shape(layer, x)
        assert out.shape[0] == 0 and out.dtype == x.dtype
        out.sum().backward()  # as nn.Conv2d: a zero gradient, no error
        assert x.grad is not None and x.grad.shape == x.shape
        reference = nn.BatchNorm2d(4).train(training)
        reference(torch.randn(0, 4, 3, 3))  # nn.BatchNorm2d on an empty batch: statistics kept, the batch counted
        torch.testing.assert_close(bn.running_mean, before[0], rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, before[1], rtol=0, atol=0)
        assert int(bn.num_batches_tracked) - before[2] == int(reference.num_batches_tracked)
        assert torch.isfinite(bn.running_var).all()


@pytest.mark.parametrize('name', ['pce_resnet18', 'pce_resnet50_e8', 'pce_vit_hybrid_small_r18'])
def test_empty_batch_through_models_matches_timm_resnet18(name):
    kwargs = dict(num_classes=3)
    if name.startswith('pce_resnet'):
        kwargs.update(channels=(8, 16, 32, 64), stem_type='cifar', attention=True)
    else:  # timm's ViT with dynamic_img_size (the hybrids' default) cannot take an empty batch (x.view(0, -1, C))
        kwargs.update(embed_dim=32, depth=1, num_heads=2, dynamic_img_size=False, img_size=32)
    model = timm.create_model(name, **kwargs)
    dense = timm.create_model('resnet18', num_classes=3)
    x = torch.randn(0, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        dense.train(training)
        out, expected = model(x), dense(x)
        assert out.shape == expected.shape == (0, 3)
        if training:
            out.sum().backward()


def test_patch_far_larger_than_the_map_is_refused_naming_patch_map_and_fix():
    layer = PCEConv2d(8, 8, patch_size=1000)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(2, 8, 7, 7))
    message = str(info.value)
    assert 'patch_size 1000x1000 px is larger than its 7x7 px input map' in message
    assert 'at most 7x7 px' in message and 'patch_grid' in message

    model = timm.create_model('pce_resnet18', patch_size=1000, **SMALL)
    with pytest.raises(ValueError, match=r"PCE layer 'layer3.0.conv1' .*patch_size 2000x2000 px .* 8x8 px input.*"
                                         r"output map: at most 4x4 here"):
        model(torch.randn(1, 3, 64, 64))
    # a patch somewhat larger than the map (one padded patch, up to MAX_PADDED_AREA x its area) still runs: models
    # saved with the old default (8, 4, 7, 7) px run at 28 px on 1 px maps, as before (with the 1x1-grid warning)
    assert 14 * 14 <= MAX_PADDED_AREA * 2 * 2
    with pytest.warns(UserWarning, match='1x1 patch grid'):
        PCEConv2d(8, 8, stride=2, patch_size=14).eval()(torch.randn(1, 8, 2, 2))


# ---------------------------------------------------------------------------------------------------------
# the benchmark's grid section (scripts/benchmark.py --section grid): what it builds and how it reads the goals

def test_grid_section_builds_every_grid_next_to_resnet18_and_names_their_grids():
    from pce_timm.benchmark_models import GRID_SETTINGS, grid_cases

    old, default, finer = GRID_SETTINGS[:3]
    assert default[1] == dict(patch_grid=DEFAULT_PATCH_GRID)
    cases = grid_cases(['pce_resnet18'], input_size=64, batch_size=1, settings=(old, finer))
    assert [c.name for c in cases] == ['resnet18', f'pce_resnet18, {old[0]}', f'pce_resnet18, {finer[0]}']
    assert all(c.ref == {'resnet18': 1.0} for c in cases)
    grids = [c.info['grids'] for c in cases]  # 64 px, ImageNet stem: layer3 / layer4 maps of 4 and 2 px
    assert grids == ['', 'layer3 1x1 (7 px), layer4 1x1 (7 px)', 'layer3 4x4 (1 px), layer4 2x2 (1 px)']
    with pytest.raises(ValueError, match='compares PCE-ResNet-18s with resnet18'):
        grid_cases(['pce_resnet50'], input_size=64, batch_size=1)


def test_grid_goals_read_issue_12s_limits_for_every_grid_of_pce_resnet18_e8():
    from pce_timm.benchmark_models import grid_goals

    rows = [{'model': 'resnet18', 'train_x': 1.0, 'infer_x': 1.0},
            {'model': 'pce_resnet18, patch_grid (7, 7, 2, 2), the default', 'train_x': 0.99, 'infer_x': 0.99},
            {'model': 'pce_resnet18_e8, patch_size (8, 4, 7, 7) px, the old default', 'train_x': 0.91, 'infer_x': 0.96},
            {'model': 'pce_resnet18_e8, patch_grid (7, 7, 2, 2), the default', 'train_x': 0.89, 'infer_x': 0.97},
            {'model': 'pce_resnet18_e8, patch_grid (7, 7, 4, 4)', 'train_x': 0.95, 'infer_x': 0.94}]
    goals = grid_goals(rows)
    assert [g['routing'] for g in goals] == ['patch_size (8, 4, 7, 7) px, the old default',
                                             'patch_grid (7, 7, 2, 2), the default', 'patch_grid (7, 7, 4, 4)']
    assert [(g['train_ok'], g['infer_ok'], g['ok']) for g in goals] == [
        (True, True, True), (False, True, False), (True, False, False)]
