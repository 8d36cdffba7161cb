"""Memory settings for dicomfs's long-running servers (the mount, the bridge): the garbage
collector's thresholds and the C allocator's arenas.

**The collector.** A cold walk of a large tree makes tens of thousands of small objects that live
on (the mount's nodes and entry attributes, the tree's cached listings). With CPython's default
thresholds (700, 10, 10) a collection runs every 700 of them and the older generations are
scanned again and again as they grow: building the entries of 32,000 instances for readdir took
341 ms, 134 ms with the collector off and 162-188 ms with the first threshold raised to
10,000-50,000. Through a mount, with the kernel's share added, a cold `find` of that tree gained
~3% and the `ls -lR` after it ~10%. Cycles are still collected, a little later; the objects made
while starting are frozen out of every collection, as they live as long as the process.

**The arenas.** glibc's malloc gives each new thread an arena of its own, up to eight per core,
and an arena keeps what its thread freed. The bridge serves each request on whichever of its 32
threads is free, so every thread's arena grew to the largest answer it had built: after 33
PROPFINDs of a 20,000-patient ``by-patients/`` (10 MB answers) the bridge held 546 MB, and each
request paid ~8,000 page faults as arenas were trimmed and touched again (95-165 ms a request).
Python threads run one at a time under the GIL, so separate arenas buy next to nothing; with
two, the same requests took 83-88 ms and the bridge held 99 MB (one gave 85-89 ms and 88 MB).
``MALLOC_ARENA_MAX`` in the environment, if set, is left to decide.
"""

from __future__ import annotations

import gc
import os

__all__ = ["GC_THRESHOLDS", "MALLOC_ARENAS", "limit_malloc_arenas", "tune_for_a_server"]

GC_THRESHOLDS = (20_000, 20, 10)
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # <malloc.h>


def limit_malloc_arenas(count: int = MALLOC_ARENAS) -> bool:
    """Let glibc's malloc make at most ``count`` arenas from now on (call it before starting
    threads); False when the C library has no ``mallopt`` (not glibc) or the environment's
    ``MALLOC_ARENA_MAX`` decides."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1


def tune_for_a_server() -> None:
    """Freeze what exists now (call it once started) and collect less often from then on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
