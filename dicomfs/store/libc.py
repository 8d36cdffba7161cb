"""The two C library calls the store needs and Python's ``os`` lacks: ``syncfs`` and ``madvise``.

The library is loaded at the first call: importing ``ctypes`` took ~4 ms of every command's
start, and the commands that only read (``ls``, ``export``) never make either call.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["MADV_DONTNEED", "madvise", "syncfs"]

MADV_DONTNEED = 4  # <sys/mman.h> on Linux


@functools.cache
def _libc() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # the C library already loaded (find_library runs ldconfig)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def syncfs(fd: int) -> None:
    """Make everything written on ``fd``'s filesystem durable; OSError when the kernel says no."""
    if _libc().syncfs(fd) != 0:
        import ctypes

        error = ctypes.get_errno()
        raise OSError(error, f"syncfs failed: {os.strerror(error)}")


def madvise(start: int, length: int, advice: int) -> None:
    """Advise the kernel about ``length`` bytes mapped at ``start``; a refusal is ignored (it is advice)."""
    _libc().madvise(start, length, advice)
