import platform
import sys

import pytest

from pce_timm.runtime import ENV_SWITCH, keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc', reason='glibc mallopt')
def test_keep_freed_memory_applies_on_glibc_and_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, '0')
    assert keep_freed_memory() is False
    monkeypatch.delenv(ENV_SWITCH)
    assert keep_freed_memory() is True
