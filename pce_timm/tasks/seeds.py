"""Detection / segmentation runs of several seeds, side by side: mean +- sample std per group of runs.

    summary = seed_summary({'PCE': [Path('runs/seg-pce-s0'), ...], 'dense': [...]}, report_split='test')
    print(format_seed_table(summary))

Each run folder is one ``train_detection.py`` / ``train_segmentation.py`` run: its ``results.json`` gives the
metrics on the eval split it was trained with (the split choices are made on), the train time and the routing
summary, and its ``eval_<split>.json`` (``evaluate_dense.py RUN_DIR --split test``) the metrics reported.
"""
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..utils import markdown_table

__all__ = ['METRICS', 'format_seed_table', 'seed_summary']

METRICS = {'detection': ('map_50', 'map'), 'segmentation': ('miou',)}


def _read(path: Path, what: str) -> Dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: {what}')
    return json.loads(path.read_text(encoding='utf-8'))


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) >= 2 else None,
            'values': list(values)}


def seed_summary(groups: Mapping[str, Sequence[Path]], report_split: str = 'test') -> Dict[str, Any]:
    """Per group: each metric on the run's eval split (``select``) and on ``report_split`` (``report``), train
    time, params, the routing summary's worst imbalance and mean usage entropy, each as mean / std / values.

    Raises:
        FileNotFoundError: A run folder without ``results.json`` or ``eval_<report_split>.json`` (the message
            gives the command that writes it).
        ValueError: Runs of different tasks, an unfinished run, or a group whose runs share a seed.
    """
    out: Dict[str, Any] = {'report_split': report_split, 'groups': {}}
    tasks = set()
    for name, runs in groups.items():
        rows: List[Dict[str, Any]] = []
        for run in map(Path, runs):
            results = _read(run / 'results.json', 'not a finished train_detection.py / train_segmentation.py run')
            report = _read(run / f'eval_{report_split}.json',
                           f'run python scripts/evaluate_dense.py {run} --split {report_split}')
            if results.get('status') != 'completed':
                raise ValueError(f'{run}: status {results.get("status")!r}; finish it with --resume first.')
            tasks.add(results['task'])
            rows.append({'run': str(run), 'seed': results['config']['seed'], 'results': results, 'report': report})
        seeds = [r['seed'] for r in rows]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f'group {name!r}: runs share a seed ({seeds}); one run per seed.')
        if len(tasks) > 1:
            raise ValueError(f'runs of different tasks ({sorted(tasks)}) cannot share a table.')
        task = next(iter(tasks))
        group: Dict[str, Any] = {'runs': [r['run'] for r in rows], 'seeds': seeds, 'task': task,
                                 'eval_split': rows[0]['results']['eval_split']}
        for metric in METRICS[task]:
            group[f'select_{metric}'] = _stats([r['results'][metric] for r in rows])
            group[f'report_{metric}'] = _stats([r['report'][metric] for r in rows])
        group['train_time_s'] = _stats([r['results']['wall_time_s'] for r in rows])
        group['params'] = rows[0]['results']['num_params']
        routing = [r['results'].get('routing_summary') or {} for r in rows]
        if all(routing):
            group['imbalance'] = _stats([r['max_imbalance'] for r in routing])
            group['usage_entropy'] = _stats([r['mean_usage_entropy'] for r in routing])
            group['dead_experts'] = max(r['dead_experts'] for r in routing)
        out['groups'][name] = group
    out['task'] = next(iter(tasks)) if tasks else None
    return out


def _pm(stats: Optional[Dict[str, Any]], digits: int = 4) -> str:
    if not stats:
        return '-'
    std = '' if stats['std'] is None else f' ± {stats["std"]:.{digits}f}'
    return f'{stats["mean"]:.{digits}f}{std}'


def format_seed_table(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per group, each metric on the selection split and the report split, then cost."""
    metrics = METRICS[summary['task']]
    groups = summary['groups']
    first = next(iter(groups.values()))
    headers = ['backbone', 'seeds'] + [f'{m} ({first["eval_split"]})' for m in metrics] + [
        f'{m} ({summary["report_split"]})' for m in metrics] + ['params', 'train time s', 'imbalance',
                                                                 'usage entropy', 'dead experts']
    rows = []
    for name, g in groups.items():
        rows.append([name, str(len(g['seeds']))] + [_pm(g[f'select_{m}']) for m in metrics]
                    + [_pm(g[f'report_{m}']) for m in metrics]
                    + [f'{g["params"]:,}', _pm(g['train_time_s'], 0), _pm(g.get('imbalance'), 2),
                       _pm(g.get('usage_entropy'), 3), str(g.get('dead_experts', '-'))])
    return markdown_table(headers, rows, align='<' + '>' * (len(headers) - 1))
