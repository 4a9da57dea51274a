"""Loading a trained model from any of the places a run or the zoo leaves one, and freezing parts of it.

A *source* is one of:

- a timm name, with or without a pretrained tag (``pce_resnet18.fmnist``): ``pretrained=True`` weights;
- ``local-dir:DIR`` or ``hf-hub:ORG/NAME``: timm's own loaders (config.json + weights);
- a run folder (``runs/x``, holding ``model/``) or a model folder (holding ``config.json``);
- a checkpoint folder (``runs/x/checkpoints/checkpoint_3``): rebuilt from the run's ``config.yaml``.
"""
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import timm
import torch.nn as nn

from pce_timm.layers import pce_layers

from .config import ModelConfig, model_kwargs, parse_args
from .recipe import CONFIG_FILE

__all__ = ['resolve_model_source', 'load_model', 'starts_from_trained', 'create_train_model', 'freeze_parts',
           'FREEZE_CHOICES']

FREEZE_CHOICES = ('experts', 'router', 'backbone')


def resolve_model_source(source: str) -> Tuple[str, Optional[Path]]:
    """Return ``(timm name, checkpoint folder or None)`` for a source (see the module docstring).

    Raises:
        FileNotFoundError: a folder that holds neither a model, a run nor a checkpoint.
    """
    path = Path(source)
    if ':' in source.split('/')[0] or not path.exists():
        return source, None  # a timm name or an explicit local-dir: / hf-hub: source
    if (path / 'config.json').is_file():
        return f'local-dir:{path}', None
    if (path / 'model' / 'config.json').is_file():
        return f'local-dir:{path / "model"}', None
    if any(path.glob('model*.safetensors')) and (path.parent.parent / CONFIG_FILE).is_file():
        return '', path
    raise FileNotFoundError(f'{source}: not a model folder (config.json), a run folder (model/config.json) or a '
                            f'checkpoint folder (model.safetensors inside <run>/checkpoints/)')


def _load_checkpoint_model(checkpoint: Path, **overrides: Any) -> nn.Module:
    """Rebuild the model of an accelerate checkpoint from its run's config and load the weights."""
    from safetensors.torch import load_file

    from pce_timm.data import dataset_info

    cfg = parse_args(['--config', str(checkpoint.parent.parent / CONFIG_FILE), '--progress', 'false'])
    info = dataset_info(cfg.data.dataset)
    kwargs = dict(model_kwargs(cfg.model), num_classes=info['num_classes'],
                  in_chans=cfg.data.in_chans or info['in_chans'])
    model = timm.create_model(cfg.model.name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(checkpoint / 'model.safetensors')))
    num_classes = overrides.get('num_classes')
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


def load_model(source: str, **kwargs: Any) -> nn.Module:
    """Create a model with trained weights from ``source``; ``kwargs`` go to ``timm.create_model``.

    A different ``num_classes`` than the source's gives a new, freshly initialised classifier (timm drops the
    pretrained one; checkpoints get ``reset_classifier``).
    """
    name, checkpoint = resolve_model_source(source)
    if checkpoint is not None:
        return _load_checkpoint_model(checkpoint, **kwargs)
    return timm.create_model(name, pretrained=True, **{k: v for k, v in kwargs.items() if v is not None})


def starts_from_trained(model: ModelConfig) -> bool:
    """Whether the run starts from trained weights (``--pretrained`` or a folder / local-dir / hf-hub source)."""
    return model.pretrained or resolve_model_source(model.name) != (model.name, None) or ':' in model.name


def create_train_model(model: ModelConfig, num_classes: int, in_chans: int, **overrides: Any) -> nn.Module:
    """The run's model with the dataset's classes and channels and ``model``'s kwargs.

    A timm name is created with ``pretrained=model.pretrained``; trained sources (run / model / checkpoint
    folders, ``local-dir:``, ``hf-hub:``) are loaded with :func:`load_model`, which gives a new classifier when
    the number of classes differs.
    """
    kwargs = dict(model_kwargs(model), num_classes=num_classes, in_chans=in_chans)
    kwargs.update(overrides)
    if starts_from_trained(model) and not model.pretrained:
        return load_model(model.name, **kwargs)
    return timm.create_model(model.name, pretrained=model.pretrained, **kwargs)


def _classifier_names(model: nn.Module) -> List[str]:
    name = getattr(model, 'pretrained_cfg', {}).get('classifier') or 'fc'
    return [name] if isinstance(name, str) else list(name)


def _frozen_modules(model: nn.Module, parts: Iterable[str]) -> Dict[str, nn.Module]:
    modules: Dict[str, nn.Module] = {}
    layers = pce_layers(model)
    for part in parts:
        if part not in FREEZE_CHOICES:
            raise ValueError(f'freeze: got {part!r}; accepted: {", ".join(FREEZE_CHOICES)}')
        if part == 'backbone':
            head = _classifier_names(model)
            modules.update({n: m for n, m in model.named_children() if n not in head and n.split('.')[0] not in head})
            continue
        if not layers:
            raise ValueError(f'freeze: {part!r} needs PCE layers, and {type(model).__name__} has none')
        children = ('experts', 'mix') if part == 'experts' else ('router', 'embed')
        for name, layer in layers.items():
            for child in children:
                module = getattr(layer, child, None)
                if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
                    modules[f'{name}.{child}'] = module
    return modules


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> List[nn.Module]:
    """Freeze ``experts`` (expert convs + mix), ``router`` (router + patch embedding) or ``backbone`` (all but
    the classifier) for a whole run: ``requires_grad=False``, so the optimizer never sees them.

    Returns:
        The frozen modules' BatchNorm layers: keep them in eval mode during training
        (the trainer does), so their running statistics stay unchanged too and the state-dict keys stay those
        of the unfrozen model.
    """
    norms: List[nn.Module] = []
    for module in _frozen_modules(model, parts).values():
        for param in module.parameters():
            param.requires_grad_(False)
        norms.extend(m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return norms


def source_name(source: str) -> str:
    """A short, path-safe name for a source (for default run folder names)."""
    return os.path.basename(source.rstrip('/').split(':')[-1]) or 'model'
