"""Process-wide CPU settings the scripts apply before they start work.

glibc's malloc hands blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) straight to the
kernel and returns them on free, so every large activation of every step is a fresh mapping whose pages
fault in one by one. A training step allocates and frees the same sizes again and again, and on CPU those
page faults cost as much as the arithmetic of the cheap ops around a convolution. PyTorch's CPU
performance guide recommends jemalloc or TCMalloc for this; :func:`keep_freed_memory` gets the same effect
from the allocator already loaded, by telling glibc to keep freed memory for reuse.

Set ``PCE_TIMM_MALLOC_TUNING=0`` to leave the allocator alone.
"""
import ctypes
import ctypes.util
import logging
import os
import sys

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

    Returns True if the settings were applied; False (and changes nothing) when switched off by
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
