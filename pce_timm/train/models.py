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

from pce_timm.hub import ReleaseError, check_model_folder
from pce_timm.layers import pce_layers

from .config import ModelConfig, model_kwargs, parse_args
from .recipe import CONFIG_FILE, RecipeError

__all__ = ['ModelSourceError', 'resolve_model_source', 'load_model', 'starts_from_trained', 'create_train_model',
           'check_model_args', 'freeze_parts', 'FREEZE_CHOICES']

FREEZE_CHOICES = ('experts', 'router', 'backbone')
_PATH_CHARS = ('/', '\\', '~')  # a source with one of these and no prefix is a folder (timm refuses it as a name)


class ModelSourceError(FileNotFoundError):
    """A model source names no folder that exists, or a folder that holds no model (the CLIs exit with code 2)."""


def resolve_model_source(source: str) -> Tuple[str, Optional[Path]]:
    """Return ``(timm name, checkpoint folder or None)`` for a source (see the module docstring).

    Raises:
        ModelSourceError: a path that does not exist, or a folder that holds neither a model, a run nor a
            checkpoint.
    """
    path = Path(source).expanduser()
    if ':' in source.split('/')[0]:
        return source, None  # an explicit local-dir: / hf-hub: source
    if not path.exists():
        if source.startswith('.') or any(c in source for c in _PATH_CHARS):
            raise ModelSourceError(
                f'{source}: no such run, model or checkpoint folder. Pass an existing folder (a run folder holds '
                f'model/config.json), a timm model name, local-dir:DIR, or hf-hub:{source} for a Hugging Face Hub '
                f'repo')
        return source, None  # a timm name
    if (path / 'config.json').is_file():
        return f'local-dir:{path}', None
    if (path / 'model' / 'config.json').is_file():
        return f'local-dir:{path / "model"}', None
    if any(path.glob('model*.safetensors')) and (path.parent.parent / CONFIG_FILE).is_file():
        return '', path
    raise ModelSourceError(f'{source}: not a model folder (config.json), a run folder (model/config.json) or a '
                           f'checkpoint folder (model.safetensors inside <run>/checkpoints/); a run that did not '
                           f'finish has no model/ yet: pass one of its checkpoints/checkpoint_N folders')


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
    pretrained one; checkpoints get ``reset_classifier``). A model folder is checked before timm loads it
    (:func:`pce_timm.hub.check_model_folder`), so a broken one says which file is wrong and how.

    Raises:
        ModelSourceError: ``source`` names no folder, or a folder without a model.
        pce_timm.hub.ReleaseError: a model folder whose config.json or weights are unreadable, truncated, of an
            unknown architecture or of other shapes than its config.json builds (naming the file), or weights
            that do not fit the model ``kwargs`` ask for.
    """
    name, checkpoint = resolve_model_source(source)
    if checkpoint is not None:
        return _load_checkpoint_model(checkpoint, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    folder = _local_dir(name)
    if folder is None:
        return timm.create_model(name, pretrained=True, **kwargs)
    check_model_folder(folder)  # the folder itself is sound: its files, architecture, keys and shapes
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as e:  # load_state_dict: the kwargs built another architecture than the folder's
        first = str(e).strip().splitlines()
        raise ReleaseError(
            f'{folder}: its weights do not fit the model built with {kwargs} ({" ".join(first[:2])[:400]}). '
            f'Leave out the model arguments that change its shapes (only num_classes may differ: a new '
            f'classifier), or train from scratch with them.') from None


def _local_dir(name: str) -> Optional[Path]:
    """The folder of a ``local-dir:`` source, else None."""
    prefix, sep, rest = name.partition(':')
    return Path(rest).expanduser() if sep and prefix == 'local-dir' else None


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


class _MapsSeen(Exception):
    """Raised by the last PCE layer's pre-hook in :func:`check_model_args`: the rest of the forward is not needed."""


def check_model_args(model: ModelConfig, num_classes: int, in_chans: int, img_size: Tuple[int, int]) -> None:
    """Refuse model arguments the run's model cannot be built with, before any data is loaded or memory used.

    Builds the model on the meta device (shapes only) with the kwargs :func:`create_train_model` would pass,
    and runs one ``img_size`` meta image to the last PCE layer. A ``patch_size`` the run sets (``--patch-size``
    or ``model_kwargs``) must fit in the map each PCE layer routes at that size: a larger one would route
    one padded patch per image (``--patch-size 1000`` at 28 px asks for 32 GB). Model folders are checked by
    :func:`pce_timm.hub.check_model_folder` first; checkpoint folders and ``hf-hub:`` sources are left to
    the load (their architecture is the run's / the Hub's).

    Raises:
        RecipeError: the kwargs are unknown to the model or out of range (the model's own message, with the
            kwargs), or the patch size is larger than a PCE layer's map (naming the layer, its map and the
            largest patch that fits).
        pce_timm.hub.ReleaseError: a model folder that cannot be loaded (naming the file).
    """
    import torch

    name, checkpoint = resolve_model_source(model.name)
    if checkpoint is not None or name.startswith('hf-hub:'):
        return
    folder = _local_dir(name)
    if folder is not None:
        check_model_folder(folder)
    kwargs = dict(model_kwargs(model), num_classes=num_classes, in_chans=in_chans)
    shown = ', '.join(f'{k}={v!r}' for k, v in model_kwargs(model).items()) or 'no model arguments'
    try:
        with torch.device('meta'):
            built = timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise RecipeError(f'model: {model.name} cannot be built with {shown}: {_one_line(e)}. Fix or drop those '
                          f'arguments (--model-kwargs, --num-experts, --top-k, --patch-size, ...)') from None
    except (RuntimeError, NotImplementedError):
        return  # an op without a meta kernel in the model's __init__: the run itself will tell
    patch_set = model.patch_size is not None or 'patch_size' in (model.model_kwargs or {})
    layers = pce_layers(built)
    if not patch_set or model.pretrained or not layers:  # the model's own grid (and a release's) is its business
        return
    too_large: List[str] = []
    fits: List[int] = []

    def pre_hook(layer: nn.Module, args: Tuple[Any, ...], name: str) -> None:
        height, width = args[0].shape[-2:]
        stride = getattr(layer, 'stride', 1)
        patch = tuple(int(p) for p in layer.patch_size)
        fits.append(min(height, width) // stride)  # in px of the layer's output map, as patch_size is given
        if patch[0] > height or patch[1] > width:
            too_large.append(f'{name} ({patch[0] // stride}x{patch[1] // stride} px patches of a '
                             f'{-(-height // stride)}x{-(-width // stride)} px map)')
        if name == last:
            raise _MapsSeen

    last = next(reversed(layers), None)
    handles = [layer.register_forward_pre_hook(lambda m, a, n=n: pre_hook(m, a, n)) for n, layer in layers.items()]
    try:
        built.eval()(torch.empty(1, in_chans, *img_size, device='meta'))
    except _MapsSeen:
        pass
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        # an op without a meta kernel (the run itself will tell), or the layer refusing the patch it was given:
        # the hooks have seen the layers up to it
        if not too_large:
            return
    finally:
        for handle in handles:
            handle.remove()
    if too_large:
        largest = min(fits)
        accepted = (f'a patch_size of at most {largest} px (patch_size is in px of each PCE stage\'s output map), '
                    if largest >= 1 else 'no patch_size fits these maps: ')
        listed = ', '.join(too_large[:4]) + (f', ... ({len(too_large)} layers)' if len(too_large) > 4 else '')
        raise RecipeError(
            f'patch_size: {model.patch_size or model.model_kwargs.get("patch_size")} is larger than the map these '
            f'PCE layers route at the run\'s {img_size[0]}x{img_size[1]} px input: {listed}; accepted: '
            f'{accepted}a larger --img-size, or earlier --pce-stages')


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].rstrip('.')


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
