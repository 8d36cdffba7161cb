"""System calls the store needs and Python's ``os`` lacks: ``syncfs`` and ``madvise`` (from the C
library), and linking an open file under a name (``linkat`` through ``/proc/self/fd``).

The library is loaded at the first call: importing ``ctypes`` took ~4 ms of every command's
start, and the commands that only read (``ls``, ``export``) never make either call.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["MADV_DONTNEED", "link_open_file", "madvise", "syncfs"]

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


_proc_fd_folders: dict[int, int] = {}
"""Process id -> its open ``/proc/self/fd`` folder, kept for the process's life: opening it for
each link cost a third of linking an upload into blobs/. Keyed by process, because a forked
child inherits the parent's, which names the parent's files."""


def link_open_file(fd: int, target: str) -> None:
    """Give the open file ``fd`` the further name ``target`` (a nameless ``O_TMPFILE`` file too):
    ``linkat(AT_SYMLINK_FOLLOW)`` of its ``/proc/self/fd`` entry. Plain ``os.link`` of
    "/proc/self/fd/N" calls ``link()``, which links the symbolic link itself and fails (EXDEV)."""
    pid = os.getpid()
    folder = _proc_fd_folders.get(pid)
    if folder is None:
        folder = _proc_fd_folders[pid] = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.link(str(fd), target, src_dir_fd=folder, follow_symlinks=True)
