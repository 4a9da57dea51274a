"""pce_timm.progress: whole lines in a log file, a live bar on a terminal."""
import io

import pytest
from tqdm import tqdm as std_tqdm

from pce_timm.progress import LogBar, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_whole_lines_and_the_final_state(monkeypatch):
    monkeypatch.delenv('PCE_TIMM_PROGRESS', raising=False)
    log = io.StringIO()
    bar = progress_bar(range(5), desc='train 1/2', file=log, log_interval=0, leave=False)
    assert isinstance(bar, LogBar)
    for i in bar:
        bar.set_postfix(loss=f'{1.0 / (i + 1):.3f}')
    text = log.getvalue()
    assert '\r' not in text and '\x1b' not in text and text.endswith('\n')
    lines = text.splitlines()
    assert lines[0].startswith('train 1/2:   0%') and lines[-1].startswith('train 1/2: 100%')
    assert '5/5' in lines[-1] and 'loss=0.200' in lines[-1]
    assert sum('100%' in line for line in lines) == 1  # the final state once, however the bar closed


def test_a_log_file_gets_a_line_per_interval_not_per_step(monkeypatch):
    monkeypatch.delenv('PCE_TIMM_PROGRESS', raising=False)
    log = io.StringIO()
    for _ in progress_bar(range(1000), desc='eval', file=log, log_interval=3600):
        pass
    assert log.getvalue().splitlines()[-1].startswith('eval: 100%') and len(log.getvalue().splitlines()) == 2


def test_a_terminal_gets_the_live_bar_and_the_switch_overrides(monkeypatch):
    monkeypatch.delenv('PCE_TIMM_PROGRESS', raising=False)
    bar = progress_bar(range(3), file=_Terminal())
    assert not isinstance(bar, LogBar) and isinstance(bar, std_tqdm)
    bar.close()
    monkeypatch.setenv('PCE_TIMM_PROGRESS', 'log')
    bar = progress_bar(range(3), file=_Terminal())
    assert isinstance(bar, LogBar)
    bar.close()
    monkeypatch.setenv('PCE_TIMM_PROGRESS', 'live')
    assert not isinstance(progress_bar(range(3), file=io.StringIO(), disable=True), LogBar)
    monkeypatch.setenv('PCE_TIMM_PROGRESS', 'sometimes')
    with pytest.raises(ValueError, match="PCE_TIMM_PROGRESS='sometimes': accepted 'log'"):
        progress_bar(range(3), file=io.StringIO())


def test_a_disabled_bar_writes_nothing(monkeypatch):
    monkeypatch.delenv('PCE_TIMM_PROGRESS', raising=False)
    log = io.StringIO()
    for _ in progress_bar(range(3), file=log, disable=True):
        pass
    assert log.getvalue() == ''
