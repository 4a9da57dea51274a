"""PCEConv2d's output follows its input's memory format, as nn.Conv2d's does (issue 16): an NCHW input gives an
NCHW output on every path, so the next layer's gradients have the layout DDP's buckets expect (no "grad strides
do not match bucket view strides" warning on N ranks)."""
import pytest
import torch
import torch.nn as nn

from pce_timm.layers import PCEConv2d


@pytest.mark.parametrize('kwargs', [dict(top_k=1), dict(top_k=2), dict(top_k=None), dict(top_k=1, choice='expert'),
                                    dict(top_k=1, mix_conv=True)])
@pytest.mark.parametrize('training', [True, False])
def test_nchw_in_nchw_out_and_contiguous_gradients_after_it(kwargs, training):
    torch.manual_seed(0)
    layer = PCEConv2d(8, 16, num_experts=4, patch_size=4, mix_conv=kwargs.pop('mix_conv', False), **kwargs)
    after = nn.Conv2d(16, 32, 1)
    layer.train(training)
    out = layer(torch.randn(2, 8, 16, 16))
    assert out.is_contiguous()
    after(out).sum().backward()
    assert after.weight.grad.stride() == after.weight.stride()
