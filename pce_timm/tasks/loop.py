"""Detection and segmentation runs through :func:`pce_timm.train.trainer.train`: the same accelerate loop,
recipes, phases, aux routing losses, K-Means key init, checkpoints / resume and trackers as classification,
with a :class:`~pce_timm.train.trainer.Task` per dense task.

A run folder is a classification run's (``config.yaml``, ``checkpoints/``, ``logs/``, ``results.json``) with
``model/`` holding ``dense_config.json`` (what :func:`load_dense_model` rebuilds: task, arch, backbone, classes,
model kwargs, image size) and ``model.safetensors``, and ``routing.png`` (each PCE layer's patch grid coloured
by expert over validation canvases, with their boxes / masks) for a PCE backbone.

``results.json`` holds ``map_50`` / ``map`` (detection) or ``miou`` (segmentation) of the final epoch on the
eval split, ``per_class`` values, per-PCE-layer ``routing`` statistics, ``wall_time_s`` and the config.
"""
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pce_timm.layers import AuxLossWeights, collect_aux_loss, pce_layers
from pce_timm.progress import progress_bar
from pce_timm.train.checkpoint import write_json_atomic
from pce_timm.train.config import TrainConfig, model_kwargs
from pce_timm.train.flags import DENSE_IMG_SIZE, build_dense_parser
from pce_timm.train.metrics import routing_records, summarize_usage
from pce_timm.train.recipe import RecipeError, load_recipe, parse_namespace
from pce_timm.train.trainer import RunContext, Task, train
from pce_timm.utils import atomic_folder

from .data import DenseData, build_dense_loaders, stacked_collate
from .detection import create_detector
from .metrics import IGNORE_INDEX, DetectionMetric, SegmentationMetric
from .segmentation import create_segmenter

__all__ = ['DetectionTask', 'SegmentationTask', 'build_dense_parser', 'parse_dense_args', 'train_dense',
           'load_dense_model', 'evaluate_dense_run', 'DENSE_CONFIG_FILE', 'DENSE_KEYS']

_logger = logging.getLogger(__name__)
DENSE_CONFIG_FILE = 'dense_config.json'
# recipe keys of the dense scripts beyond train.py's
DENSE_KEYS = ('arch', 'output_stride', 'fpn_channels', 'decoder_channels')
DEFAULT_IMG_SIZE = DENSE_IMG_SIZE


def parse_dense_args(task: str, argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, Dict[str, Any]]:
    """``(TrainConfig, dense options)`` from argv and a ``--config`` recipe (also a run's ``config.yaml``)."""
    parser = build_dense_parser(task)
    values = vars(parse_namespace(argv, parser))
    dense = {key: values.pop(key) for key in DENSE_KEYS}
    return TrainConfig.from_flat(values), dense


class _DenseCriterion:
    """Task loss + the weighted aux routing losses; ``step`` is the loop's one call (as classification's)."""
    mixup = None

    def __init__(self, task: str, cfg: TrainConfig):
        self.task = task
        self.weights = AuxLossWeights(entropy=cfg.loss.aux_entropy, balance=cfg.loss.aux_balance,
                                      z_loss=cfg.loss.aux_z_loss)

    def step(self, model: nn.Module, x: Any, y: Any):
        if self.task == 'detection':
            loss_dict = model(list(x), list(y))  # torchvision's losses, summed as torchvision's references do
            task_loss = sum(loss_dict.values())
            parts = {f'det_{k}': v.detach() for k, v in loss_dict.items()}
        else:
            task_loss = F.cross_entropy(model(x).float(), y, ignore_index=IGNORE_INDEX)
            parts = {}
        aux, aux_parts = collect_aux_loss(model, self.weights)
        return task_loss + aux, {'ce': task_loss.detach(), **parts,
                                 **{f'aux_{k}': v.detach() for k, v in aux_parts.items()}}


class _DenseTask(Task):
    prepare_eval = False  # each process evaluates its own shard; torchmetrics gathers the states

    def __init__(self, dense: Dict[str, Any]):
        self.dense = dict(dense)

    def load_data(self, cfg: TrainConfig) -> DenseData:
        d = cfg.data
        return DenseData(d.dataset, d.data_dir, self.name, d.img_size or DEFAULT_IMG_SIZE, d.eval_split,
                         d.max_train_samples, d.max_eval_samples, cfg.seed)

    def model_config(self, cfg: TrainConfig, data: DenseData) -> Dict[str, Any]:
        """What :func:`create_dense_model` needs to rebuild the model (saved as ``dense_config.json``)."""
        return {'task': self.name, 'arch': self.dense['arch'], 'backbone': cfg.model.name,
                'num_classes': data.num_classes, 'class_names': list(data.classes), 'img_size': data.img_size[0],
                'in_chans': data.in_chans, 'output_stride': self.dense.get('output_stride'),
                'fpn_channels': self.dense.get('fpn_channels'), 'decoder_channels': self.dense.get('decoder_channels'),
                'pretrained_backbone': cfg.model.pretrained,
                'model_kwargs': _jsonable(model_kwargs(cfg.model))}

    def build_model(self, cfg: TrainConfig, data: DenseData) -> Tuple[nn.Module, List[nn.Module]]:
        try:
            model = create_dense_model(self.model_config(cfg, data))
        except ValueError as e:
            raise RecipeError(f'model: {e}') from None
        warn_small_patch_grids(model, data.img_size[0], self.name)
        return model, []

    def build_loaders(self, cfg: TrainConfig, data: DenseData) -> Dict[str, Any]:
        import os
        rank, world = int(os.environ.get('RANK', '0')), int(os.environ.get('WORLD_SIZE', '1'))
        return build_dense_loaders(data, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.data.workers,
                                   hflip=0.0 if cfg.augment.no_aug else cfg.augment.hflip, rank=rank, world=world)

    def criterion(self, cfg: TrainConfig, data: DenseData) -> _DenseCriterion:
        return _DenseCriterion(self.name, cfg)

    def config(self) -> Dict[str, Any]:
        return {key: self.dense.get(key) for key in DENSE_KEYS}

    def evaluate(self, ctx: RunContext, desc: str) -> Dict[str, Any]:
        acc = ctx.accelerator
        model = acc.unwrap_model(ctx.model)
        if acc.num_processes > 1:
            # every rank updated its BatchNorm statistics on its own last batch; evaluate (and export) rank 0's,
            # as DDP's own forward would broadcast them
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        return evaluate_dense(model, ctx.loaders['eval'], self.name, ctx.data.classes,
                              acc.device, progress=ctx.cfg.log.progress and acc.is_local_main_process, desc=desc,
                              reduce=acc.reduce if acc.num_processes > 1 else None)

    def export(self, ctx: RunContext, model_dir: Path) -> None:
        acc = ctx.accelerator
        state_dict = acc.get_state_dict(ctx.model)
        if acc.is_main_process:
            save_dense_model(state_dict, self.model_config(ctx.cfg, ctx.data), model_dir)
        acc.wait_for_everyone()

    def finish(self, ctx: RunContext, metrics: Dict[str, Any], output_dir: Path) -> Dict[str, Any]:
        acc = ctx.accelerator
        extra: Dict[str, Any] = {'task': self.name, 'arch': self.dense['arch']}
        if acc.is_main_process:
            model = acc.unwrap_model(ctx.model)
            if pce_layers(model):
                from .pictures import write_routing_picture
                path = write_routing_picture(model, ctx.data, output_dir / 'routing.png', acc.device)
                extra['routing_picture'] = path.name
        acc.wait_for_everyone()
        return extra


class DetectionTask(_DenseTask):
    """Object detection (torchvision detectors on the backbone): ``map_50``, ``map``."""
    name = 'detection'
    metric_keys = ('map_50', 'map', 'per_class')

    def describe(self, metrics: Dict[str, Any]) -> str:
        return f"map_50 {_fmt(metrics.get('map_50'))}, map {_fmt(metrics.get('map'))}"


class SegmentationTask(_DenseTask):
    """Semantic segmentation (smp segmenters on the backbone): ``miou``."""
    name = 'segmentation'
    metric_keys = ('miou', 'per_class')

    def describe(self, metrics: Dict[str, Any]) -> str:
        return f"miou {_fmt(metrics.get('miou'))}"


TASKS = {'detection': DetectionTask, 'segmentation': SegmentationTask}


def _fmt(value: Optional[float]) -> str:
    return 'n/a' if value is None else f'{value:.4f}'


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


MIN_GRID = 4  # patches per side every PCE layer should route at the task's resolution


@torch.no_grad()
def patch_grids(model: nn.Module, img_size: int, task: str) -> Dict[str, Tuple[int, int]]:
    """Each PCE layer's patch grid for one ``img_size`` image (one eval forward; the RNGs are left as they were)."""
    layers = pce_layers(model)
    if not layers:
        return {}
    was_training = model.training
    with torch.random.fork_rng(devices=[]):
        model.eval()
        x = torch.zeros(1, 3, img_size, img_size, device=next(model.parameters()).device)
        model(list(x) if task == 'detection' else x)
    model.train(was_training)
    return {name: tuple(layer.last_grid_size) for name, layer in layers.items()}


def warn_small_patch_grids(model: nn.Module, img_size: int, task: str) -> Dict[str, Tuple[int, int]]:
    """Log a warning when a PCE layer routes fewer than 4x4 patches: then position barely matters to routing."""
    grids = patch_grids(model, img_size, task)
    small = {name: grid for name, grid in grids.items() if min(grid) < MIN_GRID}
    if small:
        _logger.warning(
            'PCE layers route fewer than %dx%d patches at %d px: %s. Positional routing needs a real grid: raise '
            '--img-size or give those stages smaller patches (--model-kwargs patch_size=[...], one per stage, in '
            'px of the stage output map; scripts/configs/dense_*.yaml: [8, 4, 2, 2] with pce_stages [1, 2] at 128 px)',
            MIN_GRID, MIN_GRID, img_size, ', '.join(f'{n} {g[0]}x{g[1]}' for n, g in small.items()))
    return grids


def create_dense_model(config: Dict[str, Any]) -> nn.Module:
    """The detector / segmenter a ``dense_config.json`` describes (fresh weights)."""
    kwargs = dict(config.get('model_kwargs') or {})
    for key in ('pce_stages', 'patch_size', 'channels'):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    if config['task'] == 'detection':
        return create_detector(config['backbone'], config['num_classes'], config['arch'], img_size=config['img_size'],
                               pretrained_backbone=config.get('pretrained_backbone', False),
                               in_chans=config.get('in_chans', 3), fpn_channels=config.get('fpn_channels') or 128,
                               **kwargs)
    return create_segmenter(config['backbone'], config['num_classes'], config['arch'],
                            in_chans=config.get('in_chans', 3), output_stride=config.get('output_stride'),
                            pretrained_backbone=config.get('pretrained_backbone', False),
                            decoder_channels=config.get('decoder_channels'), **kwargs)


def save_dense_model(state_dict: Dict[str, torch.Tensor], config: Dict[str, Any], model_dir: Path) -> Path:
    """``dense_config.json`` + ``model.safetensors``, written atomically (the folder is the old or the new one)."""
    with atomic_folder(model_dir) as tmp:
        (tmp / DENSE_CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / 'model.safetensors'))
    return Path(model_dir)


def load_dense_model(model_dir: Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a saved dense model (a run's ``model/`` folder or the run folder itself) with its weights."""
    model_dir = Path(model_dir)
    if not (model_dir / DENSE_CONFIG_FILE).is_file() and (model_dir / 'model' / DENSE_CONFIG_FILE).is_file():
        model_dir = model_dir / 'model'
    if not (model_dir / DENSE_CONFIG_FILE).is_file():
        raise FileNotFoundError(f'{model_dir}: no {DENSE_CONFIG_FILE} here or in model/; pass the folder of a '
                                'train_detection.py / train_segmentation.py run')
    config = json.loads((model_dir / DENSE_CONFIG_FILE).read_text())
    model = create_dense_model(config)
    model.load_state_dict(load_file(str(model_dir / 'model.safetensors')))
    return model, config


@torch.no_grad()
def evaluate_dense(model: nn.Module, loader, task: str, classes: Sequence[str], device, progress: bool = True,
                   desc: str = 'eval', reduce=None) -> Dict[str, Any]:
    """The task metric over this process's eval shard (torchmetrics gathers across processes) and the routing
    statistics per PCE layer (``reduce``, e.g. ``accelerator.reduce``, sums them across processes).

    Returns ``loss`` (segmentation: CE with 255 ignored; detection: None, torchvision's detectors give no loss in
    eval), ``map_50`` / ``map`` or ``miou``, ``per_class`` and ``routing``.
    """
    model.eval()
    layers = pce_layers(model)
    metric = (DetectionMetric(classes) if task == 'detection' else SegmentationMetric(classes)).to(device)
    counts: Dict[str, torch.Tensor] = {}
    entropy: Dict[str, torch.Tensor] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in progress_bar(loader, desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        if task == 'detection':
            x = [image.to(device) for image in x]
            y = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in y]
            metric.update(model(x), y)
            batch = len(x)
        else:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction='sum').double() / (
                y[0].numel())
            metric.update(logits, y)
            batch = x.shape[0]
        images += batch
        for name, record in routing_records(layers).items():
            counts[name] = counts.get(name, 0) + record['counts'].double().sum(0)
            entropy[name] = entropy.get(name, 0) + record['entropy'].double().sum()
    out = metric.compute()
    if reduce is not None:
        images = reduce(images, reduction='sum')
        loss_sum = reduce(loss_sum, reduction='sum')
        counts = {k: reduce(v.contiguous(), reduction='sum') for k, v in sorted(counts.items())}
        entropy = {k: reduce(v.reshape(1), reduction='sum').reshape(()) for k, v in sorted(entropy.items())}
    n = max(float(images), 1.0)
    out['loss'] = None if task == 'detection' else round(float(loss_sum) / n, 6)
    out['num_samples'] = int(images)
    out['routing'] = {name: summarize_usage(counts[name].cpu(), float(entropy[name]) / n) for name in counts}
    return out


def train_dense(task: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``scripts/train_detection.py`` / ``train_segmentation.py``: parse, then :func:`~pce_timm.train.trainer.train`
    with the task."""
    cfg, dense = parse_dense_args(task, argv)
    return train(cfg, task=TASKS[task](dense))


def evaluate_dense_run(run_dir: Path, split: Optional[str] = None, data_dir: Optional[str] = None,
                       batch_size: int = 16, max_samples: Optional[int] = None, progress: bool = True,
                       device: str = 'cpu') -> Dict[str, Any]:
    """Evaluate a saved dense run on its own: the run's ``model/`` on its dataset (``split`` default: the run's
    eval split), with the same metrics as training's final epoch."""
    run_dir = Path(run_dir)
    config_file = run_dir / 'config.yaml'
    model, model_config = load_dense_model(run_dir)
    if not config_file.is_file():
        raise FileNotFoundError(f'{run_dir}: no config.yaml; pass a run folder of the dense training scripts')
    recipe = load_recipe(config_file, build_dense_parser(model_config['task']))
    data = DenseData(recipe['dataset'], data_dir or recipe.get('data_dir'), model_config['task'],
                     model_config['img_size'], split or recipe.get('eval_split', 'val'),
                     max_eval_samples=max_samples, seed=recipe.get('seed', 0), train=False)
    if tuple(data.classes) != tuple(model_config['class_names']):
        raise ValueError(f'{run_dir}: the model was trained on classes {model_config["class_names"]} but the '
                         f'data has {list(data.classes)}')
    loaders = build_dense_loaders(data, batch_size, batch_size, 0)
    model.to(device)
    metrics = evaluate_dense(model, loaders['eval'], model_config['task'], data.classes, torch.device(device),
                             progress=progress, desc=f'eval {run_dir.name}')
    result = {'run': str(run_dir), 'split': split or recipe.get('eval_split', 'val'), **metrics}
    write_json_atomic(result, run_dir / f'eval_{result["split"]}.json')
    return result


__all__ += ['create_dense_model', 'evaluate_dense', 'save_dense_model', 'stacked_collate', 'TASKS']
