"""torch.hub entry points: one per registered ``pce_*`` model, each ``timm.create_model(name, ...)``.

    model = torch.hub.load('<owner>/<repo>', 'pce_resnet18', pretrained=False)
    model = torch.hub.load('/path/to/checkout', 'pce_resnet18', source='local', num_classes=10)
    # the architecture's best release (pce_resnet18: the fmnist tag, 1x28x28 Fashion-MNIST, narrow widths)
    model = torch.hub.load('<owner>/<repo>', 'pce_resnet18', pretrained=True)
    model = torch.hub.load('<owner>/<repo>', 'pce_resnet18', pretrained=True, pretrained_cfg='fmnist')  # explicit
    torch.hub.list('/path/to/checkout', source='local')  # every pce_* model
"""
import typing as _typing

import timm as _timm
import torch as _torch

import pce_timm as _pce_timm  # noqa: F401  (registers the pce_* models with timm)

dependencies = ['torch', 'timm', 'safetensors']


def _entrypoint(model_name: str) -> _typing.Callable[..., _torch.nn.Module]:
    def create(pretrained: bool = False, **kwargs: _typing.Any) -> _torch.nn.Module:
        return _timm.create_model(model_name, pretrained=pretrained, **kwargs)

    create.__name__ = create.__qualname__ = model_name
    create.__doc__ = (f'``timm.create_model({model_name!r}, pretrained=pretrained, **kwargs)``.\n\n'
                      + (_timm.models.model_entrypoint(model_name).__doc__ or ''))
    return create


for _model_name in _timm.list_models('pce_*'):
    globals()[_model_name] = _entrypoint(_model_name)
