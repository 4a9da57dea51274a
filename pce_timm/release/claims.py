"""What a pushed model card may claim: the numbers of the weights being shipped, and nothing else.

A card's numbers come from a catalogue entry (``model_cards/*.yaml``, written by ``make release`` from the
runs it trains) or, for a user's own run without an entry, from that run's records. Either way they must be
the shipped weights' own:

- an entry's headline top-1 / top-5 must equal an evaluation of these weights on the entry's dataset and split
  (:func:`check_card_claims`), else the push is refused with the two numbers side by side;
- a run without an entry gets a data-first card built from its ``results.json`` and config
  (:func:`data_card`): dataset, recipe, top-1 / top-5, routing statistics per PCE layer, the command.

The evaluations of a checkpoint (:func:`shipped_evaluations`) are the files next to it: ``eval_results.json``
(a release's fresh evaluation), ``eval-<dataset>-<split>.json`` (``scripts/evaluate.py``) and the run's
``results.json`` (its final epoch, on its eval split).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pce_timm.hub.release import EVAL_RESULTS_NAME, RESULTS_NAME, ReleaseSource
from pce_timm.utils import markdown_table

from .cards import CardDataError, ModelEntry, Result

__all__ = ['Evaluation', 'check_card_claims', 'data_card', 'shipped_evaluations', 'shipped_records']

TOLERANCE = 0.005  # cards print two decimals


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the shipped weights, read from ``path``."""
    path: Path
    dataset: str
    split: str
    top1: float
    top5: Optional[float]
    routing: Dict[str, Any] = field(default_factory=dict)
    routing_summary: Dict[str, Any] = field(default_factory=dict)
    record: Dict[str, Any] = field(default_factory=dict)  # the whole file

    def describe(self) -> str:
        top5 = '' if self.top5 is None else f', top-5 {self.top5:.2f}'
        return f'top-1 {self.top1:.2f}{top5} on {self.dataset}/{self.split} ({self.path})'


def shipped_evaluations(source: ReleaseSource) -> List[Evaluation]:
    """Every evaluation recorded next to the checkpoint, the freshest kind first (see the module docstring)."""
    folders = _unique_paths([source.config_path.parent, source.config_path.parent.parent]
                            + ([source.results_path.parent] if source.results_path else []))
    found: List[Evaluation] = []
    for folder in folders:
        for path in [folder / EVAL_RESULTS_NAME, *sorted(folder.glob('eval-*.json'))]:
            evaluation = _read_evaluation(path, split_key='split')
            if evaluation is not None:
                found.append(evaluation)
    for folder in folders:
        evaluation = _read_evaluation(folder / RESULTS_NAME, split_key='eval_split')
        if evaluation is not None:
            found.append(evaluation)
    return found


def shipped_records(source: ReleaseSource, evaluations: Sequence[Evaluation]) -> Dict[str, Path]:
    """The run's records to ship next to the weights: ``{repo file name: local file}`` of the evaluations, the
    run's results.json and its config.yaml (the command of a data-first card reads it)."""
    records = {e.path.name: e.path for e in evaluations}
    if source.results_path is not None:
        records[RESULTS_NAME] = source.results_path
        config = source.results_path.parent / 'config.yaml'
        if config.is_file():
            records[config.name] = config
    return records


def check_card_claims(entry: ModelEntry, evaluations: Sequence[Evaluation]) -> None:
    """Refuse an entry whose headline numbers are not these weights' own.

    Raises:
        CardDataError: no evaluation of the weights on the entry's dataset and split, or one that gives other
            numbers (both are named, with what to do).
    """
    claim = entry.results[0]
    matching = [e for e in evaluations if _same_dataset(claim, e.dataset) and e.split == claim.split]
    if not matching:
        seen = '; '.join(e.describe() for e in evaluations) or 'none (no results.json or eval-*.json next to them)'
        raise CardDataError(
            f'{entry.source}: the card of {entry.name} claims top-1 {claim.top1.value:.2f} on {claim.dataset_name} '
            f'{claim.split}, but the weights being pushed have no evaluation there (evaluations found: {seen}). '
            f'Evaluate them: python scripts/evaluate.py --model RUN_DIR --dataset DATASET --split {claim.split}, or '
            f'push them under another --repo-id (a card is then built from their own results.json).')
    shipped = matching[0]
    differs = abs(shipped.top1 - claim.top1.value) > TOLERANCE
    if claim.top5 is not None and shipped.top5 is not None:
        differs = differs or abs(shipped.top5 - claim.top5.value) > TOLERANCE
    if differs:
        top5 = '' if claim.top5 is None else f', top-5 {claim.top5.value:.2f}'
        raise CardDataError(
            f'refusing to publish a card that its weights do not support: the card of {entry.name} '
            f'({entry.source}) claims top-1 {claim.top1.value:.2f}{top5} on {claim.dataset_name} {claim.split}; '
            f'the weights being pushed give {shipped.describe()}. Push the weights the card was made from '
            f'(releases/{entry.name}, written by make release), rerun make release for these, or push them under '
            f'another --repo-id.')


def data_card(repo_id: str, arch: str, results: Evaluation, config: Dict[str, Any]) -> str:
    """A model card built from a run's own records: what it was trained on and with, and what it measured.

    Args:
        repo_id: the Hub repo (its title).
        arch: the checkpoint's architecture.
        results: the run's ``results.json`` (:func:`shipped_evaluations`' last kind).
        config: the run's configuration (``results.json``'s ``config``).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    common = dict(task_type='image-classification', task_name='Image Classification', dataset_type=results.dataset,
                  dataset_name=results.dataset, dataset_split=results.split)
    eval_results = [EvalResult(metric_type='accuracy', metric_name='Top-1 Accuracy', metric_value=results.top1,
                               **common)]
    if results.top5 is not None:
        eval_results.append(EvalResult(metric_type='top_5_accuracy', metric_name='Top-5 Accuracy',
                                       metric_value=results.top5, **common))
    metadata = ModelCardData(library_name='timm', pipeline_tag='image-classification',
                             tags=['image-classification', 'timm', 'pce_timm', 'mixture-of-experts'],
                             metrics=['accuracy'], model_name=repo_id.split('/')[-1], eval_results=eval_results)
    record = results.record
    top5 = '-' if results.top5 is None else f'{results.top5:.2f}'
    lines = [
        f'# {repo_id}', '',
        f'A `{arch}` checkpoint trained with pce_timm (Positional '
        f'Convolution Experts for timm). Every number below comes from this run\'s own records (results.json, '
        f'shipped with the weights): the final epoch, evaluated on the split named.', '',
        '## Usage', '', '```python', 'import timm', 'import pce_timm  # registers the pce_* architectures', '',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()", '```', '',
        '## Results', '',
        markdown_table(['Dataset', 'Split', 'Top-1 (%)', 'Top-5 (%)', 'Epochs', 'Parameters'],
                       [[results.dataset, results.split, f'{results.top1:.2f}', top5, str(record.get('epochs', '-')),
                         f'{record["num_params"]:,}' if 'num_params' in record else '-']], '<<>>>>'),
    ]
    if results.routing:
        rows = [[name, _num(s.get('usage_entropy')), _num(s.get('imbalance')), str(len(s.get('dead_experts') or []))]
                for name, s in results.routing.items()]
        lines += ['', '## Routing statistics', '',
                  f'Per PCE layer on {results.dataset}/{results.split} (usage entropy: 1 = every expert equally used; '
                  'imbalance: busiest / least used expert; dead: experts no patch chose).', '',
                  markdown_table(['PCE layer', 'usage entropy', 'imbalance', 'dead experts'], rows, '<>>>')]
    lines += ['', '## Training', '', markdown_table(['setting', 'value'], _recipe_rows(config)), '',
              'Reproduce: `python scripts/train.py --config config.yaml` with the config.yaml shipped in this repo '
              '(the run\'s full configuration).', '']
    text = f'---\n{metadata.to_yaml()}\n---\n\n' + '\n'.join(lines)
    ModelCard(text)  # raises on invalid front matter
    return text


_RECIPE_KEYS = ('model', 'dataset', 'epochs', 'max_train_samples', 'batch_size', 'img_size', 'opt', 'lr',
                'weight_decay', 'sched', 'num_experts', 'top_k', 'router', 'pce_stages', 'patch_size', 'attention',
                'aux_balance', 'seed', 'pretrained')


def _recipe_rows(config: Dict[str, Any]) -> List[List[str]]:
    return [[key, f'`{json.dumps(config[key])}`'] for key in _RECIPE_KEYS if config.get(key) is not None]


def _num(value: Any) -> str:
    return '-' if value is None else f'{value:.3f}'


def _same_dataset(claim: Result, dataset: str) -> bool:
    from pce_timm.data.registry import get_dataset_spec

    try:
        spec = get_dataset_spec(dataset)
    except ValueError:
        return claim.dataset == dataset
    return claim.dataset in (spec.name, spec.hub_id)


def _read_evaluation(path: Path, split_key: str) -> Optional[Evaluation]:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
        return Evaluation(path, str(record['dataset']), str(record[split_key]), float(record['top1']),
                          None if record.get('top5') is None else float(record['top5']),
                          dict(record.get('routing') or {}), dict(record.get('routing_summary') or {}), record)
    except (ValueError, KeyError, TypeError):  # not an evaluation record: other JSON files may sit there too
        return None


def _unique_paths(paths: Sequence[Path]) -> List[Path]:
    return list(dict.fromkeys(p.resolve() for p in paths))
