"""Render Hugging Face model cards and the README model table from ``model_cards/<family>.yaml``.

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

CLI::

    python model_cards/render.py --check          # exit 1 if README's model table is stale
    python model_cards/render.py --write          # rewrite the table between the markers
    python model_cards/render.py --card pce_resnet18.in1k [--out README.md]   # print / write one Hub card
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

CARD_DIR = Path(__file__).resolve().parent
REPO_ROOT = CARD_DIR.parent
TABLE_START = '<!-- model-table:start -->'
TABLE_END = '<!-- model-table:end -->'
BASE_TAGS = ('image-classification', 'timm', 'pce', 'mixture-of-experts')
HUB_URL = 'https://huggingface.co'
ROUTING_LABELS = {
    'usage_entropy': 'Expert usage entropy',
    'imbalance': 'Load imbalance',
    'dead_experts': 'Dead experts',
}
INTEGER_STATS = {'dead_experts'}

_FAMILY_KEYS = {'family', 'title', 'description', 'license', 'hf_org', 'readme', 'tags', 'paper', 'models'}
_MODEL_KEYS = {
    'model', 'tag', 'repo_id', 'summary', 'params_m', 'gmacs', 'training', 'results', 'routing_figure', 'baseline'}
_TRAINING_KEYS = {'dataset', 'dataset_name', 'recipe', 'command', 'time'}
_BASELINE_KEYS = {'name', 'summary', 'params_m', 'gmacs', 'training', 'top1', 'top5', 'img_size'}
_RESULT_KEYS = {'dataset', 'dataset_name', 'split', 'img_size', 'top1', 'top5', 'routing'}


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

def default_card_files(card_dir: Path = CARD_DIR) -> List[Path]:
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
    return [_model_entry(family, item, path, f'{where}: models[{i}]') for i, item in enumerate(data['models'])]


def find_entry(entries: Sequence[ModelEntry], key: str) -> Optional[ModelEntry]:
    """The entry whose repo_id or ``model.tag`` is ``key``."""
    return next((e for e in entries if key in (e.repo_id, e.name)), None)


def _model_entry(family: Dict[str, Any], item: Any, path: Path, where: str) -> ModelEntry:
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


def _baseline(item: Any, where: str) -> Baseline:
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


# ---------------------------------------------------------------- Hub card

def render_metadata(entry: ModelEntry):
    """Card metadata as ``huggingface_hub.ModelCardData`` (front matter incl. a model-index of results)."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    for r in entry.results:
        common = dict(task_type='image-classification', task_name='Image Classification', dataset_type=r.dataset,
                      dataset_name=r.dataset_name, dataset_split=r.split)
        eval_results.append(EvalResult(metric_type='accuracy', metric_name='Top-1 Accuracy',
                                       metric_value=r.top1.value, **common))
        if r.top5 is not None:
            eval_results.append(EvalResult(metric_type='top_5_accuracy', metric_name='Top-5 Accuracy',
                                           metric_value=r.top5.value, **common))
    datasets = _unique([entry.training['dataset']] + [r.dataset for r in entry.results])
    return ModelCardData(
        library_name='timm',
        license=entry.family['license'],
        pipeline_tag='image-classification',
        tags=_unique(list(BASE_TAGS) + list(entry.family.get('tags') or [])),
        datasets=datasets,
        metrics=['accuracy'],
        model_name=entry.name,
        eval_results=eval_results,
    )


def render_hub_card(entry: ModelEntry) -> str:
    """README.md for the Hub repo of ``entry``: YAML front matter + Markdown body. Validated by re-parsing."""
    from huggingface_hub import ModelCard

    body = '\n'.join(_card_sections(entry))
    text = f'---\n{render_metadata(entry).to_yaml()}\n---\n\n{body}'
    card = ModelCard(text)  # raises on invalid front matter / model-index
    if card.data.library_name != 'timm' or not card.data.eval_results:
        raise CardDataError(f'{entry.source}: {entry.name}: rendered card metadata does not round-trip.')
    return text


def card_assets(entry: ModelEntry) -> Dict[str, Path]:
    """Files the card links to, as ``{path in repo: local path}`` (pass to write_release's extra_files)."""
    if entry.routing_figure is None:
        return {}
    if not entry.routing_figure.is_file():
        raise CardDataError(f'{entry.source}: {entry.name}: routing_figure {entry.routing_figure} does not exist.')
    return {f'figures/{entry.routing_figure.name}': entry.routing_figure}


def _card_sections(entry: ModelEntry) -> List[str]:
    family, main = entry.family, entry.results[0]
    lines = [f'# Model card for {entry.name}', '', str(family['description']).strip(), '', '## Model Details', '']
    lines += [
        f'- **Architecture:** {entry.summary}',
        f'- **Params (M):** {entry.params_m.value:.2f}',
        f'- **GMACs:** {_gmacs(entry.gmacs.value)} (at {main.img_size} x {main.img_size})',
        f'- **Image size:** {main.img_size} x {main.img_size}',
        f'- **Dataset:** {entry.training.get("dataset_name", entry.training["dataset"])}',
    ]
    paper = family.get('paper')
    if paper:
        lines.append(f'- **Paper:** [{paper["title"]}]({paper["url"]})')
    lines += ['', '## Model Usage', '', *_usage(entry), '', '## Results', '', *_results_table(entry)]
    if entry.baseline is not None:
        lines += ['', '### Dense baseline, same recipe', '', *_baseline_table(entry)]
    if any(r.routing for r in entry.results):
        lines += ['', '## Routing Statistics', '', *_routing_table(entry)]
    if entry.routing_figure is not None:
        lines += ['', f'![Routing map of {entry.name}](figures/{entry.routing_figure.name})']
    lines += ['', '## Training', '', entry.training['recipe'], '', '```bash', entry.training['command'], '```']
    if entry.training.get('time'):
        lines += ['', f'Training time: {entry.training["time"]}.']
    lines += ['', '## How Each Number Was Made', '', *_provenance(entry)]
    if paper and paper.get('bibtex'):
        lines += ['', '## Citation', '', '```bibtex', str(paper['bibtex']).strip(), '```']
    return lines + ['']


def _usage(entry: ModelEntry) -> List[str]:
    names = [f'hf-hub:{entry.repo_id}']
    if _registry_points_here(entry):
        names.append(entry.name)
    mode = 'L' if _input_channels(entry) == 1 else 'RGB'
    code = [
        '```python', 'import timm', 'import pce_timm  # registers the pce_* architectures with timm',
        'from PIL import Image', '', f"img = Image.open('your_image.jpg').convert('{mode}')"
        + ('  # the model takes 1-channel (grayscale) input' if mode == 'L' else '')]
    code.append(f"model = timm.create_model('{names[0]}', pretrained=True)")
    if len(names) > 1:
        code.append(f"# or, by registry name: timm.create_model('{names[1]}', pretrained=True)")
    code += [
        'model = model.eval()',
        'data_config = timm.data.resolve_model_data_config(model)',
        'transform = timm.data.create_transform(**data_config, is_training=False)',
        'top5_prob, top5_idx = model(transform(img).unsqueeze(0)).softmax(dim=-1).topk(5)',
        '```',
    ]
    return code


def _input_channels(entry: ModelEntry) -> int:
    """Input channels of ``model.tag`` from its registered pretrained cfg (3 when it is not registered)."""
    try:
        from timm.models import get_pretrained_cfg

        import pce_timm  # noqa: F401 - registers pce_* models
        cfg = get_pretrained_cfg(entry.name)
    except (ImportError, RuntimeError):
        return 3
    return int(cfg.input_size[0]) if cfg is not None and cfg.input_size else 3


def _registry_points_here(entry: ModelEntry) -> bool:
    """True if ``timm.create_model('<model>.<tag>', pretrained=True)`` loads from this repo."""
    try:
        from timm.models import get_pretrained_cfg

        import pce_timm  # noqa: F401 - registers pce_* models
        cfg = get_pretrained_cfg(entry.name)
    except (ImportError, RuntimeError):
        return False
    return cfg is not None and cfg.hf_hub_id == entry.repo_id


def _results_table(entry: ModelEntry) -> List[str]:
    rows = ['| Dataset | Split | Image size | Top-1 (%) | Top-5 (%) |', '|---|---|---:|---:|---:|']
    for r in entry.results:
        top5 = f'{r.top5.value:.2f}' if r.top5 else '-'
        rows.append(f'| {r.dataset_name} | {r.split} | {r.img_size} | {r.top1.value:.2f} | {top5} |')
    return rows


def _routing_table(entry: ModelEntry) -> List[str]:
    stats = _unique([k for r in entry.results for k in r.routing])
    rows = ['| Dataset | Split | ' + ' | '.join(_routing_label(k) for k in stats) + ' |',
            '|---|---|' + '---:|' * len(stats)]
    for r in entry.results:
        values = [_stat(k, r.routing[k].value) if k in r.routing else '-' for k in stats]
        rows.append(f'| {r.dataset_name} | {r.split} | ' + ' | '.join(values) + ' |')
    return rows


def _baseline_table(entry: ModelEntry) -> List[str]:
    b, r = entry.baseline, entry.results[0]
    rows = [f'Trained and evaluated like {entry.name} ({r.dataset_name} {r.split}, {r.img_size} px): {b.summary}', '',
            '| Model | Top-1 (%) | Top-5 (%) | Params (M) | GMACs |', '|---|---:|---:|---:|---:|']
    for name, top1, top5, params, gmacs in (
            (entry.name, r.top1, r.top5, entry.params_m, entry.gmacs), (b.name, b.top1, b.top5, b.params_m, b.gmacs)):
        rows.append(f'| {name} | {top1.value:.2f} | {f"{top5.value:.2f}" if top5 else "-"} | '
                    f'{params.value:.2f} | {_gmacs(gmacs.value)} |')
    if b.training.get('command'):
        rows += ['', f'Dense baseline command: {_code(b.training["command"])}'
                 + (f' ({b.training["time"]})' if b.training.get('time') else '')]
    return rows


def _provenance(entry: ModelEntry) -> List[str]:
    items = [('Params (M)', entry.params_m), ('GMACs', entry.gmacs)]
    for r in entry.results:
        where = f'{r.dataset_name} {r.split} @ {r.img_size}'
        items += [(f'Top-1, {where}', r.top1)] + ([(f'Top-5, {where}', r.top5)] if r.top5 else [])
        items += [(f'{_routing_label(k)}, {where}', m) for k, m in r.routing.items()]
    b = entry.baseline
    if b is not None:
        items += [(f'{b.name} params (M)', b.params_m), (f'{b.name} GMACs', b.gmacs), (f'{b.name} top-1', b.top1)]
        items += [(f'{b.name} top-5', b.top5)] if b.top5 else []
    return [f'- **{label}** = {m.value:g}: {_code(m.command)}' for label, m in items]


def render_baseline_card(entry: ModelEntry, name: str) -> str:
    """README.md of the dense baseline's release folder (a comparison model, not on the Hub)."""
    b, r = entry.baseline, entry.results[0]
    if b is None or b.name != name:
        raise CardDataError(f'{entry.source}: {entry.name} has no baseline named {name!r}.')
    lines = [
        '---', 'library_name: timm', f'license: {entry.family["license"]}', 'pipeline_tag: image-classification',
        'tags:', *[f'- {t}' for t in ('image-classification', 'timm', 'baseline')], '---', '',
        f'# {b.name}', '', b.summary, '',
        f'The dense comparison for [{entry.name}]({HUB_URL}/{entry.repo_id}): the same recipe, data and widths, '
        f'no experts. Not a zoo model and not on the Hub; load it from this folder:', '',
        '```python', 'import timm', 'import pce_timm  # the architecture is built by the pce_resnet18 entrypoint',
        '', f"model = timm.create_model('local-dir:releases/{b.name}', pretrained=True)", '```', '',
        '## Results', '', *_baseline_table(entry), '', '## Training', '', entry.training['recipe'], '',
        '## How Each Number Was Made', '',
        *[f'- **{label}** = {m.value:g}: {_code(m.command)}' for label, m in (
            ('Params (M)', b.params_m), ('GMACs', b.gmacs), (f'Top-1, {r.dataset_name} {r.split}', b.top1),
            *([(f'Top-5, {r.dataset_name} {r.split}', b.top5)] if b.top5 else []))],
        '']
    return '\n'.join(lines)


def _gmacs(value: float) -> str:
    """GMACs with 2 decimals, or 4 for small models (0.0361 would show as 0.04)."""
    return f'{value:.2f}' if value >= 0.1 else f'{value:.4f}'


def _stat(key: str, value: float) -> str:
    """A routing statistic: counts (dead experts) as integers, the rest with 3 decimals."""
    return str(int(value)) if key in INTEGER_STATS and float(value).is_integer() else f'{value:.3f}'


def _routing_label(key: str) -> str:
    return ROUTING_LABELS.get(key, key.replace('_', ' ').capitalize())


def _code(text: str) -> str:
    return f'`` {text} ``' if '`' in text else f'`{text}`'


def _unique(items: List[str]) -> List[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- README table

def render_model_table(entries: Sequence[ModelEntry]) -> str:
    """Markdown table of the README-listed entries; headline numbers from each entry's first result."""
    listed = [e for e in entries if e.family.get('readme', True)]
    if not listed:
        return '_No released models yet._'
    stats = _unique([k for e in listed for k in e.results[0].routing])
    header = ['Model', 'Top-1 (%)', 'Top-5 (%)', 'Params (M)', 'GMACs', 'Image size'] + [
        _routing_label(k) for k in stats]
    rows = ['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
    for e in listed:
        r = e.results[0]
        cells = [
            f'[{e.name}]({HUB_URL}/{e.repo_id})', f'{r.top1.value:.2f}', f'{r.top5.value:.2f}' if r.top5 else '-',
            f'{e.params_m.value:.2f}', _gmacs(e.gmacs.value), str(r.img_size),
        ] + [_stat(k, r.routing[k].value) if k in r.routing else '-' for k in stats]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def inject_model_table(readme: str, table: str, readme_path: Path = Path('README.md')) -> str:
    """Replace what is between the table markers with ``table``."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < 0 or end < start:
        raise CardDataError(
            f'{readme_path}: needs the lines {TABLE_START} and {TABLE_END} (in that order) where the model '
            f'table goes.')
    return readme[:start + len(TABLE_START)] + '\n' + table + '\n' + readme[end:]


# ---------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument('--check', action='store_true', help='exit 1 if the README model table is stale')
    mode.add_argument('--write', action='store_true', help='rewrite the README model table')
    mode.add_argument('--card', metavar='MODEL.TAG|REPO_ID', help='render one Hub model card')
    parser.add_argument('--readme', type=Path, default=REPO_ROOT / 'README.md')
    parser.add_argument('--cards', type=Path, nargs='+', help='family YAML files (default: model_cards/*.yaml)')
    parser.add_argument('--out', type=Path, help='with --card: write here instead of stdout')
    args = parser.parse_args(argv)
    try:
        entries = load_entries(args.cards or default_card_files())
        if args.card:
            return _print_card(entries, args.card, args.out)
        readme = args.readme.read_text(encoding='utf-8')
        updated = inject_model_table(readme, render_model_table(entries), args.readme)
    except (CardDataError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.check:
        if updated != readme:
            print(f'{args.readme}: model table is stale; run `python model_cards/render.py --write`.', file=sys.stderr)
            return 1
        print(f'{args.readme}: model table is up to date.')
        return 0
    if updated != readme:
        args.readme.write_text(updated, encoding='utf-8')
    print(f'{args.readme}: model table {"updated" if updated != readme else "already up to date"}.')
    return 0


def _print_card(entries: Sequence[ModelEntry], key: str, out: Optional[Path]) -> int:
    entry = find_entry(entries, key)
    if entry is None:
        raise CardDataError(f'no card entry for {key!r}; known: {", ".join(e.name for e in entries)}.')
    text = render_hub_card(entry)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding='utf-8')
    return 0


if __name__ == '__main__':
    sys.exit(main())
