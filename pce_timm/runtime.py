"""Opt-in process-wide CPU allocator tuning: off unless ``PCE_TIMM_MALLOC_TUNING=1``.

glibc's malloc hands blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) straight to the
kernel and returns them on free, so every large activation of every step is a fresh mapping whose pages
fault in one by one. A training step allocates and frees the same sizes again and again, and on CPU those
page faults cost as much as the arithmetic of the cheap ops around a convolution. PyTorch's CPU
performance guide recommends jemalloc or TCMalloc for this; :func:`keep_freed_memory` gets the same effect
from the allocator already loaded, by telling glibc to keep freed memory for reuse.

Nothing here runs on import, and the CLIs (``pce_timm.train.cli.run_cli``) leave the allocator alone by
default, so a script's speed is what a user's own process gets. The environment variable decides:

- ``PCE_TIMM_MALLOC_TUNING=1``: the CLIs call :func:`keep_freed_memory` before they start work
  (:func:`keep_freed_memory_if_enabled`);
- unset, or any other value: the CLIs change nothing;
- ``PCE_TIMM_MALLOC_TUNING=0`` also vetoes an explicit :func:`keep_freed_memory` call (e.g. the
  benchmark's tuned row).

The alternative that needs no code: ``LD_PRELOAD`` jemalloc or TCMalloc.
"""
import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ['ENV_SWITCH', 'keep_freed_memory', 'keep_freed_memory_if_enabled']

_logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

ENV_SWITCH = 'PCE_TIMM_MALLOC_TUNING'


def keep_freed_memory(
        mmap_threshold: int = 1 << 30,
        trim_threshold: int = 1 << 30,
        top_pad: int = 64 << 20,
) -> bool:
    """Make glibc malloc serve blocks up to ``mmap_threshold`` bytes from its heap and keep up to
    ``trim_threshold`` bytes of freed memory, so repeated large allocations reuse pages instead of
    faulting in new ones. The process keeps its peak heap until it exits.

    Returns True if the settings were applied; False (and changes nothing) when vetoed by
    ``PCE_TIMM_MALLOC_TUNING=0``, off Linux, or when the C library is not glibc.
    """
    if os.environ.get(ENV_SWITCH, '1') == '0' or not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, top_pad)))
    if not applied:
        _logger.warning('glibc mallopt refused a setting; the allocator keeps some of its defaults')
    return applied


def keep_freed_memory_if_enabled() -> bool:
    """:func:`keep_freed_memory` only when the user opted in with ``PCE_TIMM_MALLOC_TUNING=1``; else nothing.

    Returns whether the settings were applied.
    """
    if os.environ.get(ENV_SWITCH) != '1':
        return False
    return keep_freed_memory()
