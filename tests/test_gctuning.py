"""The servers' garbage collector settings (in a child process: they last a process' life)."""

from __future__ import annotations

import subprocess
import sys

from dicomfs.gctuning import GC_THRESHOLDS

SCRIPT = """
import gc
from dicomfs.gctuning import tune_for_a_server
kept = [[n] for n in range(1000)]  # objects made while starting
tune_for_a_server()
cycle = []
cycle.append(cycle)
del cycle
print(gc.get_threshold(), gc.get_freeze_count() >= 1000, gc.collect() >= 1)
"""


def test_a_tuned_server_freezes_its_start_and_still_collects_cycles() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split("\n")[0] == f"{GC_THRESHOLDS} True True"
