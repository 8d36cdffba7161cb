"""What every outgoing HTTP(S) client of the jobs shares: the TLS context a target's options ask
for, what a failure to talk to the server means (worth trying later, or not), and keep-alive
connections, one per sending thread.

The STOW-RS exporter, the XNAT exporter and the peer client each wrap the verdict in their own
error classes and put their own "where" in front; the rules are here once.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Callable

from dicomfs.errors import ConfigError

__all__ = ["STALE_ERRORS", "ThreadConnections", "describe_failure", "read_whole", "tls_context"]

STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
"""What a kept connection the server closed while it was idle gives when written to or read from:
a request that fails so on a connection that served before may go once more on a new one."""


class ThreadConnections:
    """One keep-alive connection per thread to one server, made by ``connect`` when needed.

    Servers close idle connections (Orthanc after 1 s): ``get`` replaces one it finds closed, and
    says whether the one it gives has served before (see ``STALE_ERRORS``). Thread-safe; ``close``
    closes every thread's connection once none sends any more.
    """

    def __init__(self, connect: Callable[[], http.client.HTTPConnection]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served before."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None and closed_by_peer(connection.sock):
            self.discard(connection)
            connection = None
        if connection is not None:
            return connection, True
        connection = self._connect()
        self._local.connection = connection
        with self._lock:
            self._open.add(connection)
        return connection, False

    def discard(self, connection: http.client.HTTPConnection) -> None:
        """Close ``connection``: it may not serve again (an error, an answer not read whole)."""
        connection.close()
        if getattr(self._local, "connection", None) is connection:
            self._local.connection = None
        with self._lock:
            self._open.discard(connection)

    def close(self) -> None:
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            connection.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: the server's close (or stray bytes,
    which make it unusable too)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def tls_context(ca_file: str | None, *, verify: bool, verify_hostname: bool) -> ssl.SSLContext:
    """The client context: the system's authorities (or ``ca_file``'s); ``verify=False`` accepts
    any certificate (dcm4chee's disable-trust-manager), ``verify_hostname=False`` a verified one
    for another host (allow-any-hostname). ConfigError when the CA file cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"cannot load the CA file {ca_file}: {error}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not verify_hostname:
        context.check_hostname = False
    return context


def read_whole(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The answer's body, all of it. Raises HTTPException beyond ``limit`` bytes, and
    IncompleteRead (a failure worth trying again) when the server went away before the end its
    Content-Length announced.

    ``response.read(n)`` hands back what arrived when the connection closes early, without a
    word: a peer killed while it answered gave a cut JSON, taken for a server that does not
    speak JSON, and the job failed for good instead of trying again."""
    body = response.read(limit + 1)
    if len(body) > limit:
        raise http.client.HTTPException(f"an answer of more than {limit} bytes")
    if response.length:  # announced, and bytes still missing
        raise http.client.IncompleteRead(body, response.length)
    return body


def describe_failure(error: BaseException, *, timeout: float, host: str, server: str = "the server") -> tuple[bool, str]:
    """(whether trying again later may work, what happened) for an exception raised while talking
    to ``host``; ``server`` names it in the text ("the peer")."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return False, f"{server}'s TLS certificate is not trusted: {error.verify_message or error}"
    if isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return True, f"the TLS connection was cut: {error}"
    if isinstance(error, ssl.SSLError):
        return False, f"TLS failed: {error.reason or error}"
    if isinstance(error, socket.gaierror):
        return True, f"cannot resolve {host}: {error.strerror or error}"
    if isinstance(error, TimeoutError):
        return True, f"no progress in {timeout:g} s"
    if isinstance(error, http.client.RemoteDisconnected):
        return True, f"{server} closed the connection without answering"
    if isinstance(error, OSError):
        return True, f"{error.strerror or error}"
    if isinstance(error, http.client.IncompleteRead):
        return True, f"the answer was cut after {len(error.partial)} bytes"
    if isinstance(error, http.client.HTTPException):
        text = " ".join(str(error).split())[:300]
        return False, f"the answer is not HTTP: {type(error).__name__} {text}"
    return True, f"{type(error).__name__}: {error}"
