"""What the scripts share: clear one-line errors instead of tracebacks for the user's mistakes."""
import logging
import sys
from typing import Any, Callable

from pce_timm.data import DatasetNotFoundError
from pce_timm.hub.offline import MissingWeightsError
from pce_timm.hub.release import ReleaseError

from .checkpoint import NonFiniteLossError
from .config import RecipeError

__all__ = ['run_cli']


def run_cli(main: Callable[[], Any]) -> int:
    """Run ``main``; print recipe, data and divergence errors as ``error: ...`` and return an exit code.

    Exit codes: 0 done, 2 bad recipe / arguments / unreadable weight files, 3 dataset or pretrained weights
    missing, 4 loss became NaN/inf.
    Other exceptions keep their traceback (they are bugs, not user errors).
    """
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        main()
    except (RecipeError, ReleaseError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except (DatasetNotFoundError, MissingWeightsError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 3
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr)
        return 4
    return 0
