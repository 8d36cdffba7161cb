"""Exports with a bearer token, against the real Orthanc of tests/orthanc_server.py.

Orthanc cannot check bearer tokens itself, so each test runs a small reverse proxy in Orthanc's
private network namespace: it answers 401 unless ``Authorization: Bearer <token>`` matches, and
otherwise forwards the request (Content-Length or chunked body, decoded) to Orthanc and returns
Orthanc's answer. dicomfs exports to the proxy; what arrives is checked in Orthanc itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomfs.samples import Corpus
from tests.conftest import dicomfs_command
from tests.orthanc_server import Orthanc, orthanc

pytestmark = pytest.mark.timeout(180)

TOKEN_VARIABLE = "DICOMFS_TEST_PACS_TOKEN"

# The proxy: argv is (upstream port, log file); the token comes in $BEARER_PROXY_TOKEN so that it
# is not on a command line. It listens on a free loopback port and prints that port on stdout.
PROXY_SCRIPT = r'''
import hmac
import http.client
import http.server
import json
import os
import sys
import threading

UPSTREAM_PORT = int(sys.argv[1])
LOG = open(sys.argv[2], "a", buffering=1)
EXPECTED = ("Bearer " + os.environ["BEARER_PROXY_TOKEN"]).encode()
LOCK = threading.Lock()
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
        if not hmac.compare_digest(given, EXPECTED):
            record(method=self.command, path=self.path, status=401, chunked=chunked, size=len(body),
                   authorization=given.split(b" ", 1)[0].decode(errors="replace") or None)
            self.answer(401, [("WWW-Authenticate", 'Bearer realm="test proxy"'), ("Content-Type", "text/plain")],
                        b"bearer token missing or wrong\n")
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in DROPPED}
        upstream = http.client.HTTPConnection("127.0.0.1", UPSTREAM_PORT, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body if body or chunked or self.command in ("POST", "PUT")
                             else None, headers=headers)
            response = upstream.getresponse()
            answer = response.read()
            status = response.status
            answer_headers = [(name, value) for name, value in response.getheaders() if name.lower() not in DROPPED]
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
class BearerProxy:
    """The running proxy: its DICOMweb URL (valid in the namespace) and what it saw."""

    url: str
    log_path: Path

    def requests(self) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def posts(self) -> list[dict[str, object]]:
        return [r for r in self.requests() if r["method"] == "POST" and r["path"] == "/dicom-web/studies"]


@contextlib.contextmanager
def bearer_proxy(server: Orthanc, folder: Path, token: str) -> Iterator[BearerProxy]:
    """Run the proxy inside `server`'s namespace; returns once it answers HTTP; killed at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "bearer_proxy.py"
    script.write_text(PROXY_SCRIPT)
    log_path, errors = folder / "proxy.log", folder / "proxy.stderr"
    with errors.open("wb") as stderr:
        # setpriv: the proxy dies with this thread even if pytest itself is killed (as Orthanc does).
        process = server.popen(["setpriv", "--pdeathsig", "KILL", "--", sys.executable, str(script),
                                str(server.http_port), str(log_path)],
                               env={**os.environ, "BEARER_PROXY_TOKEN": token},
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            process.kill()
            process.wait()
            raise RuntimeError(f"the bearer proxy did not start: {errors.read_text(errors='replace')[-2000:]}")
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
                    raise RuntimeError(f"the bearer proxy does not answer: {errors.read_text(errors='replace')[-2000:]}") from error
                time.sleep(0.05)
        assert status == 401, f"the proxy let a request without a token through (HTTP {status})"
        log_path.write_text("")  # forget the probe
        yield BearerProxy(url=f"http://127.0.0.1:{port}/dicom-web", log_path=log_path)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def write_config(path: Path, url: str, **fields: object) -> Path:
    """A configuration with one destination, "pacs", at `url`."""
    lines = ["[destinations.pacs]", 'type = "stowrs"', f"url = {json.dumps(url)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    lines += ["[jobs]", "retry_delay = 1", "retry_max_delay = 1", "max_attempts = 3", "poll_ms = 100"]
    path.write_text("\n".join(lines) + "\n")
    return path


def dicomfs(server: Orthanc, store: Path, config: Path, *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, run inside Orthanc's namespace (the only place the proxy can be
    reached). Its environment is this process' without TOKEN_VARIABLE, plus `env`."""
    base = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    base["DICOMFS_CONFIG"] = str(config)
    return server.run([*dicomfs_command(), "--store", str(store), "--config", str(config), *args],
                      capture_output=True, text=True, timeout=120, env={**base, **(env or {})})


def job_id_of(done: subprocess.CompletedProcess[str]) -> str:
    first = done.stdout.split()
    assert len(first) >= 2 and first[0] == "job", done.stdout + done.stderr
    return first[1].rstrip(":")


def sop_uids_of(corpus: Corpus, patient: str) -> set[str]:
    return {f.sop_uid for f in corpus.valid_files if f.patient_id == patient}


def test_bearer_token_file_exports_everything_and_never_shows_the_token(
        tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    token_file = tmp_path / "pacs.token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    with orthanc(tmp_path / "orthanc") as server, bearer_proxy(server, tmp_path / "proxy", token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token_file=str(token_file),
                              instances_per_request=4)
        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = sop_uids_of(small_corpus, "PAT00001")
        assert expected and server.sop_uids() == expected
        posts = proxy.posts()
        assert posts and all(p["status"] == 200 and not p["chunked"] for p in posts), posts  # all through the proxy
        assert token not in done.stdout + done.stderr

        shown = dicomfs(server, filled_store, config, "jobs", "show", job_id_of(done))
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["state"] == "success" and data["done_items"] == len(expected), shown.stdout
        assert token not in shown.stdout + shown.stderr

        described = dicomfs(server, filled_store, config, "config")
        assert described.returncode == 0, described.stderr
        assert token not in described.stdout + described.stderr
        assert f"bearer_token_file {token_file}" in described.stdout  # where it came from, not what it is


def test_bearer_token_env_right_wrong_and_missing(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    wrong = "bad-" + secrets.token_urlsafe(24)
    with orthanc(tmp_path / "orthanc") as server, bearer_proxy(server, tmp_path / "proxy", token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token_env=TOKEN_VARIABLE)

        missing = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001")
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert TOKEN_VARIABLE in missing.stderr and "not set" in missing.stderr, missing.stderr
        assert token not in missing.stdout + missing.stderr and not missing.stdout.startswith("job")
        assert proxy.requests() == [] and server.sop_uids() == set()

        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001",
                       env={TOKEN_VARIABLE: token})
        assert done.returncode == 0, done.stdout + done.stderr
        first = sop_uids_of(small_corpus, "PAT00001")
        assert server.sop_uids() == first
        assert token not in done.stdout + done.stderr

        refused = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00002",
                          env={TOKEN_VARIABLE: wrong})
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "failure" in refused.stdout and wrong not in refused.stdout + refused.stderr, refused.stdout
        assert server.sop_uids() == first  # nothing of PAT00002 got past the proxy
        rejected = [p for p in proxy.posts() if p["status"] == 401]
        assert rejected and all(p["authorization"] == "Bearer" for p in rejected), proxy.requests()

        shown = dicomfs(server, filled_store, config, "jobs", "show", job_id_of(refused), env={TOKEN_VARIABLE: wrong})
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["state"] == "failure", shown.stdout
        assert data["failed_items"] == len(sop_uids_of(small_corpus, "PAT00002")) and data["done_items"] == 0
        assert data["failures"] and all("401" in f["reason"] for f in data["failures"]), data["failures"]
        assert wrong not in shown.stdout


def test_chunked_bodies_through_the_bearer_proxy(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    with orthanc(tmp_path / "orthanc") as server, bearer_proxy(server, tmp_path / "proxy", token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token=token, chunked=True,
                              concurrency=2, instances_per_request=2)
        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00002")
        assert done.returncode == 0, done.stdout + done.stderr
        assert server.sop_uids() == sop_uids_of(small_corpus, "PAT00002")
        posts = proxy.posts()
        assert len(posts) >= 2 and all(p["chunked"] and p["status"] == 200 for p in posts), posts
        assert token not in done.stdout + done.stderr
        described = dicomfs(server, filled_store, config, "config")
        assert described.returncode == 0 and token not in described.stdout + described.stderr
        assert "bearer_token (inline)" in described.stdout
