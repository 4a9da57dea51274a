"""Expert surgery: pruning unused experts and duplicating experts keep the output; surgery survives a save."""
import copy
import math
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from pce_timm.analysis.surgery import (
    collect_usage,
    evaluate_surgery,
    expert_counts,
    format_surgery_table,
    prune_experts,
    reinforce_experts,
    usage_from_stats,
)
from pce_timm.data import dataset_info
from pce_timm.layers import PCEConv2d
from pce_timm.train.checkpoint import save_model_dir
from pce_timm.utils import load_module_from_path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ('layer2.0.conv1', 'layer2.1.conv1', 'layer3.0.conv1', 'layer3.1.conv1')


def tiny_model(**kwargs) -> nn.Module:
    """A 4-PCE-layer PCE-ResNet-18 for 8x8 inputs, with random norms so every expert computes something.

    The default capacity factor: in eval, sparse routing sends every patch to exactly its chosen experts anyway.
    """
    args = dict(stem_type='cifar', pce_stages=(1, 2), patch_size=1, channels=[8, 16, 32, 64], stem_width=8,
                num_classes=10, in_chans=1)
    model = timm.create_model('pce_resnet18', **dict(args, **kwargs))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    return model.eval()


def _inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _layers(model: nn.Module):
    return {name: m for name, m in model.named_modules() if isinstance(m, PCEConv2d)}


def _silence(model: nn.Module, expert: int) -> None:
    """Make ``expert`` of every layer unreachable: never a top-k choice, probability 0 under soft routing."""
    for layer in _layers(model).values():
        if hasattr(layer.router, 'fc2'):  # the MLP router's own last layer
            layer.router.fc2.bias.data[expert] = -1e4
        else:
            layer.logit_bias[expert] = -1e4


@torch.no_grad()
def _chosen(model: nn.Module, x: torch.Tensor):
    model(x)
    return {name: layer.last_expert_indices[..., 0].unique().tolist() for name, layer in _layers(model).items()}


@pytest.mark.parametrize('router,top_k', [('cosine', 1), ('cosine', 'soft'), ('mlp', 1), ('mlp', 'soft'),
                                          ('positional', 'soft')])
@torch.no_grad()
def test_pruning_an_unused_expert_keeps_the_output(router, top_k):
    model = tiny_model(router=router, top_k=top_k)
    _silence(model, 1)
    x = _inputs()
    expected = model(x)
    assert all(1 not in chosen for chosen in _chosen(model, x).values())
    kept = prune_experts(model, keep={name: [0, 2, 3] for name in LAYERS})
    assert kept == {name: [0, 2, 3] for name in LAYERS}
    assert expert_counts(model) == dict.fromkeys(LAYERS, 3)
    torch.testing.assert_close(model(x), expected)


@torch.no_grad()
def test_pruning_moves_every_per_expert_tensor():
    model = tiny_model(router='mlp')
    before = copy.deepcopy(_layers(model)['layer3.0.conv1'])
    prune_experts(model, keep={'layer3.0.conv1': [1, 3]})
    after = _layers(model)['layer3.0.conv1']
    o = after.out_chs
    torch.testing.assert_close(after.experts.weight, before.experts.weight[[1, 3]])
    channels = torch.cat([torch.arange(1 * o, 2 * o), torch.arange(3 * o, 4 * o)])
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
        torch.testing.assert_close(getattr(after.experts.bn, name), getattr(before.experts.bn, name)[channels])
    torch.testing.assert_close(after.router.fc2.weight, before.router.fc2.weight[[1, 3]])
    assert after.experts.bn.num_features == 2 * o and after.router.fc2.out_features == 2


@pytest.mark.parametrize('router,top_k', [('cosine', 'soft'), ('cosine', 1), ('mlp', 'soft'), ('mlp', 1),
                                          ('positional', 'soft'), ('positional', 1)])
@torch.no_grad()
def test_duplicating_an_expert_keeps_the_output(router, top_k):
    model = tiny_model(router=router, top_k=top_k)
    x = _inputs()
    expected = model(x)
    busiest = {name: 2 for name in LAYERS}
    index = reinforce_experts(model, busiest)
    assert index == {name: [0, 1, 2, 3, 2] for name in LAYERS}
    layer = _layers(model)['layer3.0.conv1']
    torch.testing.assert_close(layer.experts.weight[4], layer.experts.weight[2])
    split = math.log(0.5) if top_k == 'soft' else 0.0
    torch.testing.assert_close(layer.logit_bias, torch.tensor([0, 0, split, 0, split]))
    torch.testing.assert_close(model(x), expected)


@torch.no_grad()
def test_reinforce_busiest_by_usage_and_noise():
    model = tiny_model(top_k='soft')
    x = _inputs(32)
    usage = collect_usage(model, [(x, torch.zeros(32, dtype=torch.long))])
    assert all(int(c.sum()) == 32 * _layers(model)[n].last_grid_size[0] ** 2 for n, c in usage.items())
    quiet = copy.deepcopy(model)
    index = reinforce_experts(model, ['layer3.0.conv1'], usage=usage, noise_std=0.05, seed=0)
    assert index['layer3.0.conv1'][-1] == int(usage['layer3.0.conv1'].argmax())
    layer = _layers(model)['layer3.0.conv1']
    e = index['layer3.0.conv1'][-1]
    original = _layers(quiet)['layer3.0.conv1'].experts.weight[e]
    assert not torch.equal(layer.experts.weight[4], layer.experts.weight[e])  # moved apart ...
    torch.testing.assert_close((layer.experts.weight[4] + layer.experts.weight[e]) / 2, original)  # ... around it
    assert expert_counts(model)['layer3.0.conv1'] == 5 and expert_counts(model)['layer2.0.conv1'] == 4


def test_top2_duplicate_warns():
    model = tiny_model(top_k=2)
    with pytest.warns(UserWarning, match='top_k=2'):
        reinforce_experts(model, {'layer3.0.conv1': 0})


@torch.no_grad()
def test_pruned_and_reinforced_model_reloads(tmp_path):
    model = tiny_model(router='cosine', top_k=1)
    prune_experts(model, keep={'layer2.0.conv1': [0, 3], 'layer3.1.conv1': [1, 2, 3]})
    reinforce_experts(model, {'layer3.0.conv1': 1}, noise_std=0.1)
    assert model._model_args['expert_counts'] == {'layer2.0.conv1': 2, 'layer3.1.conv1': 3, 'layer3.0.conv1': 5}
    save_for_hf(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # timm: the ImageNet mean/std of the default cfg do not fit 1 channel
        rebuilt = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()  # strict load
    assert expert_counts(rebuilt) == expert_counts(model)
    x = _inputs()
    torch.testing.assert_close(rebuilt(x), model(x))


@torch.no_grad()
def test_prune_by_usage_share():
    model = tiny_model()
    usage = {'layer3.0.conv1': [50, 0, 45, 5], 'layer3.1.conv1': [25, 25, 25, 25]}
    kept = prune_experts(model, min_usage=0.06, usage=usage)
    assert kept == {'layer3.0.conv1': [0, 2]}  # layer3.1 keeps all four: unchanged, not recorded
    assert model._model_args['expert_counts'] == {'layer3.0.conv1': 2}
    stats = {'schema_version': 1, 'layers': {name: {'usage_counts': c} for name, c in usage.items()}}
    assert usage_from_stats(stats) == usage


def test_evaluate_surgery_table():
    model = tiny_model(top_k='soft')
    pruned = copy.deepcopy(model)
    prune_experts(pruned, keep={'layer3.0.conv1': [0]})
    x, y = _inputs(8), torch.arange(8)
    result = evaluate_surgery(model, pruned, [(x, y)])
    assert 0 <= result['after']['top1'] <= 100
    assert result['after']['params'] < result['before']['params']
    assert result['after']['expert_counts']['layer3.0.conv1'] == 1
    table = format_surgery_table(result)
    assert 'experts layer3.0.conv1' in table and 'top-1' in table


def test_evaluate_top1_counts_like_a_reference_loop_and_restores_the_mode():
    from pce_timm.analysis.surgery import evaluate_top1

    model = tiny_model()
    x = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        predictions = model(x).argmax(-1)
    labels = predictions.clone()
    labels[::3] = (labels[::3] + 1) % 10  # 7 of 20 wrong
    batches = [(x[:8], labels[:8]), (x[8:16], labels[8:16]), (x[16:], labels[16:])]
    assert evaluate_top1(model, batches) == pytest.approx(100.0 * 13 / 20, abs=1e-4)
    first = (predictions[:10] == labels[:10]).sum().item()  # stops after 10 images, mid-batch
    assert evaluate_top1(model.train(), batches, num_images=10) == pytest.approx(10.0 * first, abs=1e-4)
    assert model.training, 'the caller\'s train mode is restored'
    with pytest.raises(ValueError, match='no images'):
        evaluate_top1(model, [])


def test_rejects_bad_arguments():
    model = tiny_model(top_k=2)
    with pytest.raises(ValueError, match=r"unknown PCE layers \['layer9.0.conv1'\]"):
        prune_experts(model, keep={'layer9.0.conv1': [0]})
    with pytest.raises(ValueError, match='keeps no expert'):
        prune_experts(model, keep={'layer3.0.conv1': []})
    with pytest.raises(ValueError, match='fewer than the layer.s top_k=2'):
        prune_experts(model, keep={'layer3.0.conv1': [1]})
    with pytest.raises(ValueError, match='distinct expert ids in \\[0, 4\\)'):
        prune_experts(model, keep={'layer3.0.conv1': [0, 4]})
    with pytest.raises(ValueError, match='distinct expert ids'):
        prune_experts(model, keep={'layer3.0.conv1': [0, 0]})
    for bad in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match='min_usage must be a usage share in \\[0, 1\\]'):
            prune_experts(model, min_usage=bad, usage={'layer3.0.conv1': [1, 1, 1, 1]})
    with pytest.raises(ValueError, match='would keep 1 experts'):
        prune_experts(model, min_usage=0.5, usage={'layer3.0.conv1': [9, 1, 0, 0]})
    with pytest.raises(ValueError, match='one count per expert'):
        prune_experts(model, min_usage=0.1, usage={'layer3.0.conv1': [1, 1]})
    with pytest.raises(ValueError, match='exactly one of keep'):
        prune_experts(model)
    with pytest.raises(ValueError, match='usage is only read with min_usage'):
        prune_experts(model, keep={'layer3.0.conv1': [0, 1]}, usage={'layer3.0.conv1': [1, 1, 1, 1]})
    with pytest.raises(ValueError, match='needs usage'):
        reinforce_experts(model, 'all')
    with pytest.raises(ValueError, match='expert id in \\[0, 4\\)'):
        reinforce_experts(model, {'layer3.0.conv1': 7})
    with pytest.raises(ValueError, match='noise_std'):
        reinforce_experts(model, {'layer3.0.conv1': 0}, noise_std=-1.0)
    with pytest.raises(TypeError, match='needs a PCEResNet'):
        prune_experts(nn.Sequential(PCEConv2d(3, 4)), keep={'0': [0]})
    assert expert_counts(model) == dict.fromkeys(LAYERS, 4)  # nothing changed by the failed calls


def test_expert_counts_model_arg_is_checked():
    with pytest.raises(ValueError, match='unknown PCE layers'):
        tiny_model(expert_counts={'layer1.0.conv1': 2})
    with pytest.raises(ValueError, match=r"expert_counts\['layer3.0.conv1'\] must be an int >= 2"):
        tiny_model(top_k=2, expert_counts={'layer3.0.conv1': 1})
    model = tiny_model(expert_counts={'layer3.0.conv1': 6}, top_k='soft')
    assert expert_counts(model)['layer3.0.conv1'] == 6 and expert_counts(model)['layer3.1.conv1'] == 4
    assert model(_inputs(2)).shape == (2, 10)


@torch.no_grad()
def test_checkpoints_from_before_the_surgery_buffers_load_strictly():
    model = tiny_model(router='positional', top_k='soft')
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(('.logit_bias', '.router.anchors'))}
    assert len(state) == len(model.state_dict()) - 2 * len(LAYERS)
    fresh = tiny_model(router='positional', top_k='soft')
    fresh.load_state_dict(state)  # strict: the missing buffers keep their defaults
    x = _inputs()
    torch.testing.assert_close(fresh(x), model(x))


def _surgery_script():
    return load_module_from_path(ROOT / 'scripts' / 'surgery.py', 'pce_surgery_script')


@torch.no_grad()
def test_surgery_script_writes_a_reloadable_folder(tmp_path, capsys):
    info = dataset_info('digits')
    model = tiny_model()  # top-1: duplicating with no noise keeps every prediction
    save_model_dir(model, tmp_path / 'src', data_config={k: info[k] for k in ('input_size', 'mean', 'std', 'crop_pct')})
    script = _surgery_script()
    out = tmp_path / 'reinforced'
    script.main(['--model', str(tmp_path / 'src'), '--dataset', 'digits', '--output-dir', str(out),
                 '--reinforce', 'layer3.0.conv1', 'layer3.1.conv1', '--num-images', '48', '--device', 'cpu'])
    table = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for cells in (re.split(r'\s{2,}', line.strip()) for line in table.splitlines())}
    assert rows['top-1 (%)'][0] == rows['top-1 (%)'][1]
    assert int(rows['params'][1].replace(',', '')) > int(rows['params'][0].replace(',', ''))
    assert rows['experts layer3.0.conv1'] == ['4', '5'] and rows['experts layer2.0.conv1'] == ['4', '4']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        rebuilt = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert expert_counts(rebuilt) == {**dict.fromkeys(LAYERS, 4), 'layer3.0.conv1': 5, 'layer3.1.conv1': 5}
    x = _inputs()
    torch.testing.assert_close(rebuilt(x), model(x))

    with pytest.raises(SystemExit):  # an existing folder is kept unless --overwrite
        script.parse_args(['--model', 'm', '--dataset', 'digits', '--output-dir', str(out), '--reinforce'])
    assert 'pass --overwrite' in capsys.readouterr().err
    for bad, message in ((['--prune-below', '1.5'], 'usage share in [0, 1]'),
                         (['--keep', 'layer3.0.conv1'], 'expected LAYER=ID,ID'),
                         ([], 'nothing to do'),
                         (['--prune-below', '0.1', '--keep', 'a=1'], 'pass one of them')):
        with pytest.raises(SystemExit):
            script.parse_args(['--model', 'm', '--dataset', 'digits', '--output-dir', str(tmp_path / 'new'), *bad])
        assert message in capsys.readouterr().err
