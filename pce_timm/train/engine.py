"""The loop: phases switching as training goes, the loss, one training epoch, and evaluation over a split.

:mod:`.trainer` sets a run up (data from :mod:`.data`, model from :mod:`.models`, optimizer from :mod:`.optim`)
and calls these; :mod:`.evaluation` reuses :func:`evaluate`.
"""
import logging
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from pce_timm.layers import AuxLossWeights, collect_aux_loss, pce_layers
from pce_timm.progress import progress_bar

from .balance import update_balance_bias
from .checkpoint import SUSPECT_MARKER, NonFiniteLossError
from .config import AugmentConfig, LossConfig
from .metrics import MetricMeter, routing_records, sample_records
from .optim import set_lr
from .router_keys import ema_update_keys
from .schedule import Phase, apply_phase, phase_at

__all__ = ['PhaseController', 'Criterion', 'create_mixup', 'last_good_note', 'train_one_epoch', 'evaluate']

_logger = logging.getLogger(__name__)


class PhaseController:
    """Applies phases to a model and optimizer; remembers each layer's own Gumbel tau, routing noise, choice
    and balance.

    A phase that leaves ``gumbel_tau`` / ``noise`` / ``choice`` / ``balance`` unset gets the model's values back,
    not the previous phase's, so a resumed run sets exactly what an uninterrupted one had.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, phases: Tuple[Phase, ...]):
        self.model = model
        self.optimizer = optimizer
        self.phases = phases
        self.layers = pce_layers(model)
        self.defaults = {name: (m.gumbel_tau, m.router_noise_std, m.choice, m.balance)
                         for name, m in self.layers.items()}
        self.current: Optional[Phase] = None

    def update(self, progress: float) -> Tuple[Phase, bool]:
        """Switch to the phase covering ``progress`` (epochs); returns it and whether it changed."""
        phase = phase_at(self.phases, progress)
        if phase is self.current:
            return phase, False
        for name, layer in self.layers.items():
            layer.gumbel_tau, layer.router_noise_std, layer.choice, layer.balance = self.defaults[name]
        apply_phase(self.model, self.optimizer, phase)
        self.current = phase
        return phase, True


def create_mixup(augment: AugmentConfig, smoothing: float, num_classes: int) -> Optional[Mixup]:
    """timm's mixup / cutmix with label smoothing when ``augment`` turns either on, else None."""
    if not augment.mixes:
        return None
    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                 switch_prob=augment.mixup_switch_prob, mode=augment.mixup_mode, label_smoothing=smoothing,
                 num_classes=num_classes)


class Criterion:
    """CE (soft-target CE under mixup, label-smoothing CE) + the weighted aux routing losses.

    ``mixup`` (from :func:`create_mixup`) mixes a batch before the forward: ``x, y = criterion.mixup(x, y)``.
    """

    def __init__(self, loss: LossConfig, mixup: Optional[Mixup] = None):
        self.mixup = mixup
        if mixup is not None:
            self.ce = SoftTargetCrossEntropy()
        elif loss.smoothing > 0:
            self.ce = LabelSmoothingCrossEntropy(loss.smoothing)
        else:
            self.ce = nn.CrossEntropyLoss()
        self.weights = AuxLossWeights(entropy=loss.aux_entropy, balance=loss.aux_balance, z_loss=loss.aux_z_loss)

    def __call__(self, model: nn.Module, logits: torch.Tensor, target: torch.Tensor):
        ce = self.ce(logits.float(), target)
        aux, parts = collect_aux_loss(model, self.weights)
        return ce + aux, {'ce': ce.detach(), **{f'aux_{k}': v.detach() for k, v in parts.items()}}

    def step(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor):
        """One training forward: mixup (when on), the model, the loss. Returns ``(loss, logged parts)``; the
        dense tasks' criteria (:mod:`pce_timm.tasks.loop`) have the same method, so one loop trains both."""
        if self.mixup is not None:
            x, target = self.mixup(x, target)
        return self(model, model(x), target)


def last_good_note(ctx) -> str:
    """The sentence of a NaN / inf error that names the newest good checkpoint (or says there is none)."""
    good = ctx.last_checkpoint
    if good:
        return f'The last good checkpoint is {good} (continue with --resume {good} after fixing the cause)'
    return 'No checkpoint had been saved yet'


def _check_finite(ctx, loss: torch.Tensor) -> None:
    """Stop on a NaN/inf loss on any process, before the update is applied, naming the last good checkpoint.

    A finite loss makes the newest checkpoint good (its state gave it); a NaN right after a save marks that
    checkpoint suspect instead (:meth:`.checkpoint.CheckpointKeeper.reject`), so neither the message nor
    ``--resume auto`` points at the state that blew up.
    """
    acc, state = ctx.accelerator, ctx.state
    bad = (~torch.isfinite(loss.detach())).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction='sum')
    if bad.item() == 0:
        ctx.checkpoints.confirm()
        return
    rejected = ctx.checkpoints.reject(f'the loss of the next batch was {loss.item()}')
    lrs = ', '.join(f'{lr:.3g}' for lr in sorted({g['lr'] for g in ctx.optimizer.param_groups}))
    suspect = (f'; {rejected}, saved just before, gave this loss and is marked {SUSPECT_MARKER}'
               if rejected else '')
    raise NonFiniteLossError(
        f'training loss is {loss.item()} at epoch {state.epoch + 1}, batch {state.batch_in_epoch + 1} '
        f'(update {state.update}, phase {state.phase!r}); the run stopped before applying this update. '
        f'{last_good_note(ctx)}{suspect}. Common causes: lr too high (now {lrs}), no warmup, fp16 overflow.')


def _sum_over_processes(acc: Accelerator) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """accelerate's sum over processes, or None on one process."""
    if acc.num_processes == 1:
        return None
    return lambda tensor: acc.reduce(tensor, reduction='sum')


def train_one_epoch(ctx, epoch: int, on_update: Callable[[int], None]) -> Dict[str, float]:
    """Train one epoch (or its rest, when resuming mid-epoch) and return the epoch's mean losses.

    ``ctx`` is the trainer's :class:`~pce_timm.train.trainer.RunContext`; ``ctx.state`` ends at the start of
    the next epoch. After every optimizer update: the loss-free balance bias (layers with ``balance='bias'``,
    loads summed over processes), EMA key updates (phases with EMA keys), the lr schedule, step logging and
    ``on_update(update)`` (mid-epoch checkpoints).
    """
    acc, model, state, cfg = ctx.accelerator, ctx.model, ctx.state, ctx.cfg
    loader = ctx.loaders['train']
    loader.set_epoch(epoch)
    ctx.loaders['train_sampler'].set_epoch(epoch)
    num_batches = len(loader)
    if state.batch_in_epoch:
        loader = acc.skip_first_batches(loader, state.batch_in_epoch)
    model.train()
    for norm in ctx.frozen_norms:  # frozen parts keep their running statistics
        norm.eval()
    phase, _ = ctx.phases.update(epoch + state.batch_in_epoch / num_batches)
    state.phase = phase.name
    set_lr(ctx.scheduler, ctx.optimizer, epoch, state.update)
    bar = progress_bar(loader, total=num_batches, initial=state.batch_in_epoch,
               desc=f'train {epoch + 1}/{cfg.schedule.epochs}',
               disable=not (cfg.log.progress and acc.is_local_main_process), dynamic_ncols=True, leave=False)
    for x, y in bar:
        phase, changed = ctx.phases.update(epoch + state.batch_in_epoch / num_batches)
        if changed:
            state.phase = phase.name
            set_lr(ctx.scheduler, ctx.optimizer, epoch, state.update)
        with acc.accumulate(model):
            loss, parts = ctx.criterion.step(model, x, y)
            _check_finite(ctx, loss)
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.clip_grad:
                acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        state.batch_in_epoch += 1
        for key, value in {'loss': loss.detach(), **parts}.items():
            state.loss_sums[key] = state.loss_sums.get(key, 0.0) + float(value)
        state.loss_count += 1
        if acc.sync_gradients:
            state.update += 1
            update_balance_bias(model, reduce=_sum_over_processes(acc))
            if phase.ema_keys:
                ema_update_keys(model, phase.ema_decay, gather=acc.gather if acc.num_processes > 1 else None)
            set_lr(ctx.scheduler, ctx.optimizer, epoch, state.update)
            if state.update % cfg.log.log_interval == 0:
                lr = max(g['lr'] for g in ctx.optimizer.param_groups)
                acc.log({'train/loss': loss.item(), 'train/lr': lr, 'train/epoch': epoch + state.batch_in_epoch /
                         num_batches}, step=state.update)
                bar.set_postfix(loss=f'{loss.item():.3f}', phase=phase.name)
            on_update(state.update)
    bar.close()
    means = {k: torch.tensor(v / max(state.loss_count, 1), device=acc.device) for k, v in state.loss_sums.items()}
    if acc.num_processes > 1 and means:
        means = acc.reduce(means, reduction='mean')
    state.loss_sums, state.loss_count = {}, 0
    state.epoch, state.batch_in_epoch = epoch + 1, 0
    return {k: float(v) for k, v in means.items()}


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        accelerator: Optional[Accelerator] = None,
        num_classes: Optional[int] = None,
        progress: bool = True,
        desc: str = 'eval',
        max_images: Optional[int] = None,
) -> Dict[str, Any]:
    """Top-1, top-5 (top-min(5, classes)), mean CE and per-PCE-layer routing statistics over a split, in eval mode.

    Routing statistics per layer are :func:`.metrics.summarize_usage`'s, plus ``balance_bias`` for layers with
    ``balance='bias'`` (and ``dropped_fraction`` for expert choice).

    The one evaluator of the package: training, ``scripts/evaluate.py`` and expert surgery's before / after
    comparison all count hits here. With an ``accelerator`` (a prepared model and loader) per-sample records are
    gathered with ``gather_for_metrics``, so the numbers cover each sample exactly once however many processes
    ran. Without one, batches go to the device of the model's parameters in this process, and ``max_images``
    stops after that many images.

    Args:
        num_classes: for top-min(5, classes); default the logits' last dimension.
    """
    if accelerator is not None and max_images is not None:
        raise ValueError('max_images: limit the images with the loader when evaluating under an accelerator')
    model.eval()
    layers = pce_layers(model)
    meter = MetricMeter()
    start = time.time()
    device = next(model.parameters()).device if accelerator is None else None
    main = accelerator is None or accelerator.is_local_main_process
    bar = progress_bar(loader, desc=desc, disable=not (progress and main), dynamic_ncols=True, leave=False)
    for x, y in bar:
        if accelerator is None:
            if max_images is not None:
                x, y = x[:max_images - meter.count], y[:max_images - meter.count]
            if len(y) == 0:
                break
            x, y = x.to(device), y.to(device)
        logits = model(x)
        record = {'samples': sample_records(logits, y, num_classes or logits.shape[-1]),
                  'routing': routing_records(layers)}
        if accelerator is not None:
            record = accelerator.gather_for_metrics(record)
        meter.update(record['samples'], record['routing'])
        if max_images is not None and meter.count >= max_images:
            break
    bar.close()
    metrics = meter.compute()
    for name, layer in layers.items():  # loss-free balancing: the bias the split was routed with
        if layer.balance == 'bias' and name in metrics['routing']:
            metrics['routing'][name]['balance_bias'] = [round(float(v), 6) for v in layer.balance_bias.tolist()]
    metrics['eval_time_s'] = round(time.time() - start, 3)
    return metrics
