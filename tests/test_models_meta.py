"""A pce model built on the meta device (accelerate's init_empty_weights, transformers, FSDP), then
materialised and loaded, equals a normal build: no state outside the state dict is left uninitialised."""
import pytest
import timm
import torch
from accelerate import init_empty_weights

import pce_timm


@pytest.mark.parametrize('top_k', [None, 1])
def test_init_empty_weights_then_load_equals_a_normal_build(top_k):
    kwargs = dict(num_classes=5, stem_type='cifar', channels=[8, 16, 32, 64], pce_stages=[1, 2], patch_size=4,
                  num_experts=4, top_k=top_k, attention=True)
    torch.manual_seed(0)
    ref = timm.create_model('pce_resnet18', **kwargs)
    for layer in pce_timm.layers.find.pce_layers(ref).values():
        if layer.attn is not None:  # a trained residual branch: a fresh one starts as exactly zero
            torch.nn.init.normal_(layer.attn.proj.weight, std=0.1)
    ref.eval()
    with init_empty_weights(include_buffers=True):
        empty = timm.create_model('pce_resnet18', **kwargs)
    assert all(t.is_meta for t in list(empty.parameters()) + list(empty.buffers()))
    empty = empty.to_empty(device='cpu')
    empty.load_state_dict(ref.state_dict())
    empty.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(empty(x), ref(x), rtol=0, atol=0)
