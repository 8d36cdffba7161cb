"""Whether the disk is slow enough now that a small file operation may block for long.

Creating, writing and stating a file in uploads/ takes 2 to 50 us when the disk keeps up, and a
thread hop costs 50 to 90 us on the machines measured (run on threads, `cp -r` into uploads/ took
twice as long). When the disk lags, the same calls wait for the journal, for the kernel's throttling
of writers (up to 200 ms at a time), or for a folder lock an unlink waiting on the journal holds: a
306 ms stall of the event loop was seen, and every FUSE request waited meanwhile. So the mount makes
these calls on the loop while the disk is quiet and on threads while it is not.

"Not quiet" is either of:
- the kernel's pressure stall information for I/O (``/proc/pressure/io``, Linux 4.20 and later):
  tasks waited on I/O for more than ``BUSY_PERCENT`` of the last 10 seconds;
- one of those calls made on the loop took more than ``SLOW_CALL_SECONDS``: the next
  ``SLOW_HOLD_SECONDS`` go to threads whatever the pressure figures say. The bar is well above
  the interpreter's 5 ms switch interval: a call that only waited for the GIL back from the
  ingest thread would have waited as long on a thread, and at 5 ms such waits sent whole
  `cp -r` runs to threads.

The hold starts short and doubles, up to ``MOST_HOLD_SECONDS``, each time a call is slow again
within one hold of the last one's end; a lag that lasts keeps the calls on threads, a single
stall does not. With a fixed 10 s hold, one 30-40 ms write (a large file meeting the ingest's
``syncfs``) sent the rest of a `cp -r` of a CD to threads: half the `cp -r` runs of 2,451 files
(102 MB) took 3.3-5.0 s instead of 1.6-2.3 s, the mount using twice the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["BUSY_PERCENT", "MOST_HOLD_SECONDS", "SLOW_CALL_SECONDS", "SLOW_HOLD_SECONDS", "DiskPressure", "io_pressure"]

BUSY_PERCENT = 10.0
SLOW_CALL_SECONDS = 0.02
SLOW_HOLD_SECONDS = 1.0
MOST_HOLD_SECONDS = 10.0
PRESSURE_FILE = Path("/proc/pressure/io")

_log = logging.getLogger(__name__)


def io_pressure(path: Path = PRESSURE_FILE) -> float | None:
    """The share of the last 10 seconds (percent) in which some task waited on I/O; None when
    the kernel does not say (no PSI, or a file that does not read as PSI)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "some":
            figures = dict(field.partition("=")[::2] for field in rest.split())
            try:
                return float(figures["avg10"])
            except (KeyError, ValueError):
                return None
    return None


class DiskPressure:
    """The mount's view of whether small file operations may block now (``busy``)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._pressure_busy = False
        self._slow_until = 0.0
        self._hold = SLOW_HOLD_SECONDS

    @property
    def busy(self) -> bool:
        return self._pressure_busy or self._clock() < self._slow_until

    def measured(self, percent: float | None) -> None:
        """The latest I/O pressure figure (``io_pressure``); None leaves only slow calls to tell."""
        busy = percent is not None and percent > BUSY_PERCENT
        if busy != self._pressure_busy:
            _log.debug("I/O pressure %.1f%%: small uploads/ file calls now run %s", percent or 0.0,
                       "on threads" if busy else "on the event loop")
        self._pressure_busy = busy

    def took(self, seconds: float) -> None:
        """A call made on the loop took ``seconds``."""
        if seconds <= SLOW_CALL_SECONDS:
            return
        now = self._clock()
        lasting = now < self._slow_until + self._hold  # slow again soon after the last hold ended
        self._hold = min(self._hold * 2, MOST_HOLD_SECONDS) if lasting else SLOW_HOLD_SECONDS
        if not self.busy:
            _log.info("a file call in uploads/ took %.0f ms (the disk lags): such calls run on threads "
                      "for the next %.0f s", seconds * 1000, self._hold)
        self._slow_until = now + self._hold
