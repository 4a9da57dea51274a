"""Model card data: ``model_cards/<family>.yaml`` loaded into checked dataclasses, and the measured numbers that
``make release`` writes back into it.

Cards are data first: every released model+tag is one entry in its family's YAML file, and every number in
it carries the command that produced it. Schema (``example.yaml`` is a complete, commented instance)::

    family: pce_resnet                  # file-level fields
    title: PCE-ResNet                   # optional heading, default: family
    description: ...                    # what the family is (Markdown)
    license: apache-2.0
    hf_org: pce-timm                    # repo_id default: {hf_org}/{model}.{tag}
    readme: true                        # list these models in the README table (default true)
    tags: [resnet]                      # optional, added to image-classification, timm, pce, mixture-of-experts
    paper: {title: ..., url: ..., bibtex: ...}   # optional
    models:
      - model: pce_resnet18             # timm architecture name
        tag: in1k                       # pretrained tag -> pce_resnet18.in1k
        repo_id: org/name               # optional, see hf_org
        summary: one line: what the architecture is
        params_m: {value: 11.7, command: ...}    # a number: {value, command}
        gmacs: {value: 1.8, command: ...}
        training:
          dataset: imagenet-1k          # Hub dataset id
          dataset_name: ImageNet-1k     # optional pretty name
          recipe: optimizer, schedule, augmentation (Markdown)
          command: the training command
        results:                        # first one = headline numbers in the README table
          - dataset: imagenet-1k
            dataset_name: ImageNet-1k
            split: validation
            img_size: 224
            top1: {value: 70.1, command: ...}     # percent
            top5: {value: 89.4, command: ...}     # optional
            routing:                    # optional, any statistic name -> number
              usage_entropy: {value: 0.98, command: ...}
              imbalance: {value: 1.07, command: ...}
        routing_figure: figures/pce_resnet18_in1k.png   # optional, relative to the YAML file
        baseline:                       # optional: a dense model trained with the same recipe, for comparison
          name: resnet18_dense_baseline-fmnist   # its release folder (not a Hub model)
          summary: one line: what it is
          params_m: {value: ..., command: ...}
          gmacs: {value: ..., command: ...}
          training: {command: ...}      # optional: recipe + time as in `training`
          top1: {value: ..., command: ...}        # on the first result's dataset / split / image size
          top5: {value: ..., command: ...}        # optional

An entry (or a baseline section) without its numbers - no ``params_m`` and no ``gmacs`` (a baseline: nor
``top1``), its results without ``top1`` / ``img_size``, its training without ``command`` - is *not measured yet*:
a model whose release recipe exists but has not run. It is checked like any entry but left out of what is
rendered (no README row, no Hub card, no baseline table) until ``make release`` writes its numbers in.

The YAML files are data of the repository, not of the installed package: ``CARD_DIR`` is ``model_cards/`` of
the checkout this package runs from. The release tools (``make release``, ``scripts/push_to_hub.py``) run from a
checkout; elsewhere pass the YAML files explicitly (``--cards``).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from pce_timm.utils import write_file_atomic

__all__ = [
    'CARD_DIR', 'Baseline', 'CardDataError', 'CardNumbers', 'Measured', 'ModelEntry', 'Result', 'default_card_files',
    'find_entry', 'load_entries', 'load_family', 'update_measured',
]

CARD_DIR = Path(__file__).resolve().parents[2] / 'model_cards'

_FAMILY_KEYS = {'family', 'title', 'description', 'license', 'hf_org', 'readme', 'tags', 'paper', 'models'}
_MODEL_KEYS = {
    'model', 'tag', 'repo_id', 'summary', 'params_m', 'gmacs', 'training', 'results', 'routing_figure', 'baseline'}
_TRAINING_KEYS = {'dataset', 'dataset_name', 'recipe', 'command', 'time'}
_BASELINE_KEYS = {'name', 'summary', 'params_m', 'gmacs', 'training', 'top1', 'top5', 'img_size'}
_RESULT_KEYS = {'dataset', 'dataset_name', 'split', 'img_size', 'top1', 'top5', 'routing'}
# what make release writes: without them an entry / a baseline is not measured yet (see the module docstring)
_MEASURED_KEYS = {'params_m', 'gmacs'}
_BASELINE_MEASURED_KEYS = {'params_m', 'gmacs', 'top1'}


class CardDataError(ValueError):
    """A model card YAML file breaks the schema; the message names the file and the field."""


@dataclass(frozen=True)
class Measured:
    """A number and the command that produced it."""
    value: float
    command: str


@dataclass(frozen=True)
class Result:
    dataset: str
    dataset_name: str
    split: str
    img_size: int
    top1: Measured
    top5: Optional[Measured] = None
    routing: Dict[str, Measured] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """A dense model trained with the entry's recipe, measured on the entry's first result's split."""
    name: str
    summary: str
    params_m: Measured
    gmacs: Measured
    top1: Measured
    top5: Optional[Measured] = None
    training: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelEntry:
    """One released model + tag, with its family's shared fields."""
    family: Dict[str, Any]
    model: str
    tag: str
    repo_id: str
    summary: str
    params_m: Measured
    gmacs: Measured
    training: Dict[str, str]
    results: Tuple[Result, ...]
    routing_figure: Optional[Path]
    source: Path
    baseline: Optional[Baseline] = None

    @property
    def name(self) -> str:
        return f'{self.model}.{self.tag}'


# ---------------------------------------------------------------- loading and validation

def default_card_files(card_dir: Optional[Path] = None) -> List[Path]:
    """The family YAML files of ``card_dir`` (default ``CARD_DIR``), sorted."""
    card_dir = CARD_DIR if card_dir is None else Path(card_dir)
    if not card_dir.is_dir():
        raise CardDataError(
            f'{card_dir}: no model card folder here (it is part of a pce_timm checkout, not of the installed '
            f'package); pass the family YAML files explicitly (--cards).')
    return sorted(card_dir.glob('*.yaml'))


def load_entries(paths: Sequence[Path]) -> List[ModelEntry]:
    """All model entries of the given family files, in file then list order."""
    entries = [entry for path in paths for entry in load_family(Path(path))]
    seen = {}
    for entry in entries:
        if entry.repo_id in seen:
            raise CardDataError(f'{entry.source}: repo_id {entry.repo_id!r} is also used in {seen[entry.repo_id]}.')
        seen[entry.repo_id] = entry.source
    return entries


def load_family(path: Path) -> List[ModelEntry]:
    try:
        data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, yaml.YAMLError) as e:
        raise CardDataError(f'{path}: cannot read YAML ({e}).') from e
    where = str(path)
    _check_keys(data, _FAMILY_KEYS, {'family', 'description', 'license', 'models'}, where)
    if not isinstance(data['models'], list) or not data['models']:
        raise CardDataError(f'{where}: models: expected a non-empty list of model entries.')
    family = {k: v for k, v in data.items() if k != 'models'}
    entries = [_model_entry(family, item, path, f'{where}: models[{i}]') for i, item in enumerate(data['models'])]
    return [entry for entry in entries if entry is not None]


def find_entry(entries: Sequence[ModelEntry], key: str) -> Optional[ModelEntry]:
    """The entry whose repo_id or ``model.tag`` is ``key``."""
    return next((e for e in entries if key in (e.repo_id, e.name)), None)


def _model_entry(family: Dict[str, Any], item: Any, path: Path, where: str) -> Optional[ModelEntry]:
    """The checked entry; None when it is not measured yet (checked, but without the numbers' fields)."""
    if isinstance(item, dict) and not _MEASURED_KEYS & set(item):
        _check_unmeasured_entry(item, where)
        return None
    _check_keys(item, _MODEL_KEYS, {'model', 'tag', 'summary', 'params_m', 'gmacs', 'training', 'results'}, where)
    name = f'{item["model"]}.{item["tag"]}'
    repo_id = item.get('repo_id') or (f'{family["hf_org"]}/{name}' if family.get('hf_org') else None)
    if not repo_id or repo_id.count('/') != 1:
        raise CardDataError(f'{where}: repo_id: give "org/name", or hf_org at the top of the file; got {repo_id!r}.')
    _check_keys(item['training'], _TRAINING_KEYS, {'dataset', 'recipe', 'command'}, f'{where}.training')
    if not isinstance(item['results'], list) or not item['results']:
        raise CardDataError(f'{where}.results: expected a non-empty list of results.')
    results = tuple(_result(r, f'{where}.results[{i}]') for i, r in enumerate(item['results']))
    figure = item.get('routing_figure')
    return ModelEntry(
        family=family,
        model=str(item['model']),
        tag=str(item['tag']),
        repo_id=repo_id,
        summary=str(item['summary']).strip(),
        params_m=_measured(item['params_m'], f'{where}.params_m'),
        gmacs=_measured(item['gmacs'], f'{where}.gmacs'),
        training={k: str(v).strip() for k, v in item['training'].items()},
        results=results,
        routing_figure=(path.parent / figure) if figure else None,
        source=path,
        baseline=_baseline(item['baseline'], f'{where}.baseline') if 'baseline' in item else None,
    )


def _check_unmeasured_entry(item: Dict[str, Any], where: str) -> None:
    """An entry that is not measured yet has every field but the numbers (``make release`` writes those)."""
    _check_keys(item, _MODEL_KEYS, {'model', 'tag', 'summary', 'training', 'results'}, where)
    _check_keys(item['training'], _TRAINING_KEYS, {'dataset', 'recipe'}, f'{where}.training')
    if not isinstance(item['results'], list) or not item['results']:
        raise CardDataError(f'{where}.results: expected a non-empty list of results.')
    for i, result in enumerate(item['results']):
        _check_keys(result, _RESULT_KEYS, {'dataset', 'split'}, f'{where}.results[{i}]')
    if 'baseline' in item:
        _baseline(item['baseline'], f'{where}.baseline')


def _baseline(item: Any, where: str) -> Optional[Baseline]:
    """The checked baseline section; None when it is not measured yet."""
    if isinstance(item, dict) and not _BASELINE_MEASURED_KEYS & set(item):
        _check_keys(item, _BASELINE_KEYS, {'name', 'summary'}, where)
        return None
    _check_keys(item, _BASELINE_KEYS, {'name', 'summary', 'params_m', 'gmacs', 'top1'}, where)
    training = item.get('training') or {}
    _check_keys(training, _TRAINING_KEYS, set(), f'{where}.training')
    top1 = _measured(item['top1'], f'{where}.top1')
    top5 = _measured(item['top5'], f'{where}.top5') if 'top5' in item else None
    for label, m in (('top1', top1), ('top5', top5)):
        if m is not None and not 0 <= m.value <= 100:
            raise CardDataError(f'{where}.{label}: accuracy is in percent (0-100); got {m.value}.')
    return Baseline(
        name=str(item['name']), summary=str(item['summary']).strip(),
        params_m=_measured(item['params_m'], f'{where}.params_m'), gmacs=_measured(item['gmacs'], f'{where}.gmacs'),
        top1=top1, top5=top5, training={k: str(v).strip() for k, v in training.items()})


def _result(item: Any, where: str) -> Result:
    _check_keys(item, _RESULT_KEYS, {'dataset', 'split', 'img_size', 'top1'}, where)
    routing = item.get('routing') or {}
    if not isinstance(routing, dict):
        raise CardDataError(f'{where}.routing: expected a mapping of statistic name -> {{value, command}}.')
    top1 = _measured(item['top1'], f'{where}.top1')
    top5 = _measured(item['top5'], f'{where}.top5') if 'top5' in item else None
    for label, m in (('top1', top1), ('top5', top5)):
        if m is not None and not 0 <= m.value <= 100:
            raise CardDataError(f'{where}.{label}: accuracy is in percent (0-100); got {m.value}.')
    return Result(
        dataset=str(item['dataset']),
        dataset_name=str(item.get('dataset_name') or item['dataset']),
        split=str(item['split']),
        img_size=int(item['img_size']),
        top1=top1,
        top5=top5,
        routing={str(k): _measured(v, f'{where}.routing.{k}') for k, v in routing.items()},
    )


def _measured(item: Any, where: str) -> Measured:
    if not isinstance(item, dict) or set(item) != {'value', 'command'}:
        raise CardDataError(
            f'{where}: a number needs the command that produced it: {{value: N, command: "..."}}; got {item!r}.')
    value, command = item['value'], item['command']
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CardDataError(f'{where}.value: expected a number; got {value!r}.')
    if not isinstance(command, str) or not command.strip():
        raise CardDataError(f'{where}.command: expected the command line that produced {value}; got {command!r}.')
    return Measured(float(value), command.strip())


def _check_keys(item: Any, allowed: set, required: set, where: str) -> None:
    if not isinstance(item, dict):
        raise CardDataError(f'{where}: expected a mapping; got {type(item).__name__}.')
    unknown = sorted(set(item) - allowed)
    missing = sorted(required - set(item))
    if unknown:
        raise CardDataError(f'{where}: unknown field(s) {", ".join(unknown)}; allowed: {", ".join(sorted(allowed))}.')
    if missing:
        raise CardDataError(f'{where}: missing field(s) {", ".join(missing)}.')


# ---------------------------------------------------------------- measured numbers written back

@dataclass(frozen=True)
class CardNumbers:
    """What ``make release`` measured for one card entry (or for its dense baseline), each number with its command.

    Attributes:
        name: the entry's ``model.tag``.
        baseline: the numbers are the entry's ``baseline`` section, not its own.
        params_m, gmacs, top1, top5: the measured numbers.
        img_size: the evaluation image size.
        train_command: the training command line.
        train_time: how long training took, as the card prints it.
        routing: routing statistics (``usage_entropy``, ``imbalance``, ``dead_experts``) for the entry's first
            result; None for a baseline.
    """
    name: str
    baseline: bool
    params_m: Measured
    gmacs: Measured
    top1: Measured
    top5: Measured
    img_size: int
    train_command: str
    train_time: str
    routing: Optional[Dict[str, Measured]] = None


def update_measured(path: Path, numbers: Sequence[CardNumbers]) -> None:
    """Write measured numbers into a family YAML file (atomically); leading comments and prose fields are kept.

    Raises:
        CardDataError: the file has no entry (or no baseline section) for a name in ``numbers``.
    """
    path = Path(path)
    text = path.read_text(encoding='utf-8')
    header = ''.join(text.splitlines(keepends=True)[:_header_lines(text)])
    data = yaml.safe_load(text)
    entries = {f'{m["model"]}.{m["tag"]}': m for m in data['models']}
    for n in numbers:
        entry = entries.get(n.name)
        if entry is None:
            raise CardDataError(f'{path}: no entry for {n.name} (model + tag); add one first.')
        if n.baseline:
            if 'baseline' not in entry:
                raise CardDataError(f'{path}: the {n.name} entry has no baseline section to update.')
            entry = result = entry['baseline']
        else:
            result = entry['results'][0]
        entry['params_m'] = _number(n.params_m)
        entry['gmacs'] = _number(n.gmacs)
        result['top1'] = _number(n.top1)
        result['top5'] = _number(n.top5)
        result['img_size'] = n.img_size
        entry.setdefault('training', {})['command'] = n.train_command
        entry['training']['time'] = n.train_time
        if n.routing is not None:
            result['routing'] = {k: _number(m) for k, m in n.routing.items()}
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=118)
    write_file_atomic(path, header + body)


def _number(measured: Measured) -> Dict[str, Any]:
    return {'value': measured.value, 'command': measured.command}


def _header_lines(text: str) -> int:
    """Number of leading comment / blank lines (kept verbatim; yaml.safe_dump would drop them)."""
    lines = text.splitlines()
    n = 0
    while n < len(lines) and (lines[n].startswith('#') or not lines[n].strip()):
        n += 1
    return n
