"""What a helper process of a dicomfs daemon does first, whatever its job.

A forked child would inherit the parent's open LMDB environment, which LMDB forbids using across
``fork``: helpers are spawned (the upload ingest) or forked by a fork server (bulk workers, see
``store.bulk``, which watch their parent in their own way). A spawned helper dies with its parent
(``PR_SET_PDEATHSIG``), so no orphan writes a blob after the next start's recovery has run.

The fork server is a fresh ``python -c``, which puts the current directory first on its path, and
Python 3.11's server ignores the parent's path it is given: a folder named ``dicomfs`` there became
the package in the server (an editable install finds the real one only after the path), and every
worker failed. So it starts under ``PYTHONSAFEPATH`` (see ``importing_as_the_parent``). A spawned
helper is safe: it takes its parent's path before it imports anything of ours.
"""

from __future__ import annotations

import ctypes
import os
import signal
from contextlib import contextmanager
from typing import Iterator

__all__ = ["become_helper_of", "importing_as_the_parent", "leave_the_terminal_to_the_parent"]

_PR_SET_PDEATHSIG = 1


@contextmanager
def importing_as_the_parent() -> Iterator[None]:
    """Start the fork server in this block: its interpreter leaves the current directory off its
    path, so it imports dicomfs from where this process did, whatever the directory holds.

    The variable is set only while the server starts: other programs this process runs keep their
    usual path.
    """
    before = os.environ.get("PYTHONSAFEPATH")
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONSAFEPATH"]
        else:
            os.environ["PYTHONSAFEPATH"] = before


def become_helper_of(parent: int) -> None:
    """Die with ``parent`` (the process that spawned this one), and leave it the terminal."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    leave_the_terminal_to_the_parent()


def leave_the_terminal_to_the_parent() -> None:
    """Ignore Ctrl-C (the parent's to handle) and let go of the parent's standard output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Results travel through pipes; holding the parent's stdout would keep a reader of the
    # command's output (a script, a test) waiting after the command itself has ended.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
