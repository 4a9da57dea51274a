"""``train(cfg)``: one accelerate training run, from a :class:`~.config.TrainConfig` to a run folder.

Order of events: check the output folder (not locked by another run, writable, resumable) and load the data (a
missing dataset fails here, before anything is written), build the accelerator, lock the output folder (main
process, :mod:`.lock`), build the model, optimizer and loaders, fit the cosine keys by K-Means (fresh runs),
``prepare``, restore the newest checkpoint that loads (resumed runs), then per epoch: train (phases switch as
scheduled), evaluate, log, checkpoint. Finally the model is exported to ``<output_dir>/model`` and
``results.json`` written. See :mod:`.checkpoint` for the folder layout and what keeps checkpoints safe.
"""
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import accelerate
import timm
import torch
import torch.nn as nn
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, gather_object, set_seed

import pce_timm

from .checkpoint import (
    CheckpointKeeper,
    NonFiniteLossError,
    RunFolderError,
    TrainerState,
    check_writable,
    checkpoint_folders,
    load_newest_loadable,
    mark_complete,
    nonfinite_state,
    remove_incomplete,
    resume_candidates,
    save_model_dir,
    write_error,
    write_json_atomic,
)
from .config import TrainConfig, config_dict, flat_hparams, save_config
from .data import DataBundle, build_loaders, data_config, load_data
from .engine import Criterion, PhaseController, create_mixup, evaluate, last_good_note, train_one_epoch
from .lock import RunLock
from .metrics import routing_summary
from .models import create_train_model, freeze_parts, starts_from_trained
from .optim import create_optimizer, create_scheduler, updates_per_epoch
from .recipe import RecipeError
from .router_keys import fit_router_keys
from .schedule import check_phases_fit_model, needs_unused_parameters
from .trackers import build_trackers

__all__ = ['train', 'RunContext', 'Task', 'ClassificationTask', 'build_accelerator', 'export_model', 'RESULTS_FILE']

_logger = logging.getLogger(__name__)
RESULTS_FILE = 'results.json'


@dataclass
class RunContext:
    """Everything the loop pieces share during one run."""
    cfg: TrainConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loaders: Dict[str, Any]
    criterion: Criterion
    phases: PhaseController
    state: TrainerState
    data: Any  # DataBundle for classification; the task's own bundle otherwise
    task: 'Task' = None
    checkpoints: Optional[CheckpointKeeper] = None
    frozen_norms: Tuple[nn.Module, ...] = ()
    lock: Optional[RunLock] = None

    @property
    def last_checkpoint(self) -> Optional[str]:
        """The newest good checkpoint (see :class:`.checkpoint.CheckpointKeeper`), or None."""
        good = self.checkpoints.last_good if self.checkpoints else None
        return str(good) if good else None


def build_accelerator(cfg: TrainConfig, output_dir: Path) -> Accelerator:
    """Accelerator with automatic checkpoint naming (``checkpoint_<i>``), trackers and DDP's unused-parameter search.

    accelerate's own ``total_limit`` stays off: it deletes old folders before the new one is written and counts
    incomplete ones; :class:`.checkpoint.CheckpointKeeper` keeps ``checkpoint_limit`` safely instead.

    ``find_unused_parameters`` is on only when a phase routes without the router (positional / uniform):
    then the router and patch-embedding parameters get no gradient and DDP would otherwise stop with
    "Expected to have finished reduction in the prior iteration".
    """
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / 'logs'),
                                   automatic_checkpoint_naming=True, total_limit=None)
    ddp = DistributedDataParallelKwargs(find_unused_parameters=needs_unused_parameters(cfg.schedule.phases))
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    # `accelerate launch --multi_gpu` / torchrun on a machine without an accelerator: accelerate would give every
    # process a 1-process state of its own (N independent runs writing one folder); cpu=True joins them (gloo).
    cpu_ranks = world_size > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu_ranks,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        log_with=build_trackers(cfg.log.log_with or [], output_dir / 'logs', output_dir.name) or None,
        project_config=project,
        kwargs_handlers=[ddp],
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(f'launched as {world_size} processes (WORLD_SIZE) but accelerate set up '
                           f'{accelerator.num_processes} ({accelerator.distributed_type}); on CPU launch with '
                           '`accelerate launch --multi_gpu --num_processes N` or torchrun')
    return accelerator


def export_model(ctx: RunContext, model_dir: Path) -> None:
    """Save the final weights + config in timm's Hub format (atomically, on the main process)."""
    acc = ctx.accelerator
    state_dict = acc.get_state_dict(ctx.model)
    if acc.is_main_process:
        save_model_dir(acc.unwrap_model(ctx.model), model_dir, data_config(ctx.data, ctx.cfg.augment.crop_pct),
                       ctx.data.info.get('class_names'), state_dict=state_dict)
    acc.wait_for_everyone()


def _check_output_dir(output_dir: Path, resume: Optional[str]) -> None:
    """Before the data is loaded: refuse a folder another run holds, one that cannot be written, and a fresh run
    over an earlier run's checkpoints; resolve ``--resume`` (its errors come here, before anything is built)."""
    if os.environ.get('RANK', '0') == '0':  # the main process of any launcher; the lock itself is taken later
        RunLock(output_dir).check()
    check_writable(output_dir)
    if resume is None and checkpoint_folders(output_dir):
        raise RecipeError(f'output_dir: {str(output_dir)!r} already holds checkpoints of an earlier run; pass '
                          f'--resume auto to continue it, or choose another --output-dir')
    resume_candidates(resume, output_dir)


def _lock_output_dir(accelerator: Accelerator, output_dir: Path) -> RunLock:
    """The main process locks the folder; the others learn whether it could (so no rank waits for a refused one)."""
    from accelerate.utils import broadcast_object_list

    lock, refused = RunLock(output_dir), [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunFolderError as e:
            refused = [e]
    if accelerator.num_processes > 1:
        broadcast_object_list(refused)
    if refused[0] is not None:
        raise refused[0]
    return lock


def _resume(ctx: RunContext, resume: str, output_dir: Path) -> None:
    """Remove the checkpoint folders a kill left half-written, then load the newest checkpoint that loads."""
    acc = ctx.accelerator
    own = resume == 'auto' or output_dir.resolve() in (Path(resume).resolve(), *Path(resume).resolve().parents)
    if acc.is_main_process and own:  # never another run's folder
        for path in remove_incomplete(output_dir):
            acc.print(f'resume: removed {path}, which a stopped run left incomplete')
    acc.wait_for_everyone()
    candidates = resume_candidates(resume, output_dir)
    resume_from = load_newest_loadable(acc, candidates, resume if resume != 'auto' else output_dir)
    # past every folder (accelerate refuses to overwrite one)
    existing = [index for index, _ in checkpoint_folders(output_dir)]
    acc.project_configuration.iteration = max([ctx.state.next_checkpoint] + [i + 1 for i in existing])
    if resume_from is None:  # --resume auto on a folder without a complete checkpoint: a fresh start
        set_seed(ctx.cfg.seed, device_specific=True)
        return
    ctx.checkpoints.last_good = resume_from
    acc.print(f'resumed from {resume_from}: epoch {ctx.state.epoch}, batch {ctx.state.batch_in_epoch}, '
              f'update {ctx.state.update}')


ModelFn = Callable[[TrainConfig, DataBundle], Tuple[nn.Module, List[nn.Module]]]


class Task:
    """What a run trains and measures; :func:`train` runs the same loop (accelerate, phases, aux losses, K-Means
    keys, checkpoints, resume, trackers) for every task. :class:`ClassificationTask` is the default;
    :mod:`pce_timm.tasks.loop` has detection and segmentation.

    ``metric_keys`` are the evaluation numbers that go into each epoch's history, the trackers and
    ``results.json`` (in this order); ``prepare_eval`` says whether accelerate shards the eval loader (else
    the task shards it itself, e.g. for torchmetrics, which gathers across processes by itself).
    """
    name = 'task'
    metric_keys: Tuple[str, ...] = ()
    prepare_eval = True

    def load_data(self, cfg: TrainConfig) -> Any:
        raise NotImplementedError

    def build_model(self, cfg: TrainConfig, data: Any) -> Tuple[nn.Module, List[nn.Module]]:
        raise NotImplementedError

    def build_loaders(self, cfg: TrainConfig, data: Any) -> Dict[str, Any]:
        """``train`` (with ``set_epoch``), ``train_sampler``, ``key_init`` (yields ``(tensor, _)``) and ``eval``."""
        raise NotImplementedError

    def criterion(self, cfg: TrainConfig, data: Any) -> Any:
        """An object with ``step(model, x, y) -> (loss, parts)`` (see :class:`.engine.Criterion`)."""
        raise NotImplementedError

    def evaluate(self, ctx: 'RunContext', desc: str) -> Dict[str, Any]:
        """``loss`` (or None), ``routing`` (per PCE layer) and the ``metric_keys``."""
        raise NotImplementedError

    def describe(self, metrics: Dict[str, Any]) -> str:
        return ', '.join(f'{k} {metrics[k]:.4f}' for k in self.metric_keys if metrics.get(k) is not None)

    def export(self, ctx: 'RunContext', model_dir: Path) -> None:
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """The task's own recipe keys, saved in ``config.yaml`` and ``results.json`` next to the config's."""
        return {}

    def finish(self, ctx: 'RunContext', metrics: Dict[str, Any], output_dir: Path) -> Dict[str, Any]:
        """After export: extra ``results.json`` entries (and files the task writes, on the main process)."""
        return {}


class ClassificationTask(Task):
    """Image classification: the datasets of :mod:`pce_timm.data`, CE + aux losses, top-1 / top-5."""
    name = 'classification'
    metric_keys = ('top1', 'top5')

    def __init__(self, model_fn: Optional[ModelFn] = None):
        self.model_fn = model_fn

    def load_data(self, cfg: TrainConfig) -> DataBundle:
        return load_data(cfg.data)

    def build_model(self, cfg: TrainConfig, data: DataBundle) -> Tuple[nn.Module, List[nn.Module]]:
        if self.model_fn:
            return self.model_fn(cfg, data)
        return create_train_model(cfg.model, data.num_classes, data.in_chans), []

    def build_loaders(self, cfg: TrainConfig, data: DataBundle) -> Dict[str, Any]:
        return build_loaders(cfg.data, cfg.augment, data, cfg.seed)

    def criterion(self, cfg: TrainConfig, data: DataBundle) -> Criterion:
        return Criterion(cfg.loss, create_mixup(cfg.augment, cfg.loss.smoothing, data.num_classes))

    def evaluate(self, ctx: 'RunContext', desc: str) -> Dict[str, Any]:
        return evaluate(ctx.model, ctx.loaders['eval'], ctx.accelerator, ctx.data.num_classes, ctx.cfg.log.progress,
                        desc=desc)

    def describe(self, metrics: Dict[str, Any]) -> str:
        return f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}"

    def export(self, ctx: 'RunContext', model_dir: Path) -> None:
        export_model(ctx, model_dir)


def _to_channels_last(model: nn.Module) -> None:
    """``--channels-last``: the model's 4-D weights and every 4-D input it gets (training and eval batches)."""
    model.to(memory_format=torch.channels_last)

    def inputs_channels_last(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                     else a for a in args)

    model.register_forward_pre_hook(inputs_channels_last)


def _setup(cfg: TrainConfig, model_fn: Optional[ModelFn] = None, task: Optional[Task] = None) -> RunContext:
    task = task or ClassificationTask(model_fn)
    output_dir = Path(cfg.checkpoint.output_dir)
    _check_output_dir(output_dir, cfg.checkpoint.resume)
    data = task.load_data(cfg)  # a missing / unreadable dataset stops here, before anything is built
    accelerator = build_accelerator(cfg, output_dir)
    lock = _lock_output_dir(accelerator, output_dir)
    try:
        return _build(cfg, task, data, accelerator, output_dir, lock)
    except BaseException:
        lock.release()
        raise


def _build(cfg: TrainConfig, task: Task, data: Any, accelerator: Accelerator, output_dir: Path,
           lock: RunLock) -> RunContext:
    phases = cfg.schedule.phases
    if accelerator.distributed_type == DistributedType.FSDP and any(p.ema_keys for p in phases):
        raise RecipeError('phases: EMA key updates (routing: ema / keys: ema) are not supported under FSDP (the '
                          'keys are sharded); accepted under FSDP: routing positional, uniform or router with '
                          'keys learnable / frozen')
    resume = cfg.checkpoint.resume
    fresh = not resume_candidates(resume, output_dir)  # --resume auto without a complete checkpoint starts fresh
    set_seed(cfg.seed)
    model, frozen_norms = task.build_model(cfg, data)
    frozen_norms = list(frozen_norms) + freeze_parts(model, cfg.model.freeze or [])
    check_phases_fit_model(phases, model)
    loaders = task.build_loaders(cfg, data)
    state = TrainerState()
    model.to(accelerator.device)
    if cfg.model.channels_last:
        _to_channels_last(model)
    if fresh and cfg.model.key_init == 'kmeans' and not starts_from_trained(cfg.model):
        fitted = fit_router_keys(model, loaders['key_init'], cfg.model.key_init_batches, cfg.seed,
                                 accelerator.device, cfg.log.progress and accelerator.is_local_main_process)
        state.keys_initialised = bool(fitted)
    optimizer = create_optimizer(cfg.optim, model)
    if task.prepare_eval:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(
            model, optimizer, loaders['train'], loaders['eval'])
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, loaders['train'])
        eval_loader = loaders['eval']
    scheduler = create_scheduler(cfg.schedule, optimizer,
                                 updates_per_epoch(len(train_loader), cfg.optim.grad_accum_steps))
    loaders.update(train=train_loader, eval=eval_loader)
    accelerator.register_for_checkpointing(state)
    criterion = task.criterion(cfg, data)
    ctx = RunContext(cfg, accelerator, model, optimizer, scheduler, loaders, criterion,
                     PhaseController(accelerator.unwrap_model(model), optimizer, tuple(phases)), state, data,
                     task=task, frozen_norms=tuple(frozen_norms), lock=lock,
                     checkpoints=CheckpointKeeper(output_dir, cfg.checkpoint.checkpoint_limit,
                                                  accelerator.is_main_process))
    if resume is not None:
        _resume(ctx, resume, output_dir)
    else:
        set_seed(cfg.seed, device_specific=True)  # different augmentation per rank
    return ctx


def _save_checkpoint(ctx: RunContext, elapsed: float) -> None:
    """Save a checkpoint of a finite state: ``save_state`` on every process, then the main one writes the manifest
    (:func:`.checkpoint.mark_complete`); :class:`.checkpoint.CheckpointKeeper` rotates once the next training loss
    (or the end of the run) shows the state is good. A disk or permission failure becomes one
    :class:`.checkpoint.RunFolderError`; the half-written folder is removed.

    Raises:
        NonFiniteLossError: a parameter, buffer or optimizer state is NaN / inf: the state is not saved.
    """
    acc, state = ctx.accelerator, ctx.state
    bad = nonfinite_state(acc.unwrap_model(ctx.model), ctx.optimizer)
    if acc.num_processes > 1:  # FSDP shards: each process checks its own
        bad = sorted({name for names in gather_object([bad]) for name in names})
    if bad:
        ctx.checkpoints.reject('the state held NaN / inf')
        where = (f'epoch {state.epoch + 1}, batch {state.batch_in_epoch}' if state.batch_in_epoch
                 else f'the end of epoch {state.epoch}')
        raise NonFiniteLossError(
            f'the training state after update {state.update} ({where}, phase {state.phase!r}) holds NaN / inf '
            f'values in {", ".join(bad[:3])}'
            f'{f" and {len(bad) - 3} more" if len(bad) > 3 else ""}; it was not saved. {last_good_note(ctx)}')
    state.elapsed = elapsed
    state.next_checkpoint = acc.save_iteration + 1
    folder = Path(acc.project_dir) / 'checkpoints' / f'checkpoint_{acc.save_iteration}'
    try:
        path = acc.save_state()
        acc.wait_for_everyone()
        if acc.is_main_process:
            mark_complete(path, update=state.update, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch)
    except Exception as e:
        error = write_error(e, folder, f'saving checkpoint {folder}', _keep_note(ctx))
        if error is None:
            raise
        if acc.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint: give its space back
        raise error from e
    ctx.checkpoints.saved(Path(path), confirmed=False)


def _keep_note(ctx: RunContext) -> str:
    if ctx.last_checkpoint:
        return f'the last good checkpoint {ctx.last_checkpoint} is kept: fix that, then continue with --resume auto'
    return 'no checkpoint had been saved yet: fix that and start again'


def _write(ctx: RunContext, what: str, path: Path, write: Callable[[], Any]) -> Any:
    """Run ``write`` (config, final model, results); a disk or permission failure becomes one RunFolderError."""
    try:
        return write()
    except Exception as e:
        error = write_error(e, path, f'writing {what}', _keep_note(ctx))
        if error is None:
            raise
        raise error from e


def _epoch_record(ctx: RunContext, epoch: int, losses: Dict[str, float], metrics: Dict[str, Any],
                  epoch_time: float) -> None:
    state = ctx.state
    lr = max(g['lr'] for g in ctx.optimizer.param_groups)
    entry = {'epoch': epoch + 1, 'phase': state.phase, 'updates': state.update, 'lr': lr,
             'train_loss': losses.get('loss'), 'train_ce': losses.get('ce'),
             'aux_entropy': losses.get('aux_entropy'), 'aux_balance': losses.get('aux_balance'),
             'aux_z_loss': losses.get('aux_z_loss'), 'eval_loss': metrics['loss'],
             **{key: metrics[key] for key in ctx.task.metric_keys}, 'epoch_time_s': round(epoch_time, 3)}
    for key, value in losses.items():  # a task's own loss parts (detection: torchvision's)
        if key not in ('loss', 'ce') and not key.startswith('aux_'):
            entry[f'train_{key}'] = value
    state.history.append(entry)
    layers = {name: {k: r[k] for k in ('usage_entropy', 'imbalance', 'mean_router_entropy', 'dead_experts',
                                       'usage_share', 'usage_counts', 'dropped_fraction', 'balance_bias') if k in r}
              for name, r in metrics['routing'].items()}
    state.routing_history.append({'epoch': epoch + 1, 'phase': state.phase, 'layers': layers})
    scalars = {f'train/{k}': v for k, v in losses.items()}
    scalars.update({f'eval/{key}': metrics[key] for key in ctx.task.metric_keys
                    if isinstance(metrics[key], (int, float))})
    if metrics['loss'] is not None:
        scalars['eval/loss'] = metrics['loss']
    for name, r in metrics['routing'].items():
        scalars[f'routing/{name}/usage_entropy'] = r['usage_entropy']
        scalars[f'routing/{name}/dead_experts'] = len(r['dead_experts'])
        if r['imbalance'] is not None:
            scalars[f'routing/{name}/imbalance'] = r['imbalance']
    ctx.accelerator.log(scalars, step=state.update)
    summary = routing_summary(metrics['routing'])
    routing = (f", usage entropy {summary['mean_usage_entropy']:.3f}, dead experts {summary['dead_experts']}"
               if summary else '')
    ctx.accelerator.print(f"epoch {epoch + 1}/{ctx.cfg.schedule.epochs} [{state.phase}] "
                          f"train loss {entry['train_loss']:.4f}, "
                          + (f"eval loss {metrics['loss']:.4f}, " if metrics['loss'] is not None else '')
                          + f"{ctx.task.describe(metrics)}{routing} ({epoch_time:.1f}s)")


def train(cfg: TrainConfig, model_fn: Optional[ModelFn] = None, task: Optional[Task] = None) -> Dict[str, Any]:
    """Run (or resume) training as configured by ``cfg`` (see :func:`.config.parse_args`).

    ``model_fn(cfg, data) -> (model, frozen_norms)`` replaces ``timm.create_model`` (fine-tuning uses it);
    ``frozen_norms`` are norm layers kept in eval mode while training. ``task`` (default: classification with
    ``model_fn``) is what is trained and measured (:class:`Task`; detection / segmentation:
    :mod:`pce_timm.tasks.loop`).

    Returns:
        The content of ``results.json`` (every process gets the same dict; only the main one writes files).

    Raises:
        pce_timm.data.DatasetNotFoundError: the dataset is missing or unreadable (before training starts).
        RecipeError: a config value does not fit the model or the output folder.
        NonFiniteLossError: the loss or the state became NaN/inf; the last good checkpoint is kept and named.
        RunFolderError: the output folder is in use by another run, cannot be written (read-only, disk full), or
            holds no checkpoint that loads (``--resume``).
    """
    started = time.time()
    if task is not None and model_fn is not None:
        raise ValueError('train: pass model_fn or task, not both (a task builds its own model)')
    task = task or ClassificationTask(model_fn)
    ctx = _setup(cfg, task=task)
    try:
        return _run(ctx, started)
    except OSError as e:  # any other write into the run folder (the trackers' logs): what and where, too
        error = write_error(e, Path(cfg.checkpoint.output_dir), 'training', _keep_note(ctx))
        if error is None:
            raise
        raise error from e
    finally:
        ctx.lock.release()


def _run(ctx: RunContext, started: float) -> Dict[str, Any]:
    cfg, task, acc, state = ctx.cfg, ctx.task, ctx.accelerator, ctx.state
    epochs = cfg.schedule.epochs
    output_dir = Path(cfg.checkpoint.output_dir)
    if acc.is_main_process:
        _write(ctx, 'the config', output_dir / 'config.yaml',
               lambda: save_config(cfg, output_dir, extra=task.config()))
    config = {**config_dict(cfg), **task.config()}
    acc.init_trackers(output_dir.name, config=flat_hparams(config))
    session_start, base_elapsed = time.time(), state.elapsed

    def elapsed() -> float:
        return base_elapsed + time.time() - session_start

    def on_update(update: int) -> None:
        steps = cfg.checkpoint.checkpoint_steps
        if steps and update % steps == 0 and state.batch_in_epoch < len(ctx.loaders['train']):
            _save_checkpoint(ctx, elapsed())

    try:
        for epoch in range(state.epoch, epochs):
            state.epoch = epoch
            epoch_start = time.time()
            losses = train_one_epoch(ctx, epoch, on_update)
            metrics = task.evaluate(ctx, desc=f'eval {epoch + 1}/{epochs}')
            _epoch_record(ctx, epoch, losses, metrics, time.time() - epoch_start)
            if (epoch + 1) % cfg.checkpoint.checkpoint_every == 0 or epoch + 1 == epochs:
                _save_checkpoint(ctx, elapsed())
        ctx.checkpoints.confirm()  # the run is done: its last checkpoint is its result
        _write(ctx, 'the final model', output_dir / 'model', lambda: task.export(ctx, output_dir / 'model'))
        results = _results(ctx, elapsed(), time.time() - started, config)
        results.update(task.finish(ctx, results, output_dir))
        if acc.is_main_process:
            _write(ctx, RESULTS_FILE, output_dir / RESULTS_FILE,
                   lambda: write_json_atomic(results, output_dir / RESULTS_FILE))
        acc.print(f'{task.describe(results)}; wrote {output_dir / RESULTS_FILE} and {output_dir / "model"}')
        return results
    finally:
        acc.end_training()


def _results(ctx: RunContext, wall_time: float, session_time: float, config: Dict[str, Any]) -> Dict[str, Any]:
    state, cfg = ctx.state, ctx.cfg
    final = state.history[-1] if state.history else {}
    last_routing = state.routing_history[-1]['layers'] if state.routing_history else {}
    model = ctx.accelerator.unwrap_model(ctx.model)
    return {
        'status': 'completed',
        'model': cfg.model.name,
        'dataset': ctx.data.info['name'],
        'eval_split': cfg.data.eval_split,
        **{key: final.get(key) for key in ctx.task.metric_keys},
        'loss': final.get('eval_loss'),
        'train_loss': final.get('train_loss'),
        'epochs': state.epoch,
        'updates': state.update,
        'num_params': sum(p.numel() for p in model.parameters()),
        'wall_time_s': round(wall_time, 3),
        'session_time_s': round(session_time, 3),
        'num_processes': ctx.accelerator.num_processes,
        'routing': last_routing,
        'routing_summary': routing_summary(last_routing),
        'routing_history': state.routing_history,
        'history': state.history,
        'keys_initialised': state.keys_initialised,
        'model_dir': 'model',
        'config': config,
        'versions': {'pce_timm': pce_timm.__version__, 'timm': timm.__version__, 'torch': torch.__version__,
                     'accelerate': accelerate.__version__, 'python': platform.python_version()},
    }
