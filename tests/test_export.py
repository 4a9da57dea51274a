"""Exports (issue 16): ONNX through torch.onnx.export (dynamo and TorchScript exporters) and timm's onnx_export,
run in onnxruntime at other batch sizes than the example's with exact routing; the export-friendly SPP pooling;
channels_last; pce_timm.export / scripts/export.py (parity table, atomic write, the onnx extra's message).

A tiny PCE-ResNet at 24 px with distinct experts and a router that reads the content, so outputs depend on
routing and the test batches route to experts the example input never chose. The dynamo exporter takes minutes
on 2 shared cores: those tests are slow.
"""
import importlib
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import pce_timm
from pce_timm.export import ExportError, MissingExtraError, export_model, require_extra
from pce_timm.layers import pce_layers
from pce_timm.layers.embed import adaptive_avg_pool2d_matmul, pooling_matrix
from pce_timm.train.checkpoint import save_model_dir
from pce_timm.utils import load_module_from_path

REPO_ROOT = Path(__file__).resolve().parents[1]
PCE_MODELS = timm.list_models('pce_*')
SIZE = 24
DATA_CONFIG = {'input_size': (3, SIZE, SIZE), 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'crop_pct': 1.0,
               'interpolation': 'bilinear'}


def tiny_model(seed: int = 3, grid: bool = False, **kwargs) -> nn.Module:
    """PCE in stages 1-2 with 6 px and 3 px patches (pyramid levels 2 and 4 do not divide them), distinct
    experts, random norms and a strong patch embedding, so routing follows the content. ``grid``: the same
    patches from ``patch_grid`` (2x2 grids of the 12 px and 6 px maps), sized from the input at forward time."""
    torch.manual_seed(seed)
    patches = {'patch_grid': [2, 2, 2, 2]} if grid else {'patch_size': [2, 6, 3, 2]}
    kwargs = {'num_experts': 4, 'top_k': 1, **patches, **kwargs}
    model = timm.create_model('pce_resnet18', num_classes=5, stem_type='cifar', channels=[8, 8, 16, 16],
                              pce_stages=[1, 2], **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if type(module).__name__ == 'ConvExperts':
            module.weight.data.normal_(0, (module.in_chs * 9) ** -0.5, generator=generator)
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_mean.copy_(torch.rand(c, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
    for layer in pce_layers(model).values():
        if layer.embed is not None:
            layer.embed.proj.weight.data.mul_(20)
    return model.eval()


def _experts_used(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        model(x)
    return {name: set(layer.last_expert_indices.flatten().tolist()) for name, layer in pce_layers(model).items()}


EXAMPLE = torch.zeros(2, 3, SIZE, SIZE)  # routes every patch of some layers to one expert


def _test_batches():
    return [torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(b)) for b in (1, 3, 5)]


def _assert_routing_differs_from_example(model: nn.Module) -> None:
    """The premise of an exact-routing test: the test batches use experts the example never chose."""
    example = _experts_used(model, EXAMPLE)
    used = [_experts_used(model, x) for x in _test_batches()]
    assert any(u[name] - example[name] for u in used for name in example), (example, used)
    assert any(len(set().union(*(u[name] for u in used))) == 4 for name in example), used  # all in some layer


def _assert_onnx_matches(model: nn.Module, path: Path, input_name: str) -> None:
    onnxruntime = pytest.importorskip('onnxruntime')
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for x in _test_batches():
        with torch.no_grad():
            expected = model(x)
        actual = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
        assert (actual - expected).abs().max().item() < 1e-4, x.shape[0]


@pytest.mark.parametrize('size', range(1, 10))
@pytest.mark.parametrize('level', [1, 2, 4])
def test_matmul_pooling_is_adaptive_pooling(size, level):
    x = torch.randn(3, 8, size, size + 2, dtype=torch.float64)
    torch.testing.assert_close(adaptive_avg_pool2d_matmul(x, level), F.adaptive_avg_pool2d(x, level))
    assert pooling_matrix(size, level, x.device, x.dtype).sum(1).allclose(torch.ones(level, dtype=x.dtype))


@pytest.mark.parametrize('grid', [False, True])
def test_torchscript_onnx_exporter_dynamic_batch_exact_routing(tmp_path, grid):
    pytest.importorskip('onnx')
    model = tiny_model(grid=grid)
    if grid:  # the premise: the same patches as the pixel sizes
        model(EXAMPLE)
        assert [layer.patch_size for layer in pce_layers(model).values()] == [(12, 12), (6, 6), (6, 6), (3, 3)]
    _assert_routing_differs_from_example(model)
    path = tmp_path / 'model.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (EXAMPLE,), str(path), dynamo=False, input_names=['x'], output_names=['y'],
                          dynamic_axes={'x': {0: 'batch'}, 'y': {0: 'batch'}})
    _assert_onnx_matches(model, path, 'x')


def test_timm_onnx_export(tmp_path):
    pytest.importorskip('onnx')
    from timm.utils.onnx import onnx_export

    model = tiny_model(top_k=2)
    path = tmp_path / 'model.onnx'
    onnx_export(model, str(path), example_input=EXAMPLE, check_forward=True)
    _assert_onnx_matches(model, path, 'input0')


@pytest.mark.slow
@pytest.mark.parametrize('kwargs', [{}, {'top_k': 2}, {'top_k': 'soft'}, {'choice': 'expert'},
                                    {'router': 'mlp', 'attention': True}])
def test_dynamo_onnx_dynamic_batch_exact_routing(tmp_path, kwargs):
    pytest.importorskip('onnxscript')
    model = tiny_model(**kwargs)
    path = tmp_path / 'model.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (EXAMPLE,), str(path), dynamo=True, input_names=['x'],
                          dynamic_shapes=({0: torch.export.Dim('batch')},), external_data=False)
    _assert_onnx_matches(model, path, 'x')


@pytest.mark.slow
def test_timm_onnx_export_dynamo(tmp_path):
    pytest.importorskip('onnxscript')
    from timm.utils.onnx import onnx_export

    model = tiny_model()
    _assert_routing_differs_from_example(model)
    path = tmp_path / 'model.onnx'
    onnx_export(model, str(path), example_input=EXAMPLE, check_forward=True, use_dynamo=True)
    _assert_onnx_matches(model, path, 'input0')


@pytest.mark.slow
def test_torchscript_exporter_expert_choice_sums_duplicate_picks(tmp_path):
    pytest.importorskip('onnx')
    model = tiny_model(choice='expert', capacity_factor=2.0)  # patches picked by several experts
    path = tmp_path / 'model.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (EXAMPLE,), str(path), dynamo=False, input_names=['x'],
                          dynamic_axes={'x': {0: 'batch'}})
    _assert_onnx_matches(model, path, 'x')


@pytest.mark.parametrize('model_name', PCE_MODELS)
def test_channels_last_same_state_dict_and_outputs(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, **({'img_size': 64} if 'vit' in model_name else {}))
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    experts = next(m for m in model.modules() if type(m).__name__ == 'ConvExperts')
    assert experts.weight[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(1.0, expected.abs().max().item()))


def test_channels_last_training_step_matches_nchw():
    models = [tiny_model(), tiny_model().to(memory_format=torch.channels_last)]
    x = torch.randn(4, 3, SIZE, SIZE)
    target = torch.tensor([0, 1, 2, 3])
    grads = []
    for model, inputs in zip(models, (x, x.contiguous(memory_format=torch.channels_last)), strict=True):
        model.train()
        F.cross_entropy(model(inputs), target).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    return save_model_dir(tiny_model(), tmp_path_factory.mktemp('saved') / 'model', DATA_CONFIG)


def _export_script():
    return load_module_from_path(REPO_ROOT / 'scripts' / 'export.py', 'export_script')


def test_script_torchscript_parity_table(model_dir, tmp_path, capsys):
    output = tmp_path / 'model.pt'
    assert _export_script().main(['--model', str(model_dir), '--format', 'torchscript', '--output', str(output),
                                  '--no-progress']) == 0
    out = capsys.readouterr().out
    assert '| torchscript | 1 |' in out and '| torchscript | 5 |' in out and f'wrote {output}' in out
    scripted = torch.jit.load(str(output))
    x = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(scripted(x), tiny_model()(x))


class _DiffersWhenScripted(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return x + 1e-3
        return x


def test_parity_failure_leaves_no_file(tmp_path):
    output = tmp_path / 'bad.pt'
    with pytest.raises(ExportError, match=r'parity: .* differs from the eager model by up to 0.001'):
        export_model(_DiffersWhenScripted(), 'torchscript', output, (1, 4, 4), progress=False)
    assert list(tmp_path.iterdir()) == []
    report = export_model(_DiffersWhenScripted(), 'torchscript', output, (1, 4, 4), atol=1e-2, progress=False)
    assert output.is_file() and report.file_bytes == output.stat().st_size and len(report.rows) == 4


def test_script_errors(model_dir, tmp_path, capsys):
    script = _export_script()
    assert script.main(['--model', str(model_dir), '--format', 'exported-program', '--output',
                        str(tmp_path / 'model.onnx'), '--no-progress']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: --output') and 'name it model.pt2' in err
    assert script.main(['--model', 'pce_resnet_nope', '--format', 'torchscript', '--output',
                        str(tmp_path / 'x.pt')]) == 1
    assert "not a registered model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('missing, message', [
    (('onnxruntime',), 'needs onnxruntime, which is not installed'),
    (('onnx', 'onnxruntime', 'onnxscript'), 'needs onnx, onnxruntime, onnxscript, which are not installed'),
])
def test_missing_onnx_extra_names_it(monkeypatch, missing, message):
    """Whatever is installed here (``make test-min`` has none of the extra): the modules the fake import refuses
    are named, with the extra that installs them."""
    import types

    real_import = importlib.import_module

    def fake_import(name, *args):
        if name in missing:
            raise ModuleNotFoundError(f"No module named '{name}'")
        if name in ('onnx', 'onnxruntime', 'onnxscript'):
            return types.ModuleType(name)
        return real_import(name, *args)

    monkeypatch.setattr(importlib, 'import_module', fake_import)
    with pytest.raises(MissingExtraError, match=rf"ONNX export {message}: pip install 'pce_timm\[onnx\]'"):
        require_extra('onnx', 'ONNX export')


@pytest.mark.slow
@pytest.mark.parametrize('fmt, suffix', [('onnx', '.onnx'), ('exported-program', '.pt2')])
def test_script_dynamic_batch(model_dir, tmp_path, capsys, fmt, suffix):
    if fmt == 'onnx':
        pytest.importorskip('onnxscript')
    output = tmp_path / f'model{suffix}'
    assert _export_script().main(['--model', str(model_dir), '--format', fmt, '--output', str(output),
                                  '--dynamic-batch', '--no-progress']) == 0
    out = capsys.readouterr().out
    for batch in (1, 2, 3, 5):
        assert f'| {fmt} | {batch} |' in out
    assert pce_timm.export.load_exported(output, fmt) is not None


@pytest.mark.usefixtures('one_thread_fresh_accelerate')  # tests/conftest.py
def test_train_channels_last_flag(tmp_path, monkeypatch):
    """scripts/train.py --channels-last (timm train.py's flag): the model and its batches in channels-last memory."""
    from pce_timm.train import parse_args, train, trainer

    formats = []
    real = trainer._to_channels_last

    def recording(model):
        real(model)
        model.register_forward_pre_hook(lambda m, args: formats.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))

    monkeypatch.setattr(trainer, '_to_channels_last', recording)
    cfg = parse_args(['--model', 'pce_resnet18', '--dataset', 'digits', '--stem-type', 'cifar', '--pce-stages', '1',
                      '2', '--patch-size', '1', '--model-kwargs', 'channels=[8,8,16,16]', 'stem_width=8',
                      '--epochs', '1', '--batch-size', '32', '--max-train-samples', '64', '--max-eval-samples', '32',
                      '--no-aug', '--log-with', 'csv', '--progress', 'false', '--key-init-batches', '1',
                      '--channels-last', '--output-dir', str(tmp_path / 'run')])
    assert cfg.model.channels_last
    results = train(cfg)
    assert formats and all(formats) and 0 <= results['top1'] <= 100
    # the saved weights load into the NCHW model as they are
    reloaded = timm.create_model(f'local-dir:{tmp_path / "run" / "model"}', pretrained=True).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = reloaded(x)
        torch.testing.assert_close(reloaded.to(memory_format=torch.channels_last)(x), expected, rtol=1e-4, atol=1e-5)


def test_benchmark_channels_last_cases_share_the_nchw_baseline():
    from pce_timm.benchmark_models import baseline_of, model_cases

    assert baseline_of('resnet18 (channels_last)') == 'resnet18'
    assert baseline_of('pce_resnet18_e8 (channels_last)') == 'resnet18'
    cases = {case.name: case for case in model_cases(['pce_resnet18', 'pce_resnet18 (channels_last)'], 32, 2)}
    assert list(cases) == ['resnet18', 'pce_resnet18', 'pce_resnet18 (channels_last)']
    plain, channels_last = cases['pce_resnet18'].build().eval(), cases['pce_resnet18 (channels_last)'].build().eval()
    channels_last.model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(channels_last(x), plain(x), rtol=1e-4, atol=1e-5)
    assert cases['pce_resnet18 (channels_last)'].info['baseline'] == 'resnet18'


def test_eval_capacity_factor_needs_a_fixed_batch(tmp_path):
    """Its slots are sized from the batch: a traced dynamic-batch graph would keep the example's (wrong at others)."""
    model = tiny_model()
    assert pce_timm.export.set_eval_capacity_factor(model, 1.0) == 4
    with pytest.raises(ExportError, match='eval_capacity_factor is set on 4 PCE layer'):
        export_model(model, 'exported-program', tmp_path / 'model.pt2', (3, SIZE, SIZE), dynamic_batch=True)
    with pytest.raises(ExportError, match='no sparse token-choice PCE layer'):
        pce_timm.export.set_eval_capacity_factor(tiny_model(top_k='soft'), 1.0)
    assert list(tmp_path.iterdir()) == []
