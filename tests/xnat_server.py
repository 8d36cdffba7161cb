"""A stand-in for an XNAT server's session and import services, in a thread, on 127.0.0.1 only.

    POST /data/JSESSION          Basic credentials -> the session id as text/plain and
                                 Set-Cookie: JSESSIONID=<id>; Path=/; HttpOnly (401 otherwise)
    POST /data/services/import   needs a live JSESSIONID cookie (401 otherwise); checks a Digest
                                 header when there is one (400 on a mismatch), keeps the body and
                                 unzips an application/zip one

Switches for the unhappy paths: :meth:`XnatServer.expire_sessions` (now, or after N more accepted
imports), :meth:`XnatServer.fail_next` (500 or another status for the next N imports) and
:meth:`XnatServer.refuse_next` (400, 422 ...). It records logins, every request and every import.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import secrets
import threading
import zipfile
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

__all__ = ["Import", "XnatServer", "xnat_server"]


@dataclass
class Import:
    """One POST to the import service and how it was answered."""

    status: int
    query: str
    content_type: str
    digest: str
    body: bytes
    members: dict[str, bytes] = field(default_factory=dict)
    """For a zip: member name -> bytes, in the zip's order."""


@dataclass
class XnatServer:
    users: dict[str, str]
    url: str = ""
    logins: int = 0
    """Successful logins."""
    refused_logins: int = 0
    requests: list[tuple[str, int]] = field(default_factory=list)
    """(path, status) of every request."""
    imports: list[Import] = field(default_factory=list)
    digests_verified: int = 0
    set_cookie: bool = True
    """False: the login answers the session id as text only, as CTP expects XNAT to."""
    _sessions: set[str] = field(default_factory=set)
    _expire_after: int | None = None
    _failures: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def accepted(self) -> list[Import]:
        return [i for i in self.imports if i.status == 200]

    def expire_sessions(self, after: int = 0) -> None:
        """Forget every session, now or once ``after`` more imports were accepted."""
        with self._lock:
            if after:
                self._expire_after = after
            else:
                self._sessions.clear()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer ``status`` to the next ``count`` imports (after checking the session)."""
        with self._lock:
            self._failures += [status] * count

    def refuse_next(self, count: int, status: int = 400) -> None:
        self.fail_next(count, status)

    def login(self, authorization: str) -> str | None:
        scheme, _, encoded = authorization.partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            user = password = ""
        with self._lock:
            if scheme != "Basic" or not user or self.users.get(user) != password:
                self.refused_logins += 1
                return None
            self.logins += 1
            session = secrets.token_hex(16).upper()
            self._sessions.add(session)
            return session

    def import_(self, cookie: str, query: str, content_type: str, digest: str, body: bytes) -> tuple[int, str]:
        jar: SimpleCookie = SimpleCookie(cookie)
        session = jar["JSESSIONID"].value if "JSESSIONID" in jar else ""
        received = Import(0, query, content_type, digest, body)
        with self._lock:
            received.status, answer = self._judge(session, received)
            self.imports.append(received)
            if received.status == 200 and self._expire_after is not None:
                self._expire_after -= 1
                if self._expire_after == 0:
                    self._sessions.clear()
                    self._expire_after = None
        return received.status, answer

    def _judge(self, session: str, received: Import) -> tuple[int, str]:
        if session not in self._sessions:
            return 401, "<html><body>Login required</body></html>"
        if self._failures:
            status = self._failures.pop(0)
            return status, f"The import failed: status {status} as the test asked"
        if received.digest:
            algorithm, _, value = received.digest.partition("=")
            if algorithm != "SHA-256" or base64.b64decode(value) != hashlib.sha256(received.body).digest():
                return 400, "Digest does not match the body"
            self.digests_verified += 1
        if received.content_type == "application/zip":
            with zipfile.ZipFile(io.BytesIO(received.body)) as archive:
                received.members = {info.filename: archive.read(info) for info in archive.infolist()}
        return 200, "/data/prearchive/projects/TEST/20240101_000000000/SESSION1\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        path, _, query = self.path.partition("?")
        xnat = self.server.xnat
        headers: dict[str, str] = {}
        if path == "/data/JSESSION":
            session = xnat.login(self.headers.get("Authorization", ""))
            status, text = (200, session) if session else (401, "Bad credentials")
            if session and xnat.set_cookie:
                headers["Set-Cookie"] = f"JSESSIONID={session}; Path=/; HttpOnly"
        elif path == "/data/services/import":
            status, text = xnat.import_(self.headers.get("Cookie", ""), query, self.headers.get("Content-Type", ""),
                                        self.headers.get("Digest", ""), body)
        else:
            status, text = 404, "no such service"
        with xnat._lock:
            xnat.requests.append((path, status))
        data = text.encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "text/plain", "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    xnat: XnatServer


@contextlib.contextmanager
def xnat_server(users: dict[str, str] | None = None) -> Iterator[XnatServer]:
    """An XNAT stand-in listening on 127.0.0.1 (a free port) until the block ends."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.xnat = XnatServer(users if users is not None else {"alice": "secret"})
    server.xnat.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.xnat
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
