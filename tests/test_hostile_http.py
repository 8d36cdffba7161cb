"""The bridge's HTTP server under hostile clients, through real sockets against a real bridge on
127.0.0.1: slow and idle connections, oversized heads, password guessing, broken bodies and
names, and the password tooling that feeds the users table."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator

import pytest

from dicomfs.config import load_config
from dicomfs.errors import ConfigError
from dicomfs.passwords import hash_password
from tests.conftest import dicomfs_command, run_cli, self_signed_certificate
from tests.test_webdav import Running, running

pytestmark = pytest.mark.timeout(120)

PASSWORD = "correct horse battery"
USERS = f'[users.alice]\npassword_hash = "{hash_password(PASSWORD)}"\nrights = ["read", "upload"]\n'
AUTH = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
WRONG = "Basic " + base64.b64encode(b"alice:not the password").decode()


def request(bridge: Running, method: str, path: str, *, authorization: str = AUTH, source: str = "127.0.0.1",
            body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 5
            ) -> tuple[int, dict[str, str], bytes]:
    """One request from ``source`` (a loopback address of the client's own)."""
    client = bridge.client
    connection = http.client.HTTPConnection(client.host, client.port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers={"Authorization": authorization, **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw(bridge: Running, data: bytes, *, timeout: float = 5) -> bytes:
    """Send ``data`` as it is on a new connection and read the answer until the server closes."""
    with socket.create_connection((bridge.client.host, bridge.client.port), timeout=timeout) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


@contextlib.contextmanager
def hostile_crowd(bridge: Running, slow: int, idle: int, every: float = 1.0) -> Iterator[list[socket.socket]]:
    """``idle`` connections that send nothing and ``slow`` ones that trickle a header line each ``every`` s."""
    address = (bridge.client.host, bridge.client.port)
    idlers = [socket.create_connection(address) for _ in range(idle)]
    trickling = [socket.create_connection(address) for _ in range(slow)]
    stop = threading.Event()

    def trickle() -> None:
        for sock in trickling:
            with contextlib.suppress(OSError):
                sock.sendall(b"GET / HTTP/1.1\r\n")
        line = 0
        while not stop.wait(every):
            line += 1
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-a: %d\r\n" % line)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(1.5)  # every slow client has sent its request line and a header
        yield trickling + idlers
    finally:
        stop.set()
        thread.join()
        for sock in trickling + idlers:
            sock.close()


# -- slow, idle and oversized request heads ------------------------------------------------------

def test_hostile_http_slow_and_idle_clients_do_not_delay_a_request(tmp_path: Path) -> None:
    """Twice as many slowloris connections as threads, and as many idle ones, leave a normal
    authenticated request answered well within a second."""
    with running(tmp_path, USERS) as bridge:
        threads = bridge.bridge.config.webdav.threads
        with hostile_crowd(bridge, slow=2 * threads, idle=2 * threads):
            for _ in range(5):
                started = time.monotonic()
                status, _, _ = request(bridge, "PROPFIND", "/", headers={"Depth": "0"})
                assert status == 207
                assert time.monotonic() - started < 1.0


def test_hostile_http_a_head_has_a_deadline(tmp_path: Path) -> None:
    """A connection that has not sent its whole request head within webdav.header_timeout is
    closed, however it trickles, and so is one that sends nothing."""
    with running(tmp_path, "[webdav]\nheader_timeout = 2\n" + USERS) as bridge:
        with hostile_crowd(bridge, slow=3, idle=3, every=0.5) as crowd:
            started = time.monotonic()
            for sock in crowd:
                sock.settimeout(10)
                answer = read_all(sock)
                assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert time.monotonic() - started < 4


def test_hostile_http_oversized_heads_are_refused_and_the_server_goes_on(tmp_path: Path) -> None:
    with running(tmp_path, USERS) as bridge:
        answer = raw(bridge, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 414 "), answer[:100]
        answer = raw(bridge, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        many = b"".join(b"X-%d: %s\r\n" % (i, b"c" * 100) for i in range(1000))
        answer = raw(bridge, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert request(bridge, "PROPFIND", "/", headers={"Depth": "0"})[0] == 207


def test_hostile_http_keepalive_and_pipelined_requests_still_work(tmp_path: Path) -> None:
    with running(tmp_path, USERS) as bridge:
        one = f"GET /uploads/ HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n".encode()
        with socket.create_connection((bridge.client.host, bridge.client.port), timeout=5) as sock:
            stream = sock.makefile("rb")
            sock.sendall(one * 3)  # pipelined: three heads in one segment
            assert [read_response(stream) for _ in range(3)] == [200] * 3
            for _ in range(3):  # keep-alive: one after the other, each head split across segments
                sock.sendall(one[:10])
                time.sleep(0.05)
                sock.sendall(one[10:])
                assert read_response(stream) == 200
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in one:  # a byte per segment: the end of the head straddles four of them
                sock.sendall(bytes([byte]))
                time.sleep(0.001)
            assert read_response(stream) == 200


def read_response(stream: BinaryIO) -> int:
    """The status of the next response on ``stream``, its body read (it has a Content-Length)."""
    status = int(stream.readline().split()[1])
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    stream.read(length)
    return status


def test_hostile_http_idle_tls_connections_do_not_block_https(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    config = f"[webdav]\ncertificate = '{cert}'\nprivate_key = '{key}'\n" + USERS
    with running(tmp_path, config) as bridge:
        address = (bridge.client.host, bridge.client.port)
        idlers = [socket.create_connection(address) for _ in range(8)]  # TCP up, no TLS handshake
        try:
            context = ssl.create_default_context(cafile=str(cert))
            for _ in range(3):
                started = time.monotonic()
                connection = http.client.HTTPSConnection(*address, context=context, timeout=5)
                connection.request("PROPFIND", "/", headers={"Authorization": AUTH, "Depth": "0"})
                assert connection.getresponse().status == 207
                connection.close()
                assert time.monotonic() - started < 1.0
        finally:
            for sock in idlers:
                sock.close()


# -- password guessing ---------------------------------------------------------------------------

def test_hostile_http_password_guessing_is_throttled_per_address(tmp_path: Path) -> None:
    with running(tmp_path, USERS) as bridge:
        for _ in range(5):
            assert request(bridge, "PROPFIND", "/", authorization=WRONG, headers={"Depth": "0"})[0] == 401
        started = time.monotonic()
        for _ in range(20):  # refused before any scrypt check (~60 ms each)
            status, headers, _ = request(bridge, "PROPFIND", "/", authorization=WRONG, headers={"Depth": "0"})
            assert status == 429
            assert int(headers["retry-after"]) > 0
        assert time.monotonic() - started < 1.0
        # the address waits, even with the right password; another address does not
        assert request(bridge, "PROPFIND", "/", headers={"Depth": "0"})[0] == 429
        assert request(bridge, "PUT", "/uploads/x.bin", body=b"x")[0] == 429
        assert request(bridge, "PROPFIND", "/", source="127.0.0.2", headers={"Depth": "0"})[0] == 207
        assert request(bridge, "PROPFIND", "/", source="127.0.0.2", authorization=WRONG,
                       headers={"Depth": "0"})[0] == 401


@pytest.mark.parametrize("method, path", [("PUT", "/uploads/guess.bin"), ("GET", "/transfers/v1/status")])
def test_hostile_http_every_door_counts_a_wrong_password_once(tmp_path: Path, method: str, path: str) -> None:
    """The PUT fast path (which hands a failure on to wsgidav) and /transfers/ (which checks
    passwords itself) count each wrong password once, and are throttled too."""
    with running(tmp_path, USERS) as bridge:
        for _ in range(5):
            assert request(bridge, method, path, authorization=WRONG, body=b"x" if method == "PUT" else None)[0] == 401
        assert request(bridge, method, path, authorization=WRONG, body=b"x" if method == "PUT" else None)[0] == 429
        assert bridge.uploads() == []


# -- broken bodies, paths and names --------------------------------------------------------------

@pytest.mark.parametrize("length", ["-5", "99999999999999999999999", "12abc"])
def test_hostile_http_a_bad_content_length_is_refused_and_leaves_nothing(tmp_path: Path, length: str) -> None:
    with running(tmp_path, USERS) as bridge:
        answer = raw(bridge, (f"PUT /uploads/cl.bin HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n"
                              f"Content-Length: {length}\r\n\r\nhello").encode())
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert bridge.uploads() == []


@pytest.mark.parametrize("method", ["GET", "PROPFIND", "PUT"])
def test_hostile_http_invalid_utf8_in_the_path_is_a_400(tmp_path: Path, method: str) -> None:
    with running(tmp_path, USERS) as bridge:
        status, _, body = request(bridge, method, "/uploads/%ff%fe", body=b"x" if method == "PUT" else None)
        assert status == 400, body
        assert b"Traceback" not in body


def test_hostile_http_a_broken_chunked_put_leaves_no_unexplained_file(tmp_path: Path) -> None:
    with running(tmp_path, USERS) as bridge:
        head = f"PUT /uploads/{{}} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer = raw(bridge, head.format("bad.bin").encode() + b"5\r\nhello\r\nzz\r\nmore\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        with socket.create_connection((bridge.client.host, bridge.client.port), timeout=5) as sock:
            sock.sendall(head.format("cut.bin").encode() + b"5\r\nhello\r\n3")  # then the client leaves
        answer = raw(bridge, head.format("long.bin").encode() + b"1" * 10_000 + b"\r\nx\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]  # an endless chunk-size line
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(bridge.uploads()) < 3:
            time.sleep(0.05)
        assert bridge.uploads() == ["bad.bin", "cut.bin", "long.bin"]
        for name in bridge.uploads():  # each part left says at once why it was not stored
            status, _, body = request(bridge, "PROPFIND", f"/uploads/{name}", headers={"Depth": "0"},
                                      body=b'<propfind xmlns="DAV:"><allprop/></propfind>')
            assert b"interrupted" in body, (name, body[:400])


def test_hostile_http_a_name_over_255_bytes_is_a_clear_400(tmp_path: Path) -> None:
    with running(tmp_path, USERS) as bridge:
        status, _, body = request(bridge, "PUT", "/uploads/" + "n" * 300 + ".dcm", body=b"x")
        assert status == 400, body
        assert b"255" in body
        status, _, body = request(bridge, "PUT", "/uploads/" + "%C3%A9" * 130, body=b"x")
        assert status == 400, body
        assert bridge.uploads() == []


# -- passwords and their parameters --------------------------------------------------------------

@pytest.mark.parametrize("name", ["a:b", "", "tab\tname"])
def test_hostile_http_passwd_refuses_a_name_basic_auth_cannot_carry(tmp_path: Path, name: str) -> None:
    done = subprocess_passwd(tmp_path, name, "long enough password\n")
    assert done.returncode != 0
    assert "user name" in done.stderr and "Traceback" not in done.stderr
    assert "password_hash" not in done.stdout


def test_hostile_http_passwd_refuses_an_empty_password(tmp_path: Path) -> None:
    done = subprocess_passwd(tmp_path, "alice", "\n")
    assert done.returncode != 0 and "password" in done.stderr and "Traceback" not in done.stderr


def subprocess_passwd(tmp_path: Path, name: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """``dicomfs passwd NAME`` with the password on stdin (no terminal: read as one line)."""
    return subprocess.run([*dicomfs_command(), "--store", str(tmp_path / "store"), "passwd", name], input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DICOMFS_CONFIG": os.devnull})


@pytest.mark.parametrize("n, r", [(2, 8), (2**13, 8), (2**14, 1), (2**14, 7)])
def test_hostile_http_weak_scrypt_parameters_are_refused(tmp_path: Path, n: int, r: int) -> None:
    good = hash_password(PASSWORD).split("$")
    weak = "$".join([good[0], str(n), str(r), *good[3:]])
    config = tmp_path / "dicomfs.toml"
    config.write_text(f'[users.alice]\npassword_hash = "{weak}"\n')
    with pytest.raises(ConfigError, match="scrypt"):
        load_config(config, store_folder=tmp_path / "store")
    done = run_cli("config", store=tmp_path / "store", config=config)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "N=16384" in lines[0], done.stderr
