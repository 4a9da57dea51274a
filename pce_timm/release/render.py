"""Render the Hub model cards and the README model table from the card data (:mod:`pce_timm.release.cards`).

Every number printed comes from the YAML with the command that produced it (the card's "How Each Number Was
Made" section). The CLI is ``model_cards/render.py`` (``--check`` / ``--write`` the README table, ``--card`` one
Hub card), which calls :func:`main`.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from timm.models import get_pretrained_cfg

from pce_timm.utils import markdown_table, write_file_atomic

from .cards import CARD_DIR, CardDataError, ModelEntry, default_card_files, find_entry, load_entries
from .claims import Evaluation, check_card_claims, data_card

__all__ = [
    'BASE_TAGS', 'HUB_URL', 'TABLE_END', 'TABLE_START', 'card_assets', 'card_for_checkpoint', 'inject_model_table',
    'main', 'minimal_card', 'render_baseline_card', 'render_hub_card', 'render_metadata', 'render_model_table',
]

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
    cfg = _registered_cfg(entry)
    return int(cfg.input_size[0]) if cfg is not None and cfg.input_size else 3


def _registry_points_here(entry: ModelEntry) -> bool:
    """True if ``timm.create_model('<model>.<tag>', pretrained=True)`` loads from this repo."""
    cfg = _registered_cfg(entry)
    return cfg is not None and cfg.hf_hub_id == entry.repo_id


def _registered_cfg(entry: ModelEntry):
    """The pretrained cfg timm has registered for ``model.tag`` (pce_* are registered by importing pce_timm)."""
    try:
        return get_pretrained_cfg(entry.name)
    except RuntimeError:  # an architecture timm does not know
        return None


def _results_table(entry: ModelEntry) -> List[str]:
    rows = [[r.dataset_name, r.split, str(r.img_size), f'{r.top1.value:.2f}', f'{r.top5.value:.2f}' if r.top5 else '-']
            for r in entry.results]
    return markdown_table(['Dataset', 'Split', 'Image size', 'Top-1 (%)', 'Top-5 (%)'], rows, '<<>>>').split('\n')


def _routing_table(entry: ModelEntry) -> List[str]:
    stats = _unique([k for r in entry.results for k in r.routing])
    rows = [[r.dataset_name, r.split] + [_stat(k, r.routing[k].value) if k in r.routing else '-' for k in stats]
            for r in entry.results]
    header = ['Dataset', 'Split'] + [_routing_label(k) for k in stats]
    return markdown_table(header, rows, '<<' + '>' * len(stats)).split('\n')


def _baseline_table(entry: ModelEntry) -> List[str]:
    b, r = entry.baseline, entry.results[0]
    cells = [[name, f'{top1.value:.2f}', f'{top5.value:.2f}' if top5 else '-', f'{params.value:.2f}',
              _gmacs(gmacs.value)]
             for name, top1, top5, params, gmacs in (
                 (entry.name, r.top1, r.top5, entry.params_m, entry.gmacs),
                 (b.name, b.top1, b.top5, b.params_m, b.gmacs))]
    rows = [f'Trained and evaluated like {entry.name} ({r.dataset_name} {r.split}, {r.img_size} px): {b.summary}', '',
            *markdown_table(['Model', 'Top-1 (%)', 'Top-5 (%)', 'Params (M)', 'GMACs'], cells, '<>>>>').split('\n')]
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
        '```python', 'import timm', f'import pce_timm  # the architecture is built by the {entry.model} entrypoint',
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
    rows = []
    for e in listed:
        r = e.results[0]
        rows.append([
            f'[{e.name}]({HUB_URL}/{e.repo_id})', f'{r.top1.value:.2f}', f'{r.top5.value:.2f}' if r.top5 else '-',
            f'{e.params_m.value:.2f}', _gmacs(e.gmacs.value), str(r.img_size),
        ] + [_stat(k, r.routing[k].value) if k in r.routing else '-' for k in stats])
    return markdown_table(header, rows, '<' + '>' * (len(header) - 1))


def inject_model_table(readme: str, table: str, readme_path: Path = Path('README.md')) -> str:
    """Replace what is between the table markers with ``table``."""
    start, end = readme.find(TABLE_START), readme.find(TABLE_END)
    if start < 0 or end < 0 or end < start:
        raise CardDataError(
            f'{readme_path}: needs the lines {TABLE_START} and {TABLE_END} (in that order) where the model '
            f'table goes.')
    return readme[:start + len(TABLE_START)] + '\n' + table + '\n' + readme[end:]


def card_for_checkpoint(
        repo_id: str,
        arch: str,
        cards: Optional[Sequence[Path]] = None,
        *,
        allow_minimal: bool = False,
        evaluations: Optional[Sequence[Evaluation]] = None,
) -> Tuple[str, Dict[str, Path], bool]:
    """The README.md and linked files for pushing a checkpoint of ``arch`` as ``repo_id``.

    Args:
        repo_id: the entry's repo_id (``org/name``).
        arch: the checkpoint's architecture; must be the entry's model.
        cards: family YAML files (default: ``model_cards/*.yaml``).
        allow_minimal: without an entry and without the run's results.json, return :func:`minimal_card`
            instead of raising.
        evaluations: what the checkpoint's own records measured (:func:`.claims.shipped_evaluations`); None
            skips the checks (rendering a card without weights at hand).

    Returns:
        ``(card text, {repo path: local file}, whether an entry was found)``. With an entry: its card, once
        :func:`.claims.check_card_claims` found its numbers in ``evaluations``. Without one: a data-first card
        from the run's results.json (:func:`.claims.data_card`) when there is one.

    Raises:
        CardDataError: the entry describes another architecture or claims numbers the checkpoint does not have;
            no entry, no results.json and not ``allow_minimal``.
    """
    entries = load_entries(cards or default_card_files())
    entry = find_entry(entries, repo_id)
    if entry is None:
        runs = [e for e in evaluations or () if e.path.name == 'results.json' and 'config' in e.record]
        if runs:
            return data_card(repo_id, arch, runs[0], runs[0].record['config']), {}, False
        if not allow_minimal:
            raise CardDataError(
                f'no model card entry with repo_id {repo_id!r} in model_cards/*.yaml and no results.json of a '
                f'training run next to the weights to build a card from; push the run folder, or add an entry (see '
                f'model_cards/example.yaml) before pushing.')
        return minimal_card(repo_id, arch), {}, False
    if entry.model != arch:
        raise CardDataError(
            f'{entry.source}: the entry for {repo_id!r} describes {entry.model!r} but the checkpoint is a {arch!r}; '
            f'fix --repo-id or the card entry.')
    if evaluations is not None:
        check_card_claims(entry, evaluations)
    return render_hub_card(entry), card_assets(entry), True


def minimal_card(repo_id: str, arch: str) -> str:
    """A README.md for a checkpoint that has no card entry yet (``scripts/push_to_hub.py --dry-run``)."""
    return '\n'.join([
        '---', 'library_name: timm', 'pipeline_tag: image-classification', 'tags:', '- image-classification',
        '- timm', '---', '', f'# {repo_id}', '',
        f'A `{arch}` checkpoint. No model card data yet: push the training run folder (its results.json '
        f'becomes the card) or add an entry to model_cards/<family>.yaml.', '',
        '```python', 'import timm', 'import pce_timm', '',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)", '```', ''])


# ---------------------------------------------------------------- CLI

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='model_cards/render.py', description=__doc__.split('\n\n')[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument('--check', action='store_true', help='exit 1 if the README model table is stale')
    mode.add_argument('--write', action='store_true', help='rewrite the README model table')
    mode.add_argument('--card', metavar='MODEL.TAG|REPO_ID', help='render one Hub model card')
    parser.add_argument('--readme', type=Path, default=CARD_DIR.parent / 'README.md')
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
        write_file_atomic(args.readme, updated)
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
