"""The kernel's read-ahead for the mount: how many bytes one FUSE READ request may carry.

Reads through the page cache reach the daemon in requests of the device's read-ahead size,
128 KiB by default: a 0.5 MB CT slice was four READ requests, each a round trip through pyfuse3
and trio. FUSE lets the daemon only lower it in its INIT reply, but root may raise it afterwards
through ``/sys/class/bdi/<major>:<minor>/read_ahead_kb``, up to the connection's max_pages (1 MiB
with libfuse 3).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["set_read_ahead"]

_log = logging.getLogger(__name__)
_BDI = Path("/sys/class/bdi")


def set_read_ahead(mountpoint: Path, kib: int, *, bdi: Path = _BDI) -> bool:
    """Set the read-ahead of the file system at ``mountpoint`` to ``kib``; True when it was set.

    Call it from a thread once the mount serves requests: the stat is a request to the daemon,
    and the kernel applies the daemon's INIT reply to the device over any value set before it.
    Not being allowed (not root, a read-only /sys in a container) is logged, not raised: the
    mount works as well, with more requests per large read.
    """
    try:
        device = os.stat(mountpoint).st_dev
        (bdi / f"{os.major(device)}:{os.minor(device)}" / "read_ahead_kb").write_text(f"{kib}\n")
    except OSError as error:
        _log.info("read-ahead of %s left as it is (%s)", mountpoint, error)
        return False
    _log.info("read-ahead of %s set to %d KiB", mountpoint, kib)
    return True
