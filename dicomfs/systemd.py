"""Readiness notifications for systemd services of ``Type=notify`` (the sd_notify protocol).

A datagram to ``$NOTIFY_SOCKET``; outside systemd the variable is unset and nothing is sent. The
protocol is three lines of code, so no library is added for it.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify_systemd"]

_log = logging.getLogger(__name__)


def notify_systemd(message: str) -> None:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ...) to systemd, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as error:
            _log.warning("cannot notify systemd at %s: %s", address, error)
