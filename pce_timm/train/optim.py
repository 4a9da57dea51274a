"""The optimizer side of training: parameter groups by role, timm's optimizer over them, the lr schedule.

The model's parameters fall into five groups (:data:`.schedule.GROUPS`): ``experts`` (the expert convs and the mixing
conv of every PCE layer), ``router`` (router parameters: cosine keys or the MLP), ``embed`` (the patch
embedding that feeds the router), ``attention`` (the deformable-attention modules) and ``rest`` (stem, dense
convs, norms, head). The phases of :mod:`.schedule` freeze and unfreeze them through each group's
``lr_scale``; :func:`set_lr` applies it.
"""
import math
from typing import Any, Dict, Iterable, List, Tuple

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from pce_timm.layers import PCEConv2d, pce_layers

from .config import OptimConfig, ScheduleConfig
from .schedule import GROUPS

__all__ = ['param_groups', 'create_optimizer', 'create_scheduler', 'set_lr', 'updates_per_epoch']

def _group_of(name: str, layers: Dict[str, PCEConv2d]) -> str:
    for layer_name in layers:
        prefix = f'{layer_name}.' if layer_name else ''
        if name.startswith(prefix):
            part = name[len(prefix):].split('.', 1)[0]
            if part in ('experts', 'mix'):
                return 'experts'
            if part in ('router', 'embed'):
                return part
            if part == 'attn':
                return 'attention'
    return 'rest'


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: the five :data:`GROUPS`, each split into decay / no-decay like timm.

    Biases, norm parameters, other 1-d parameters, cosine-router keys (they are normalised in the forward,
    so decay would only raise their effective lr) and names in ``no_weight_decay`` get no weight decay.
    Each group carries ``group`` (its name) and ``lr_scale`` (set per phase by :func:`apply_phase`).
    """
    layers = pce_layers(model)
    skip = set(no_weight_decay)
    buckets: Dict[Tuple[str, bool], List[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = _group_of(name, layers)
        no_decay = param.ndim <= 1 or name.endswith('.bias') or name in skip or name.endswith('router.keys')
        buckets.setdefault((group, no_decay), []).append(param)
    groups = []
    for group in GROUPS:
        for no_decay in (False, True):
            params = buckets.get((group, no_decay))
            if params:
                groups.append({'params': params, 'weight_decay': 0.0 if no_decay else weight_decay,
                               'group': group, 'lr_scale': 1.0})
    return groups


def create_optimizer(optim: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer over the five phase groups of :func:`param_groups`."""
    no_wd = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()
    groups = param_groups(model, optim.weight_decay, no_wd)
    kwargs = {}
    if optim.opt_eps is not None:
        kwargs['eps'] = optim.opt_eps
    if optim.opt_betas is not None:
        kwargs['betas'] = tuple(optim.opt_betas)
    optimizer = create_optimizer_v2(groups, opt=optim.opt, lr=optim.lr, weight_decay=optim.weight_decay,
                                    momentum=optim.momentum, **kwargs)
    for group in optimizer.param_groups:
        group.setdefault('initial_lr', group['lr'])
    return optimizer


def create_scheduler(schedule: ScheduleConfig, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler (None for ``sched: none``); stepped per update or per epoch (``sched_on_updates``)."""
    if schedule.sched == 'none':
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=schedule.sched, num_epochs=schedule.epochs, decay_epochs=schedule.decay_epochs,
        decay_rate=schedule.decay_rate, min_lr=schedule.min_lr, warmup_lr=schedule.warmup_lr,
        warmup_epochs=schedule.warmup_epochs, cooldown_epochs=schedule.cooldown_epochs,
        step_on_epochs=not schedule.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


def set_lr(scheduler, optimizer: torch.optim.Optimizer, epoch: int, update: int) -> None:
    """Set every group's lr for this point of training: the schedule's value times the group's ``lr_scale``."""
    if scheduler is None:
        for group in optimizer.param_groups:
            group['lr'] = group['initial_lr'] * group.get('lr_scale', 1.0)
    elif scheduler.t_in_epochs:
        scheduler.step(epoch)
    else:
        scheduler.step_update(update)


def updates_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    return max(1, math.ceil(num_batches / grad_accum_steps))
