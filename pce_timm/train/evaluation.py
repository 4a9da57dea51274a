"""Evaluate a trained model on a dataset split: top-1 / top-5 / loss and per-PCE-layer routing statistics.

Used by ``scripts/evaluate.py``; runs under accelerate like training (``accelerate launch`` splits the data,
``gather_for_metrics`` counts every sample once).
"""
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from accelerate import Accelerator

from pce_timm.data import create_dataset_transform, create_loader, dataset_info, load_image_dataset

from .checkpoint import write_json_atomic
from .engine import evaluate
from .metrics import routing_summary
from .models import load_model, resolve_model_source, source_name

__all__ = ['evaluate_model', 'format_table', 'default_output']


def evaluate_model(
        source: str,
        dataset: str,
        split: str = 'test',
        data_dir: Optional[str] = None,
        batch_size: int = 256,
        max_samples: Optional[int] = None,
        workers: int = 0,
        mixed_precision: str = 'no',
        seed: int = 0,
        progress: bool = True,
        accelerator: Optional[Accelerator] = None,
) -> Dict[str, Any]:
    """Load ``source`` (see :mod:`.models`), evaluate it on ``dataset``/``split`` and return the metrics.

    The preprocessing is the model's own (its ``pretrained_cfg``: size, mean, std, crop), which for models
    trained here is the training run's. The dataset must have the model's number of classes.

    Raises:
        pce_timm.data.DatasetNotFoundError: the split is missing or unreadable (before the model is loaded).
        ValueError: the model's classes do not match the dataset's.
    """
    info = dataset_info(dataset)
    data = load_image_dataset(dataset, split, data_dir)
    model = load_model(source)
    if model.num_classes != info['num_classes']:
        raise ValueError(f'model: {source} predicts {model.num_classes} classes but {info["name"]} has '
                         f'{info["num_classes"]}; fine-tune it first (scripts/finetune.py)')
    accelerator = accelerator or Accelerator(mixed_precision=mixed_precision)
    transform = create_dataset_transform(model, is_training=False)
    loader = create_loader(data, transform, batch_size=batch_size, num_workers=workers, seed=seed,
                           max_samples=max_samples)
    model, loader = accelerator.prepare(model, loader)
    start = time.time()
    metrics = evaluate(model, loader, accelerator, info['num_classes'], progress, desc=f'eval {info["name"]}')
    return {
        'model': source,
        'dataset': info['name'],
        'split': split,
        'top1': metrics['top1'],
        'top5': metrics['top5'],
        'loss': metrics['loss'],
        'num_samples': metrics['num_samples'],
        'num_params': sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        'eval_time_s': round(time.time() - start, 3),
        'num_processes': accelerator.num_processes,
        'routing': metrics['routing'],
        'routing_summary': routing_summary(metrics['routing']),
    }


def default_output(source: str, dataset: str, split: str) -> Path:
    """``<run>/eval-<dataset>-<split>.json`` for a run / model / checkpoint folder, else in the current folder."""
    name = f'eval-{dataset}-{split}.json'
    _, checkpoint = resolve_model_source(source)
    path = Path(source)
    if checkpoint is not None:
        return checkpoint.parent.parent / name
    if (path / 'model' / 'config.json').is_file():
        return path / name
    if (path / 'config.json').is_file():
        return path.parent / name
    return Path(f'eval-{source_name(source)}-{dataset}-{split}.json')


def _fmt(value: Any) -> str:
    if value is None:
        return 'inf'
    if isinstance(value, float):
        text = f'{value:.3f}'
        return '0.000' if text == '-0.000' else text  # a tiny negative (or -0.0) prints as zero
    if isinstance(value, list):
        return str(len(value))
    return str(value)


def format_table(rows: List[List[Any]], header: List[str], align: Optional[str] = None) -> str:
    """A plain fixed-width text table: the package's one (``report.md``'s markdown tables are in
    :mod:`pce_timm.analysis.report`).

    Args:
        rows: cells per row; floats print with 3 decimals, None as 'inf' (an infinite imbalance), lists as
            their length.
        header: one name per column.
        align: one of '<' (left) / '>' (right) per column; default all left.
    """
    align = align or '<' * len(header)
    if len(align) != len(header) or set(align) - {'<', '>'}:
        raise ValueError(f"align: got {align!r}; accepted: one '<' or '>' per column ({len(header)})")
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) if a == '<' else c.rjust(w) for c, w, a in zip(row, widths, align, strict=True))
             for row in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def results_table(results: Dict[str, Any]) -> str:
    """The metrics line plus one row per PCE layer (usage entropy, imbalance, router entropy, dead experts)."""
    head = (f"{results['model']} on {results['dataset']}/{results['split']} ({results['num_samples']} images): "
            f"top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  loss {results['loss']:.4f}")
    if not results['routing']:
        return head
    rows = [[name, r['usage_entropy'], r['imbalance'], r['mean_router_entropy'], r['dead_experts']]
            for name, r in results['routing'].items()]
    table = format_table(rows, ['layer', 'usage entropy', 'imbalance', 'router entropy', 'dead experts'])
    return f'{head}\n\n{table}'


def save_results(results: Dict[str, Any], path: Path) -> Path:
    return write_json_atomic(results, path)
