#!/usr/bin/env python3
"""Release a trained model to the Hugging Face Hub (or only to a folder / the local HF cache).

    python scripts/push_to_hub.py RUN_DIR_OR_CHECKPOINT --repo-id ORG/NAME
        [--dry-run OUT_DIR] [--install-cache] [--private] [--revision REV] [--commit-message MSG]

Input: a run folder (model/config.json + model/model.safetensors, optional results.json), a timm-style folder
(config.json + model.safetensors) or a .safetensors file next to a config.json. The weights are checked against
the architecture before anything is written, and non-finite weights are refused. The model card is the
model_cards/*.yaml entry whose repo_id is ORG/NAME (pce_timm.release.render), pushed only when its top-1 / top-5
are these weights' own (an eval_results.json, eval-*.json or the run's results.json next to them on the card's
dataset and split; otherwise the push is refused with both numbers). Without an entry, the card is built from
the run's results.json and config (pce_timm.release.claims); a --dry-run with neither gets a minimal card.
The run's records (results.json, evaluations, config.yaml) are shipped with the weights.

--dry-run OUT_DIR writes the release folder there and uploads nothing; --install-cache also installs it into
the HF cache as ORG/NAME so `timm.create_model('hf-hub:ORG/NAME', pretrained=True)` works offline. A real push
needs a token (HF_TOKEN or `hf auth login`); pushing an unchanged release makes no commit.

Exit codes: 0 done, 1 the Hub failed or refused, 2 bad input (message on stderr).
"""
import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)  # before the imports below (torch): --help is instant
    from huggingface_hub import get_token

    from pce_timm import hub
    from pce_timm.release import CardDataError
    from pce_timm.release.claims import shipped_evaluations, shipped_records
    from pce_timm.release.render import card_for_checkpoint

    try:
        token = None if args.dry_run else get_token()
        if not args.dry_run and not token:
            raise hub.ReleaseError('no Hugging Face token for the push: set HF_TOKEN or run `hf auth login` '
                                   '(or use --dry-run OUT_DIR to only write the release).')
        source = hub.find_release_source(args.source)
        model = hub.load_model_from_source(source)
        evaluations = shipped_evaluations(source)
        card, extras, found = card_for_checkpoint(
            args.repo_id, model.pretrained_cfg['architecture'], args.cards, allow_minimal=bool(args.dry_run),
            evaluations=evaluations)
        records = shipped_records(source, evaluations)
        if not found:
            built = 'a card from the run\'s results.json' if hub.RESULTS_NAME in records else 'a minimal card'
            print(f'note: no model card entry for {args.repo_id!r}; writing {built}.', file=sys.stderr)
        extras = {**records, **extras}
        with tempfile.TemporaryDirectory(prefix='pce-release-') as tmp:
            release_dir = hub.write_release(
                model, args.dry_run or Path(tmp) / 'release', model_card=card, extra_files=extras)
            print(f'release: {release_dir} ({", ".join(sorted(p.name for p in release_dir.iterdir()))})')
            if args.install_cache:
                snapshot = hub.install_into_hf_cache(release_dir, args.repo_id, args.cache_dir, args.revision)
                print(f'installed in HF cache: {snapshot}')
            if token is not None:
                return _push(release_dir, args, token)
    except (hub.ReleaseError, CardDataError) as e:
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


def _push(release_dir: Path, args: argparse.Namespace, token: str) -> int:
    from pce_timm import hub

    try:
        result = hub.push_release(release_dir, args.repo_id, token=token, revision=args.revision,
                                  private=args.private, commit_message=args.commit_message)
    except hub.PUSH_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f'error: pushing to {args.repo_id!r} failed: {reason}', file=sys.stderr)
        return 1
    if result.changed:
        print(f'pushed {result.repo_id}@{result.revision}: {result.commit_url}')
    else:
        print(f'unchanged: {result.repo_id}@{result.revision} already has these files ({result.commit_oid[:12]})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
