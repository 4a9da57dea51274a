#!/usr/bin/env python3
"""Release a trained model to the Hugging Face Hub (or only to a folder / the local HF cache).

    python scripts/push_to_hub.py RUN_DIR_OR_CHECKPOINT --repo-id ORG/NAME
        [--dry-run OUT_DIR] [--install-cache] [--private] [--revision REV] [--commit-message MSG]

Input: a run folder (model/config.json + model/model.safetensors, optional results.json), a timm-style folder
(config.json + model.safetensors) or a .safetensors file next to a config.json. The weights are checked against
the architecture before anything is written. The model card is rendered from the model_cards/*.yaml entry whose
repo_id is ORG/NAME (model_cards/render.py); a --dry-run without one gets a minimal card and a warning.

--dry-run OUT_DIR writes the release folder there and uploads nothing; --install-cache also installs it into
the HF cache as ORG/NAME so `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` works offline. A real push
needs a token (HF_TOKEN or `hf auth login`); pushing an unchanged release makes no commit.

Exit codes: 0 done, 1 the Hub failed or refused, 2 bad input (message on stderr).
"""
import argparse
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import httpx2
from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError

from pce_timm.hub import (
    RESULTS_NAME,
    ReleaseError,
    ReleaseSource,
    find_release_source,
    install_into_hf_cache,
    load_model_from_source,
    push_release,
    write_release,
)
from pce_timm.utils import load_module_from_path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    render = load_module_from_path(REPO_ROOT / 'model_cards' / 'render.py', 'pce_model_cards_render')
    try:
        token = None if args.dry_run else _require_token()
        source = find_release_source(args.source)
        model = load_model_from_source(source)
        card, extra_files = _card_and_extras(render, args, model.pretrained_cfg['architecture'], source)
        with tempfile.TemporaryDirectory(prefix='pce-release-') as tmp:
            release_dir = write_release(
                model, args.dry_run or Path(tmp) / 'release', model_card=card, extra_files=extra_files)
            print(f'release: {release_dir} ({", ".join(sorted(p.name for p in release_dir.iterdir()))})')
            if args.install_cache:
                snapshot = install_into_hf_cache(release_dir, args.repo_id, args.cache_dir, revision=args.revision)
                print(f'installed in HF cache: {snapshot}')
            if token is not None:
                return _push(release_dir, args, token)
    except (ReleaseError, render.CardDataError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split('\n\n', 2)[-1])
    parser.add_argument('source', type=Path, help='run folder, timm-style folder or .safetensors checkpoint')
    parser.add_argument('--repo-id', required=True, help='Hub repo, ORG/NAME')
    parser.add_argument('--dry-run', type=Path, metavar='OUT_DIR', help='write the release here; do not upload')
    parser.add_argument('--install-cache', action='store_true', help='install the release into the HF cache')
    parser.add_argument('--cache-dir', type=Path, help='HF hub cache for --install-cache (default: HF_HUB_CACHE)')
    parser.add_argument('--private', action='store_true', help='create the Hub repo private')
    parser.add_argument('--revision', default='main', help='branch to push to / ref to install as (default: main)')
    parser.add_argument('--commit-message', help='default: "Release ORG/NAME"')
    parser.add_argument('--cards', type=Path, nargs='+', help='model card YAML files (default: model_cards/*.yaml)')
    return parser.parse_args(argv)


def _require_token() -> str:
    token = get_token()
    if not token:
        raise ReleaseError(
            'no Hugging Face token for the push: set HF_TOKEN or run `hf auth login` '
            '(or use --dry-run OUT_DIR to only write the release).')
    return token


def _card_and_extras(render, args: argparse.Namespace, arch: str, source: ReleaseSource) -> Tuple[str, Dict]:
    entries = render.load_entries(args.cards or render.default_card_files())
    entry = render.find_entry(entries, args.repo_id)
    extras: Dict[str, Path] = {RESULTS_NAME: source.results_path} if source.results_path else {}
    if entry is None:
        if not args.dry_run:
            raise render.CardDataError(
                f'no model card entry with repo_id {args.repo_id!r} in model_cards/*.yaml; add one (see '
                f'model_cards/example.yaml) before pushing.')
        print(f'warning: no model card entry for {args.repo_id!r}; writing a minimal card.', file=sys.stderr)
        return _minimal_card(args.repo_id, arch), extras
    if entry.model != arch:
        raise render.CardDataError(
            f'{entry.source}: the entry for {args.repo_id!r} describes {entry.model!r} but {source.config_path} '
            f'is a {arch!r}; fix --repo-id or the card entry.')
    return render.render_hub_card(entry), {**extras, **render.card_assets(entry)}


def _minimal_card(repo_id: str, arch: str) -> str:
    return '\n'.join([
        '---', 'library_name: timm', 'pipeline_tag: image-classification', 'tags:', '- image-classification',
        '- timm', '---', '', f'# {repo_id}', '',
        f'A `{arch}` checkpoint. No model card data yet: add an entry to model_cards/<family>.yaml.', '',
        '```python', 'import timm', 'import pce_timm', '',
        f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)", '```', ''])


def _push(release_dir: Path, args: argparse.Namespace, token: str) -> int:
    try:
        result = push_release(
            release_dir, args.repo_id, token=token, revision=args.revision, private=args.private,
            commit_message=args.commit_message)
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as e:
        print(f'error: pushing to {args.repo_id!r} failed: {str(e).strip().splitlines()[0]}', file=sys.stderr)
        return 1
    if result.changed:
        print(f'pushed {result.repo_id}@{result.revision}: {result.commit_url}')
    else:
        print(f'unchanged: {result.repo_id}@{result.revision} already has these files ({result.commit_oid[:12]})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
