"""Loop pieces: data and model setup, optimizer groups and schedule, one training epoch, evaluation.

:mod:`.trainer` strings these together; :mod:`.evaluation` and the scripts reuse them.
"""
import argparse
import logging
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from tqdm.auto import tqdm

from pce_timm.data import create_dataset_transform, create_loader, dataset_info, load_image_dataset
from pce_timm.layers import AuxLossWeights, collect_aux_loss, pce_layers

from .checkpoint import NonFiniteLossError
from .config import model_kwargs
from .data import create_train_loader
from .metrics import MetricMeter, routing_records, sample_records
from .models import load_model, resolve_model_source
from .optim import set_lr
from .router_keys import ema_update_keys
from .schedule import Phase, apply_phase, phase_at

__all__ = ['DataBundle', 'load_data', 'create_train_model', 'PhaseController', 'Criterion', 'train_one_epoch',
           'evaluate', 'data_config']

_logger = logging.getLogger(__name__)


class DataBundle:
    """The datasets of a run and what models and transforms need to know about them."""

    def __init__(self, args: argparse.Namespace):
        self.info = dataset_info(args.dataset)
        self.in_chans = args.in_chans or self.info['in_chans']
        size = args.img_size
        self.img_size = (size, size) if size else tuple(self.info['img_size'])
        self.train = None
        self.eval = None

    @property
    def num_classes(self) -> int:
        return self.info['num_classes']


def data_config(args: argparse.Namespace, data: DataBundle) -> Dict[str, Any]:
    """The preprocessing of a run as a timm data config (saved with the model's ``pretrained_cfg``)."""
    return {'input_size': (data.in_chans, *data.img_size), 'mean': tuple(data.info['mean']),
            'std': tuple(data.info['std']), 'crop_pct': args.crop_pct, 'interpolation': 'bicubic'}


def load_data(args: argparse.Namespace, splits: Iterable[str] = ('train', 'eval')) -> DataBundle:
    """Load the run's splits; a missing or unreadable dataset raises the data package's error right here.

    Raises:
        pce_timm.data.DatasetNotFoundError: the split was not found or could not be read (the message lists
            where it looked and how to provide the data).
    """
    data = DataBundle(args)
    if 'train' in splits:
        data.train = load_image_dataset(args.dataset, 'train', args.data_dir)
    if 'eval' in splits:
        data.eval = load_image_dataset(args.dataset, args.eval_split, args.data_dir)
    return data


def build_transforms(args: argparse.Namespace, data: DataBundle) -> Tuple[Callable, Callable]:
    cfg = data_config(args, data)
    train_tf = create_dataset_transform(
        cfg, is_training=True, in_chans=data.in_chans, no_aug=args.no_aug, scale=tuple(args.scale),
        ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        re_prob=args.reprob, black_patches_prob=args.black_patches_prob,
        channel_boost_prob=args.channel_boost_prob)
    eval_tf = create_dataset_transform(cfg, is_training=False, in_chans=data.in_chans)
    return train_tf, eval_tf


def build_loaders(args: argparse.Namespace, data: DataBundle) -> Dict[str, torch.utils.data.DataLoader]:
    """Train loader (shuffled, seeded, full batches), eval loader, and a small loader for K-Means key init."""
    train_tf, eval_tf = build_transforms(args, data)
    loaders = {}
    if data.train is not None:
        loaders['train'] = create_train_loader(data.train, train_tf, args.batch_size, seed=args.seed,
                                               num_workers=args.workers, max_samples=args.max_train_samples,
                                               isolate_numpy=bool(args.aa))
        loaders['train_sampler'] = loaders['train'].sampler
        if len(loaders['train']) == 0:
            raise ValueError(f'batch_size: {args.batch_size} is larger than the {len(loaders["train"].dataset)} '
                             f'training samples; lower batch_size or raise max_train_samples')
        loaders['key_init'] = create_loader(
            data.train, eval_tf, batch_size=args.batch_size, shuffle=True, seed=args.seed + 1,
            max_samples=args.max_train_samples)
    if data.eval is not None:
        loaders['eval'] = create_loader(
            data.eval, eval_tf, batch_size=args.eval_batch_size, num_workers=args.workers, seed=args.seed,
            max_samples=args.max_eval_samples)
    return loaders


def starts_from_trained(args: argparse.Namespace) -> bool:
    """Whether the run starts from trained weights (``--pretrained`` or a folder / local-dir / hf-hub source)."""
    return args.pretrained or resolve_model_source(args.model) != (args.model, None) or ':' in args.model


def create_train_model(args: argparse.Namespace, data: DataBundle, **overrides: Any) -> nn.Module:
    """The run's model with the dataset's classes and channels and the run's model kwargs.

    A timm name is created with ``pretrained=args.pretrained``; trained sources (run / model / checkpoint
    folders, ``local-dir:``, ``hf-hub:``) are loaded with :func:`.models.load_model`, which gives a new
    classifier when the number of classes differs.
    """
    kwargs = dict(model_kwargs(args), num_classes=data.num_classes, in_chans=data.in_chans)
    kwargs.update(overrides)
    if starts_from_trained(args) and not args.pretrained:
        return load_model(args.model, **kwargs)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


class PhaseController:
    """Applies phases to a model and optimizer; remembers each layer's own Gumbel tau and routing noise.

    A phase that leaves ``gumbel_tau`` / ``noise`` unset gets the model's values back, not the previous
    phase's, so a resumed run sets exactly what an uninterrupted one had.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, phases: Tuple[Phase, ...]):
        self.model = model
        self.optimizer = optimizer
        self.phases = phases
        self.layers = pce_layers(model)
        self.defaults = {name: (m.gumbel_tau, m.router_noise_std) for name, m in self.layers.items()}
        self.current: Optional[Phase] = None

    def update(self, progress: float) -> Tuple[Phase, bool]:
        """Switch to the phase covering ``progress`` (epochs); returns it and whether it changed."""
        phase = phase_at(self.phases, progress)
        if phase is self.current:
            return phase, False
        for name, layer in self.layers.items():
            layer.gumbel_tau, layer.router_noise_std = self.defaults[name]
        apply_phase(self.model, self.optimizer, phase)
        self.current = phase
        return phase, True


class Criterion:
    """CE (or soft-target CE with mixup, label-smoothing CE) + the weighted aux routing losses."""

    def __init__(self, args: argparse.Namespace, num_classes: int):
        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                               label_smoothing=args.smoothing, num_classes=num_classes)
            self.ce = SoftTargetCrossEntropy()
        elif args.smoothing > 0:
            self.ce = LabelSmoothingCrossEntropy(args.smoothing)
        else:
            self.ce = nn.CrossEntropyLoss()
        self.weights = AuxLossWeights(entropy=args.aux_entropy, balance=args.aux_balance, z_loss=args.aux_z_loss)

    def __call__(self, model: nn.Module, logits: torch.Tensor, target: torch.Tensor):
        ce = self.ce(logits.float(), target)
        aux, parts = collect_aux_loss(model, self.weights)
        return ce + aux, {'ce': ce.detach(), **{f'aux_{k}': v.detach() for k, v in parts.items()}}


def _check_finite(ctx, loss: torch.Tensor) -> None:
    """Stop on a NaN/inf loss on any process, before the update is applied, naming the last good checkpoint."""
    acc, state = ctx.accelerator, ctx.state
    bad = (~torch.isfinite(loss.detach())).float()
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction='sum')
    if bad.item() > 0:
        lrs = ', '.join(f'{lr:.3g}' for lr in sorted({g['lr'] for g in ctx.optimizer.param_groups}))
        keep = (f'The last good checkpoint is {ctx.last_checkpoint} (continue with --resume {ctx.last_checkpoint} '
                f'after fixing the cause)' if ctx.last_checkpoint else 'No checkpoint had been saved yet')
        raise NonFiniteLossError(
            f'training loss is {loss.item()} at epoch {state.epoch + 1}, batch {state.batch_in_epoch + 1} '
            f'(update {state.update}, phase {state.phase!r}); the run stopped before applying this update. '
            f'{keep}. Common causes: lr too high (now {lrs}), no warmup, fp16 overflow.')


def train_one_epoch(ctx, epoch: int, on_update: Callable[[int], None]) -> Dict[str, float]:
    """Train one epoch (or its rest, when resuming mid-epoch) and return the epoch's mean losses.

    ``ctx`` is the trainer's :class:`~pce_timm.train.trainer.RunContext`; ``ctx.state`` ends at the start of
    the next epoch. After every optimizer update:
    EMA key updates (phases with EMA keys), the lr schedule, step logging and ``on_update(update)``
    (mid-epoch checkpoints).
    """
    acc, model, state, args = ctx.accelerator, ctx.model, ctx.state, ctx.args
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
    bar = tqdm(loader, total=num_batches, initial=state.batch_in_epoch, desc=f'train {epoch + 1}/{args.epochs}',
               disable=not (args.progress and acc.is_local_main_process), dynamic_ncols=True, leave=False)
    for x, y in bar:
        phase, changed = ctx.phases.update(epoch + state.batch_in_epoch / num_batches)
        if changed:
            state.phase = phase.name
            set_lr(ctx.scheduler, ctx.optimizer, epoch, state.update)
        with acc.accumulate(model):
            if ctx.criterion.mixup is not None:
                x, y = ctx.criterion.mixup(x, y)
            logits = model(x)
            loss, parts = ctx.criterion(model, logits, y)
            _check_finite(ctx, loss)
            acc.backward(loss)
            if acc.sync_gradients and args.clip_grad:
                acc.clip_grad_norm_(model.parameters(), args.clip_grad)
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
        state.batch_in_epoch += 1
        for key, value in {'loss': loss.detach(), **parts}.items():
            state.loss_sums[key] = state.loss_sums.get(key, 0.0) + float(value)
        state.loss_count += 1
        if acc.sync_gradients:
            state.update += 1
            if phase.ema_keys:
                ema_update_keys(model, phase.ema_decay, gather=acc.gather if acc.num_processes > 1 else None)
            set_lr(ctx.scheduler, ctx.optimizer, epoch, state.update)
            if state.update % args.log_interval == 0:
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
        accelerator: Accelerator,
        num_classes: int,
        progress: bool = True,
        desc: str = 'eval',
) -> Dict[str, Any]:
    """Top-1, top-5 (top-min(5, classes)), mean CE and per-PCE-layer routing statistics over a whole split.

    Per-sample records are gathered with ``gather_for_metrics``, so the numbers cover each sample exactly
    once however many processes ran.
    """
    model.eval()
    layers = pce_layers(model)
    meter = MetricMeter()
    start = time.time()
    bar = tqdm(loader, desc=desc, disable=not (progress and accelerator.is_local_main_process),
               dynamic_ncols=True, leave=False)
    for x, y in bar:
        logits = model(x)
        record = {'samples': sample_records(logits, y, num_classes), 'routing': routing_records(layers)}
        record = accelerator.gather_for_metrics(record)
        meter.update(record['samples'], record['routing'])
    metrics = meter.compute()
    metrics['eval_time_s'] = round(time.time() - start, 3)
    return metrics
