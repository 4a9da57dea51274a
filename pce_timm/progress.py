"""Progress bars that read well on a terminal and in a log file.

On a terminal (or in a notebook) :func:`progress_bar` is ``tqdm.auto.tqdm``: one live bar, redrawn in place.
Written to a file or a pipe (``python scripts/train.py ... > run.log``, CI), a live bar is a single physical
line of carriage returns; there it is a :class:`LogBar` instead: one plain line per ``log_interval`` seconds
and one when it closes, each a whole line, e.g.::

    train 1/2:  41%|####1     | 96/235 [00:30<00:43,  3.20it/s, loss=0.612]
    train 1/2: 100%|##########| 235/235 [01:13<00:00,  3.21it/s, loss=0.488]

``PCE_TIMM_PROGRESS=log`` or ``=live`` overrides the choice (e.g. ``log`` under a terminal multiplexer whose
scroll-back you want to grep).
"""
import os
import sys
from typing import Any, Iterable, Optional

from tqdm import tqdm as std_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.autonotebook import tqdm as notebook_or_std_tqdm  # the notebook widget inside Jupyter, else std

__all__ = ['LOG_INTERVAL_S', 'LogBar', 'progress_bar']

LOG_INTERVAL_S = 30.0
ENV_SWITCH = 'PCE_TIMM_PROGRESS'


class LogBar(std_tqdm):
    """A tqdm that writes whole lines: no carriage returns, no cursor movement, at most one line per
    ``mininterval`` seconds (default :data:`LOG_INTERVAL_S`), plus the final state when it closes."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault('mininterval', LOG_INTERVAL_S)
        kwargs.setdefault('ascii', True)
        kwargs.pop('dynamic_ncols', None)  # a file has no width
        self._last_line_t: Optional[float] = None
        self._last_line_n: Optional[int] = None
        super().__init__(*args, **kwargs)

    # While a bar iterates, its count is brought up to date only when it prints: text set in between shows
    # on the next progress line instead of printing a line of its own with a stale count.
    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s: str = '', refresh: bool = True) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        super().set_description_str(desc, refresh=False)

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        now = self._time()
        if self._last_line_t is not None and now - self._last_line_t < self.mininterval:
            return False
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg == '':  # tqdm clearing a bar: a log keeps its lines
            return True
        self.fp.write((self.__str__() if msg is None else msg) + '\n')
        self.fp.flush()
        self._last_line_t, self._last_line_n = self._time(), self.n
        return True

    def close(self) -> None:
        if self.disable:
            return
        if self._last_line_n != self.n:  # the final state, once
            self.display()
        self.sp = None  # tqdm's close then skips its own clearing / final writes
        super().close()


def _is_live(file: Any) -> bool:
    choice = os.environ.get(ENV_SWITCH, '').strip().lower()
    if choice in ('log', 'live'):
        return choice == 'live'
    if choice:
        raise ValueError(f"{ENV_SWITCH}={choice!r}: accepted 'log' (a line at a time), 'live' (a redrawn bar), "
                         f"or unset (live on a terminal)")
    if notebook_or_std_tqdm is not std_tqdm:  # in a notebook: its widget
        return True
    isatty = getattr(file, 'isatty', None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Optional[Iterable] = None, **kwargs: Any) -> std_tqdm:
    """``tqdm(iterable, **kwargs)``: a live bar on a terminal or in a notebook, a :class:`LogBar` otherwise.

    Takes tqdm's arguments; ``log_interval`` (seconds between log lines) applies to the log form only.
    """
    log_interval = kwargs.pop('log_interval', LOG_INTERVAL_S)
    if _is_live(kwargs.get('file') or sys.stderr):
        return auto_tqdm(iterable, **kwargs)
    kwargs.setdefault('mininterval', log_interval)
    return LogBar(iterable, **kwargs)
