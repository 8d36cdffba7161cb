"""A small reverse proxy in front of the Orthanc of tests/orthanc_server.py, run in its network
namespace, for what Orthanc cannot do itself:

- check a bearer token: with ``token``, it answers 401 unless ``Authorization: Bearer <token>``
  matches;
- go away at an exact point of a job: with ``hold_after=N``, the POSTs after the N-th wait until the
  test opens the gate, so the test can stop Orthanc with a known number of requests answered.

Otherwise it forwards each request (Content-Length or chunked body, decoded) to Orthanc and returns
Orthanc's answer; when Orthanc does not answer, it closes the connection unanswered, as a server
that died would. It logs every request as a JSON line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.orthanc_server import Orthanc

# The proxy: argv is (upstream port, log file, hold after (-1: never), gate file); the token, if
# any, comes in $PROXY_TOKEN so that it is not on a command line. It listens on a free loopback
# port and prints that port on stdout.
PROXY_SCRIPT = r'''
import hmac
import http.client
import http.server
import json
import os
import sys
import threading
import time

UPSTREAM_PORT = int(sys.argv[1])
LOG = open(sys.argv[2], "a", buffering=1)
HOLD_AFTER = int(sys.argv[3])
GATE = sys.argv[4]
TOKEN = os.environ.get("PROXY_TOKEN")
EXPECTED = None if TOKEN is None else ("Bearer " + TOKEN).encode()
LOCK = threading.Lock()
POSTS = [0]
DROPPED = {"authorization", "host", "connection", "keep-alive", "transfer-encoding", "content-length",
           "expect", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"}


def record(**fields):
    with LOCK:
        LOG.write(json.dumps(fields) + "\n")


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # so that Expect: 100-continue is answered

    def log_message(self, format, *args):
        pass

    def read_body(self):
        """The request body, whole: chunked bodies decoded, else Content-Length bytes."""
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if chunked:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise ValueError("chunk size line cut or too long")
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts), True
                data = self.rfile.read(size)
                if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise ValueError("chunk cut short")
                parts.append(data)
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise ValueError("body cut short")
        return data, False

    def answer(self, status, headers, body):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def handle_any(self):
        try:
            body, chunked = self.read_body()
        except (ValueError, OSError) as error:
            record(method=self.command, path=self.path, status=400, error=str(error))
            self.answer(400, [("Content-Type", "text/plain")], b"bad request body\n")
            return
        given = (self.headers.get("Authorization") or "").encode()
        if EXPECTED is not None and not hmac.compare_digest(given, EXPECTED):
            record(method=self.command, path=self.path, status=401, chunked=chunked, size=len(body),
                   authorization=given.split(b" ", 1)[0].decode(errors="replace") or None)
            self.answer(401, [("WWW-Authenticate", 'Bearer realm="test proxy"'), ("Content-Type", "text/plain")],
                        b"bearer token missing or wrong\n")
            return
        if self.command == "POST" and HOLD_AFTER >= 0:
            with LOCK:
                POSTS[0] += 1
                number = POSTS[0]
            if number > HOLD_AFTER and not os.path.exists(GATE):
                record(method=self.command, path=self.path, held=number)
                while not os.path.exists(GATE):
                    time.sleep(0.01)
        # Without a token of its own to check, the client's Authorization is Orthanc's to check.
        dropped = DROPPED if EXPECTED is not None else DROPPED - {"authorization"}
        headers = {name: value for name, value in self.headers.items() if name.lower() not in dropped}
        upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM_PORT, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body if body or chunked or self.command in ("POST", "PUT")
                             else None, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            status = response.status
            answer_headers = [(name, value) for name, value in response.getheaders() if name.lower() not in DROPPED]
        except OSError as error:  # Orthanc is down: answer nothing, as it would
            record(method=self.command, path=self.path, status=0, error=str(error))
            self.close_connection = True
            return
        finally:
            upstream.close()
        record(method=self.command, path=self.path, status=status, chunked=chunked, size=len(body))
        self.answer(status, answer_headers, answer)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
'''


@dataclass
class StowProxy:
    """The running proxy: its DICOMweb URL (valid in the namespace) and what it saw."""

    url: str
    log_path: Path
    gate: Path

    def requests(self) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def posts(self) -> list[dict[str, object]]:
        return [r for r in self.requests() if r["method"] == "POST" and r["path"] == "/dicom-web/studies"]

    def holding(self) -> bool:
        """Whether a POST past ``hold_after`` is waiting for the gate."""
        return any("held" in r for r in self.requests())

    def unanswered(self) -> int:
        """Requests Orthanc did not answer (it was down)."""
        return sum(1 for r in self.requests() if r.get("status") == 0)

    def open_gate(self) -> None:
        self.gate.touch()


@contextlib.contextmanager
def stow_proxy(server: Orthanc, folder: Path, *, token: str | None = None,
               hold_after: int | None = None) -> Iterator[StowProxy]:
    """Run the proxy inside `server`'s namespace; returns once it answers HTTP; killed at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "stow_proxy.py"
    script.write_text(PROXY_SCRIPT)
    log_path, errors, gate = folder / "proxy.log", folder / "proxy.stderr", folder / "gate"
    environment = {key: value for key, value in os.environ.items() if key != "PROXY_TOKEN"}
    if token is not None:
        environment["PROXY_TOKEN"] = token
    with errors.open("wb") as stderr:
        # setpriv: the proxy dies with this thread even if pytest itself is killed (as Orthanc does).
        process = server.popen(["setpriv", "--pdeathsig", "KILL", "--", sys.executable, str(script),
                                str(server.http_port), str(log_path), str(-1 if hold_after is None else hold_after),
                                str(gate)],
                               env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            process.kill()
            process.wait()
            raise RuntimeError(f"the proxy did not start: {errors.read_text(errors='replace')[-2000:]}")
        port = int(line)

        def probe() -> int:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                connection.request("GET", "/dicom-web/studies")
                response = connection.getresponse()
                response.read()
                return response.status
            finally:
                connection.close()

        deadline = time.monotonic() + 15
        while True:
            try:
                status = server.in_namespace(probe)
                break
            except OSError as error:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"the proxy does not answer: {errors.read_text(errors='replace')[-2000:]}") from error
                time.sleep(0.05)
        if token is not None:
            assert status == 401, f"the proxy let a request without a token through (HTTP {status})"
        log_path.write_text("")  # forget the probe
        yield StowProxy(url=f"http://127.0.0.1:{port}/dicom-web", log_path=log_path, gate=gate)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
