"""A CSV tracker for accelerate (none ships with it), and the tracker list a run asks accelerate for."""
import csv
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from accelerate.tracking import GeneralTracker, on_main_process

__all__ = ['CSVTracker', 'build_trackers']

_logger = logging.getLogger(__name__)


class CSVTracker(GeneralTracker):
    """Append every logged scalar to ``<logging_dir>/metrics.csv`` as a ``time,step,name,value`` row.

    The long ("tidy") layout accepts any set of keys per call, appends across resumes without rewriting,
    and pivots in one line: ``pandas.read_csv(path).pivot_table(index='step', columns='name', values='value')``.
    Hyperparameters go to ``hparams.csv`` (``name,value``). Runs on the main process only.
    """

    name = 'csv'
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: Union[str, os.PathLike]):
        super().__init__()
        self.run_name = run_name
        self.logging_dir = Path(logging_dir)
        self.path = self.logging_dir / 'metrics.csv'
        self._file = None
        self._writer = None

    @on_main_process
    def start(self):
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open('a', newline='')
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(['time', 'step', 'name', 'value'])
            self._file.flush()

    @property
    def tracker(self):
        return self._writer

    @on_main_process
    def store_init_configuration(self, values: Dict[str, Any]):
        with (self.logging_dir / 'hparams.csv').open('w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['name', 'value'])
            for key, value in values.items():
                writer.writerow([key, value])

    @on_main_process
    def log(self, values: Dict[str, Any], step: Optional[int] = None, **kwargs):
        now = f'{time.time():.3f}'
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.writerow([now, '' if step is None else step, key, value])
        self._file.flush()

    @on_main_process
    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def build_trackers(log_with: Sequence[str], logging_dir: Union[str, os.PathLike], run_name: str) -> List[Any]:
    """The ``log_with`` list for ``Accelerator``: 'csv' becomes a :class:`CSVTracker`, the rest pass through.

    TensorBoard is dropped with a warning when neither ``tensorboard`` nor ``tensorboardX`` is installed, so a
    recipe asking for it still runs on a minimal install (``pip install pce_timm[track]`` adds it).
    """
    trackers: List[Any] = []
    for name in log_with:
        if name == 'csv':
            trackers.append(CSVTracker(run_name, logging_dir))
        elif name == 'tensorboard' and not _has_tensorboard():
            _logger.warning('tensorboard is not installed; not logging to TensorBoard (pip install tensorboard)')
        else:
            trackers.append(name)
    return trackers


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return is_tensorboard_available()
