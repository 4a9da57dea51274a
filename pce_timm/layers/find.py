"""Finding a model's PCE layers: the one lookup that training, analysis and the scripts share."""
from typing import Dict

import torch.nn as nn

from .pce import PCEConv2d

__all__ = ['pce_layers']


def pce_layers(model: nn.Module) -> Dict[str, PCEConv2d]:
    """Every :class:`PCEConv2d` of ``model`` by qualified name, in ``named_modules`` (forward) order.

    A wrapper that holds the model as ``.module`` (DDP, accelerate's wrappers) is looked through, so the
    names are those of the bare model (``layer2.0.conv1``, not ``module.layer2.0.conv1``) on one process
    or many.
    """
    model = getattr(model, 'module', model)
    return {name: module for name, module in model.named_modules() if isinstance(module, PCEConv2d)}
