"""The one private timm API the model families use: recording a model's reconstruction arguments.

timm 1.0.31 records a model's construction kwargs (``model._model_args``) in ``timm.create_model`` and writes
them to config.json in ``save_for_hf`` / ``push_to_hf_hub``, which is how a saved pce_* model rebuilds with its
architecture (``timm.create_model('local-dir:...')`` / ``'hf-hub:...'``). The reading side is public
(``timm.models.get_model_args``); the writing side, for arguments the caller did not pass (a pretrained tag's
architecture, defaults filled in, expert surgery's ``expert_counts``), is only ``timm.models._input.
update_model_args``.

Oldest timm that has it: 1.0.31. ``timm.models._input`` does not exist in 1.0.29 or 1.0.30 (read from their
wheels), and before 1.0.31 ``create_model`` records nothing and ``save_for_hf`` writes only the ``model_args``
it is given, so the round trip needs timm >= 1.0.31 whatever this module does.
"""
from typing import Any

import torch.nn as nn
from timm.models import get_model_args
from timm.models._input import update_model_args  # private; timm >= 1.0.31 (see the module docstring)

__all__ = ['get_model_args', 'record_model_args']


def record_model_args(model: nn.Module, **model_args: Any) -> None:
    """Add ``model_args`` to what ``model`` rebuilds from (later values win); ``timm.create_model`` merges the
    caller's kwargs over these when it returns.

    Args:
        model: a model built by a timm entrypoint (``build_model_with_cfg``).
        **model_args: JSON-serialisable architecture arguments of the model's class.
    """
    update_model_args(model, **model_args)
