"""What the scripts share: clear one-line errors instead of tracebacks for the user's mistakes, and the
opt-in CPU allocator setting of :mod:`pce_timm.runtime` (off unless ``PCE_TIMM_MALLOC_TUNING=1``)."""
import logging
import sys
from typing import Any, Callable, Sequence, Tuple, Type

from pce_timm.data import DatasetNotFoundError
from pce_timm.hub.offline import MissingWeightsError
from pce_timm.hub.release import ReleaseError
from pce_timm.runtime import keep_freed_memory_if_enabled

from .checkpoint import NonFiniteLossError, RunFolderError
from .models import ModelSourceError
from .recipe import RecipeError

__all__ = ['USER_ERRORS', 'run_cli']

# (exception types, exit code): the user's mistakes and missing inputs, printed as one ``error: ...`` line.
USER_ERRORS: Tuple[Tuple[Tuple[Type[BaseException], ...], int], ...] = (
    ((RecipeError, ReleaseError, ModelSourceError), 2),  # bad recipe / arguments, unreadable weight files
    ((DatasetNotFoundError, MissingWeightsError), 3),  # dataset or pretrained weights missing
    ((NonFiniteLossError,), 4),  # the loss became NaN / inf
    ((RunFolderError,), 6),  # the run folder is in use, not writable or full, or no checkpoint in it loads
)


def run_cli(main: Callable[[], Any], extra_errors: Sequence[Tuple[Tuple[Type[BaseException], ...], int]] = ()) -> int:
    """Run ``main``; print the errors of :data:`USER_ERRORS` (and a script's own ``extra_errors``, checked first)
    as ``error: ...`` and return their exit code, 0 when done.

    Other exceptions keep their traceback (they are bugs, not user errors). The process-wide allocator is
    tuned only when the user opted in (:func:`pce_timm.runtime.keep_freed_memory_if_enabled`).
    """
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    keep_freed_memory_if_enabled()  # the allocator is left alone unless the user asked
    try:
        main()
    except Exception as e:
        for types, code in (*extra_errors, *USER_ERRORS):
            if isinstance(e, types):
                print(f'error: {_message(e)}', file=sys.stderr)
                return code
        raise
    return 0


def _message(error: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (whose message torch prefixes with the
    worker's traceback), only the original message."""
    text = str(error)
    if text.startswith('Caught ') and '\nOriginal Traceback' in text:
        last = text.rstrip().splitlines()[-1]  # '<module>.<Type>: <message>'
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text
