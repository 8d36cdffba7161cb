"""A real bridge for tests: ``dicomfs webdav`` in a subprocess on 127.0.0.1, a free port, and a
tiny HTTP client for requests the standard library can send as they are."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from tests.conftest import dicomfs_command

__all__ = ["Answer", "Client", "Server", "serve"]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Client:
    """Requests to a bridge at ``url``, sent exactly as given."""

    url: str
    context: ssl.SSLContext | None = None
    auth: tuple[str, str] | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def connection(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=60)
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None) -> Answer:
        """One request, the path sent exactly as given (no normalisation, no quoting)."""
        headers = dict(headers or {})
        credentials = auth or self.auth
        if credentials is not None and "Authorization" not in headers:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()


@dataclass
class Server(Client):
    """A ``dicomfs webdav`` process and a client for it."""

    process: subprocess.Popen[str] | None = None
    store: Path = Path()
    log: Path = Path()
    """The server's log (stderr), while it runs."""


@contextlib.contextmanager
def serve(store: Path, *, config: Path | None = None, args: tuple[str, ...] = (),
          context: ssl.SSLContext | None = None, auth: tuple[str, str] | None = None) -> Iterator[Server]:
    """Run ``dicomfs webdav`` on a free loopback port until the block ends."""
    command = [*dicomfs_command(), "--store", str(store)]
    if config is not None:
        command += ["--config", str(config)]
    env = {**os.environ, "DICOMFS_CONFIG": os.devnull if config is None else str(config)}
    # The log goes to a file: a pipe nobody reads would fill and stall the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="dicomfs-webdav-", suffix=".log", delete=False)
    process = subprocess.Popen([*command, "webdav", "--bind", "127.0.0.1:0", *args], stdout=subprocess.PIPE,
                               stderr=log, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("serving "):
            process.kill()
            process.wait()
            raise AssertionError(f"dicomfs webdav did not start: {line}{Path(log.name).read_text()}")
        yield Server(line.rsplit(" at ", 1)[1].split()[0], context, auth, process=process, store=store,
                     log=Path(log.name))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()
        os.unlink(log.name)
