"""Check that an installed release loads back exactly, in a fresh interpreter with the Hub switched off.

``make release`` runs ``python -m pce_timm.release.verify NAME REPO_ID WEIGHTS`` with ``HF_HUB_OFFLINE=1`` and the
HF cache it installed into: a fresh process has no model, cfg or download cached in memory, so it sees what a
user's process would. It loads ``timm.create_model(NAME, pretrained=True)`` (the registry tag) and
``timm.create_model('hf-hub:REPO_ID', pretrained=True)`` and compares every tensor with ``WEIGHTS`` (the
release's model.safetensors) bit for bit. Prints ``ok`` and exits 0, or names the first problem and exits 1.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ['OfflineLoadError', 'check_offline_load', 'main', 'verify_offline']

PathLike = Union[str, os.PathLike]


class OfflineLoadError(RuntimeError):
    """A released model does not load back offline as the release's weights."""


def check_offline_load(name: str, repo_id: str, weights: PathLike) -> None:
    """Load ``name`` and ``hf-hub:repo_id`` with pretrained weights in this process; compare them to ``weights``.

    Raises:
        OfflineLoadError: other keys, or any tensor not bit-identical.
    """
    import safetensors.torch
    import timm
    import torch

    import pce_timm  # noqa: F401 - registers the pce_* architectures and tags

    expected = safetensors.torch.load_file(weights)
    for source in (name, f'hf-hub:{repo_id}'):
        state = timm.create_model(source, pretrained=True).state_dict()
        if state.keys() != expected.keys():
            raise OfflineLoadError(f'{source}: other keys than {weights}')
        differ = [k for k in state if not torch.equal(state[k], expected[k])]
        if differ:
            raise OfflineLoadError(f'{source}: weights differ from {weights}: {differ[:3]}')


def verify_offline(name: str, repo_id: str, weights: PathLike, cache_dir: PathLike) -> None:
    """Run :func:`check_offline_load` in a fresh ``HF_HUB_OFFLINE=1`` interpreter that reads ``cache_dir``.

    The child imports the same pce_timm as this process (its folder is the child's working directory).

    Raises:
        OfflineLoadError: the child failed; the message is the last line of its stderr.
    """
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(Path(cache_dir).resolve()))
    weights = Path(weights).resolve()  # the child runs elsewhere
    command = [sys.executable, '-m', 'pce_timm.release.verify', name, repo_id, str(weights)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=_package_parent())
    if proc.returncode != 0 or proc.stdout.strip() != 'ok':
        tail = (proc.stderr.strip().splitlines() or ['?'])[-1]
        raise OfflineLoadError(f'offline load of {name} / hf-hub:{repo_id}: {tail}')


def _package_parent() -> Path:
    import pce_timm

    return Path(pce_timm.__file__).resolve().parents[1]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m pce_timm.release.verify', description=__doc__.split('\n\n')[0])
    parser.add_argument('name', help='registry name with tag, e.g. pce_resnet18.fmnist')
    parser.add_argument('repo_id', help='Hub repo the tag points at, e.g. pce-timm/pce_resnet18.fmnist')
    parser.add_argument('weights', type=Path, help="the release's model.safetensors")
    args = parser.parse_args(argv)
    try:
        check_offline_load(args.name, args.repo_id, args.weights)
    except OfflineLoadError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print('ok')
    return 0


if __name__ == '__main__':
    sys.exit(main())
