"""The servers' memory settings (in child processes: they last a process' life)."""

from __future__ import annotations

import os
import subprocess
import sys

from dicomfs.servermemory import GC_THRESHOLDS, MALLOC_ARENAS

COLLECTOR = """
import gc
from dicomfs.servermemory import tune_for_a_server
kept = [[n] for n in range(1000)]  # objects made while starting
tune_for_a_server()
cycle = []
cycle.append(cycle)
del cycle
print(gc.get_threshold(), gc.get_freeze_count() >= 1000, gc.collect() >= 1)
"""

# Eight threads each allocate from the C heap at the same time (a bytearray of 64 kB is below
# malloc's mmap threshold); glibc's malloc_info then lists one <heap> per arena in use.
ARENAS = """
import ctypes, sys, tempfile, threading
from dicomfs.servermemory import limit_malloc_arenas
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else None
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()
    kept = [bytearray(65536) for _ in range(50)]
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile() as report:
    stream = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(limited, open(report.name).read().count("<heap nr="))
"""


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60,
                          check=True, env=env)
    return done.stdout.split("\n")[0]


def test_a_tuned_server_freezes_its_start_and_still_collects_cycles() -> None:
    assert _run(COLLECTOR) == f"{GC_THRESHOLDS} True True"


def test_a_server_keeps_to_a_few_malloc_arenas_however_many_threads_allocate() -> None:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    limited, arenas = _run(ARENAS, "limit", env=env).split()
    assert limited == "True"
    assert int(arenas) <= MALLOC_ARENAS
    _, unlimited = _run(ARENAS, "no", env=env).split()
    assert int(unlimited) > MALLOC_ARENAS  # glibc's default: an arena per thread, up to 8 per core


def test_the_environment_decides_when_it_sets_malloc_arena_max() -> None:
    limited, arenas = _run(ARENAS, "limit", env={**os.environ, "MALLOC_ARENA_MAX": "1"}).split()
    assert limited == "False"
    assert int(arenas) == 1
