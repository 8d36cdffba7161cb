"""cheroot with a gate in front of its worker threads: a connection reaches a worker only once
its whole request head has arrived.

cheroot hands a connection to a worker as soon as its socket is readable, and the worker then
reads the request line and headers blocking, for up to the server's timeout per read. Thirty-two
clients sending a header line every ten seconds (slowloris) so hold every worker, and nobody else
is answered. Here the selector thread gathers each head itself, without blocking (``recv`` of
what has arrived, the TLS handshake step by step), and hands the connection over with the head
already in its read buffer; a worker then waits only on request bodies and on the application.
The gate also bounds the head, like nginx's ``large_client_header_buffers`` and
``client_header_timeout``: 64 KiB (414 when the request line alone is longer, else 431) and a
deadline for the whole head (408).

It leans on two cheroot internals, both used by cheroot itself: the connection manager's
selector, and the read buffer of the ``_pyio`` reader (``has_data()`` reads it too).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import time
from typing import Any

from cheroot import wsgi
from cheroot.connections import ConnectionManager
from cheroot.makefile import MakeFile
from cheroot.server import HTTPConnection, HTTPRequest
from cheroot.ssl.builtin import BuiltinSSLAdapter

__all__ = ["GatedServer", "HEAD_LIMIT", "LazyHandshakeAdapter"]

HEAD_LIMIT = 64 * 1024
"""Bytes of request line and headers together. nginx allows 4 x 8 KiB, Apache 100 x 8 KiB; a
WebDAV head (long UTF-8 paths twice, in the URL and a Destination, lock tokens, cookies of a
proxy) stays far below 64 KiB, and the gate holds at most this much per waiting connection."""
_READ_SIZE = HEAD_LIMIT + 1
_HEAD_END = b"\r\n\r\n"
_LINGER_SECONDS = 2.0
"""After refusing an oversized head, how long the rest of it is read and dropped before closing,
so that the client reads the refusal rather than a reset (nginx's lingering_close)."""
_DRAIN_LIMIT = 1 << 20
"""cheroot reads and drops an unread request body after an early answer (a 401 to a PUT) to keep
the connection; past this many bytes the connection is closed instead."""
_CHUNK_LINE_MAX = 4096
"""Bytes in one line of a chunked body (its size and extensions; a trailer): nginx allows 4 KiB too."""
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

_READY, _WAITING, _CLOSED = "ready", "waiting", "closed"


class _BoundedLines:
    """A connection's reader whose lines (a chunk's size line, trailers) end within
    ``_CHUNK_LINE_MAX`` bytes: cheroot reads them unbounded, so one endless line filled memory."""

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile
        self.read = rfile.read

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._rfile.readline(_CHUNK_LINE_MAX)
        if len(line) == _CHUNK_LINE_MAX and not line.endswith(b"\n"):
            raise ValueError(f"a chunk's size line is longer than {_CHUNK_LINE_MAX} bytes")
        return line


class StrictRequest(HTTPRequest):  # type: ignore[misc]
    """cheroot's request, refusing a Content-Length that is not a byte count (cheroot takes ``-5``
    and then reads the body as the next request), bounding the lines of a chunked body, and
    closing the connection after an answer that left a large or chunked body unread (the next
    request could not be found in what follows)."""

    def respond(self) -> None:
        if self.chunked_read:
            self.conn.rfile, plain = _BoundedLines(self.conn.rfile), self.conn.rfile
            try:
                super().respond()
            finally:
                self.conn.rfile = plain
        else:
            super().respond()

    def read_request_headers(self) -> bool:
        if not super().read_request_headers():
            return False
        length = self.inheaders.get(b"Content-Length")
        if length is not None and not (length.isdigit() and len(length) <= 18):  # 18 digits: < 2**63
            self.simple_response("400 Bad Request", "Content-Length must be a byte count")
            return False
        return True

    def send_headers(self) -> None:
        if getattr(self.rfile, "remaining", 0) > _DRAIN_LIMIT or (self.chunked_read and not self.rfile.closed):
            self.close_connection = True
        super().send_headers()


class GatedConnection(HTTPConnection):  # type: ignore[misc]
    """A connection and the part of its next request head gathered so far."""

    RequestHandlerClass = StrictRequest

    def __init__(self, server: Any, sock: socket.socket, makefile: Any = MakeFile) -> None:
        super().__init__(server, sock, makefile)
        self.last_used = time.time()
        self.head = bytearray()
        self.head_since: float | None = self.last_used
        """When this connection began to owe a head (accepted, or its first byte after a request)."""
        self.handshaken = not isinstance(sock, ssl.SSLSocket)
        self.lingering_until: float | None = None


class HeadGate(ConnectionManager):  # type: ignore[misc]
    """cheroot's connection manager, also closing connections whose head is late."""

    def wait(self, conn: GatedConnection) -> None:
        """Watch ``conn`` again until more of its head arrives."""
        self._selector.register(conn.socket.fileno(), selectors.EVENT_READ, data=conn)

    def _expire(self, threshold: float) -> None:
        now = time.time()
        late_head = now - self.server.header_timeout
        expired = []
        for sock_fd, conn in list(self._selector.connections):
            if conn is self.server:
                continue
            if conn.lingering_until is not None:
                late = now > conn.lingering_until
            elif conn.head_since is not None:
                late = conn.head_since < late_head
                if late:
                    _answer(conn, "408 Request Timeout", "the request head did not arrive in time")
            else:
                late = conn.last_used < threshold  # idle between requests: cheroot's keep-alive timeout
            if late:
                expired.append((sock_fd, conn))
        for sock_fd, conn in expired:
            self._selector.unregister(sock_fd)
            conn.close()


class GatedServer(wsgi.Server):  # type: ignore[misc]
    """cheroot's WSGI server with the head gate; ``header_timeout``: seconds a client has to send
    a whole request head."""

    ConnectionClass = GatedConnection

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_request_header_size = HEAD_LIMIT  # cheroot's own check, behind the gate's

    def prepare(self) -> None:
        super().prepare()
        self._connections._selector.close()  # nothing has used cheroot's manager yet
        self._connections = HeadGate(self)

    def process_conn(self, conn: GatedConnection) -> None:
        """Hand ``conn`` to a worker once its head is in; until then the selector watches it."""
        state = _gather(self, conn)
        if state == _READY:
            super().process_conn(conn)
        elif state == _WAITING:
            self._connections.wait(conn)
        else:
            conn.close()


class LazyHandshakeAdapter(BuiltinSSLAdapter):  # type: ignore[misc]
    """cheroot's TLS adapter, leaving the handshake to the gate: cheroot does it in the one thread
    that accepts connections, so a client that connects and says nothing stopped every accept."""

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
        return self.context.wrap_socket(sock, do_handshake_on_connect=False, server_side=True), {}


def _gather(server: GatedServer, conn: GatedConnection) -> str:
    """Read what has arrived of ``conn``'s head without blocking: ready (the head is in the read
    buffer), waiting for more, or closed (the client left, or was refused)."""
    sock = conn.socket
    rfile = conn.rfile
    # the end of the head is looked for only in what is new: a byte at a time costs no rescan
    searched = max(0, len(conn.head) - len(_HEAD_END) + 1)
    if rfile.has_data():  # pipelined: the next head (or part of it) came with the last request
        conn.head += rfile._read_buf[rfile._read_pos:]
        rfile._read_buf, rfile._read_pos = b"", 0
    if conn.head and conn.head_since is None:
        conn.head_since = time.time()
    sock.settimeout(0)
    try:
        if conn.lingering_until is not None:  # dropped, a bounded amount per turn: others wait meanwhile
            return _CLOSED if not sock.recv(_READ_SIZE) else _WAITING
        if not conn.handshaken:
            sock.do_handshake()
            conn.handshaken = True
            conn.ssl_env = server.ssl_adapter.get_environ(sock)
        while conn.head.find(_HEAD_END, searched) == -1 and len(conn.head) <= HEAD_LIMIT:
            searched = max(0, len(conn.head) - len(_HEAD_END) + 1)
            data = sock.recv(_READ_SIZE - len(conn.head))  # a waiting connection holds HEAD_LIMIT + 1 at most
            if not data:
                return _CLOSED
            if conn.head_since is None:
                conn.head_since = time.time()
            conn.head += data
    except _WOULD_BLOCK:
        return _WAITING
    except (OSError, ValueError):  # reset, a failed handshake, plain HTTP to the TLS port
        return _CLOSED
    finally:
        if sock.fileno() != -1:
            sock.settimeout(server.timeout)
    end = conn.head.find(_HEAD_END)
    if end == -1 or end + len(_HEAD_END) > HEAD_LIMIT:
        line_end = conn.head.find(b"\n", 0, HEAD_LIMIT)
        if line_end == -1:
            _answer(conn, "414 URI Too Long", f"the request line is longer than {HEAD_LIMIT} bytes")
        else:
            _answer(conn, "431 Request Header Fields Too Large", f"the request head is longer than {HEAD_LIMIT} bytes")
        conn.head = bytearray()
        conn.lingering_until = time.time() + _LINGER_SECONDS
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        return _WAITING
    rfile._read_buf, rfile._read_pos = bytes(conn.head), 0
    conn.head, conn.head_since = bytearray(), None
    return _READY


def _answer(conn: GatedConnection, status: str, message: str) -> None:
    """Send a short refusal without blocking (it fits a socket's send buffer; else it is lost)."""
    body = f"{status}: {message}\n".encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError, ValueError):  # gone, or a full buffer: the client reads a close
        conn.socket.settimeout(0)
        conn.socket.send(head + body)
