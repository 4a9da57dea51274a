"""torch.compile of exact eval: the experts' data-dependent runs are one custom op, so the compiled graph
routes every patch to exactly its chosen experts (as eager does) at the eager path's cost."""
import pytest
import timm
import torch

import pce_timm  # noqa: F401  (registers the pce_* models)
from pce_timm.layers import PCEConv2d

SORTED_OP = torch.ops.pce_timm.sorted_experts.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Leave no compiled PCEConv2d.forward behind: a later compile at other shapes would go dynamic."""
    yield
    torch._dynamo.reset()
SORTED_OPS = (torch.ops.pce_timm.sorted_experts, SORTED_OP)  # Dynamo's graph names the packet, export's the overload


def _skewed_layer(top_k: int, stride: int = 1) -> PCEConv2d:
    """Most patches choose expert 0 (then 1), so a slot capacity of the balanced share would overflow."""
    torch.manual_seed(0)
    layer = PCEConv2d(4, 6, num_experts=4, patch_size=4, top_k=top_k, stride=stride).eval()
    with torch.no_grad():
        layer.logit_bias.copy_(torch.tensor([4.0, 2.0, 0.0, 0.0]))
        layer.experts.bn.running_mean.uniform_(-0.5, 0.5)
        layer.experts.bn.running_var.uniform_(0.5, 2.0)
        layer.experts.bn.weight.uniform_(0.5, 1.5)
        layer.experts.bn.bias.uniform_(-0.5, 0.5)
    return layer


def _ops_seen(module: torch.nn.Module, x: torch.Tensor, out: list = None) -> list:
    """Compile ``module`` (fullgraph: a graph break raises) and return the call targets of its Dynamo graph;
    ``out`` gets the output of that graph, run as it is."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    torch._dynamo.reset()
    result = torch.compile(module, fullgraph=True, backend=backend)(x)
    if out is not None:
        out.append(result)
    return targets


def _calls_sorted_op(targets) -> bool:
    return any(target in SORTED_OPS for target in targets)


@pytest.mark.parametrize('top_k,stride', [(1, 1), (2, 1), (1, 2)])
def test_compiled_eval_equals_eager_and_does_not_depend_on_the_batch(top_k, stride):
    layer = _skewed_layer(top_k, stride)
    x = torch.randn(3, 4, 12, 12)
    with torch.no_grad():
        eager = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
        assert _calls_sorted_op(_ops_seen(layer, x))
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
        out = compiled(x)
    assert torch.equal(out, eager)  # the same arithmetic as eager, op for op
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_compiled_eval_with_gradients_and_exports_keep_the_static_slots():
    """The op has no backward: eval with gradients compiles the slot path, and torch.export never sees the op."""
    layer = _skewed_layer(1)
    x = torch.randn(2, 4, 12, 12)
    expected = layer(x)
    assert not _calls_sorted_op(_ops_seen(layer, x))
    exported = torch.export.export(layer, (x,))
    assert not _calls_sorted_op(node.target for node in exported.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), expected)


def test_sorted_experts_op_passes_opcheck_and_equals_forward_sorted():
    layer = _skewed_layer(1)
    experts, bn = layer.experts, layer.experts.bn
    windows = torch.randn(5, 4, 6, 6)
    expert_of_window = torch.tensor([0, 0, 1, 3, 3])
    args = (windows, expert_of_window, experts.weight.detach(), bn.running_mean, bn.running_var,
            bn.weight.detach(), bn.bias.detach(), bn.eps, 1)
    torch.library.opcheck(SORTED_OP, args, test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_static'))
    with torch.no_grad():
        rows = experts.forward_sorted_op(windows, expert_of_window)
        expected = experts.forward_sorted(windows, [2, 1, 0, 2]).permute(0, 2, 3, 1)
    assert rows.is_contiguous() and torch.equal(rows, expected)
    with pytest.raises(RuntimeError, match='eval mode'):
        experts.train().forward_sorted_op(windows, expert_of_window)


def test_compiled_model_eval_matches_eager_fullgraph():
    model = timm.create_model('pce_resnet18_e8', num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        out = []
        assert _calls_sorted_op(_ops_seen(model, x, out))
    assert torch.equal(out[0], expected)


@pytest.mark.slow
def test_inductor_compiled_eval_matches_eager():
    layer = _skewed_layer(2)
    x = torch.randn(3, 4, 12, 12)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), atol=1e-5, rtol=1e-5)
