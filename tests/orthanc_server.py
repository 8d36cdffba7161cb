"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for tests, in a private network
namespace that has only loopback, so it is unreachable from the host and from anything else.

Use::

    from tests.orthanc_server import orthanc

    def test_export(tmp_path):
        with orthanc(tmp_path / "orthanc", users={"alice": "secret"}) as server:
            status, body = server.rest("POST", "/dicom-web/studies", body=..., headers=...)
            server.run([*dicomfs_command(), "export", "--to", server.dicomweb_url, ...], check=True)
            assert sop_uid in server.sop_uids()

API
---
``orthanc(tmp_path, *, users=None, extra_config=None)`` is a context manager that yields an
:class:`Orthanc`; it skips the test (``pytest.skip``) only when Orthanc or its DICOMweb plugin is
not installed or network namespaces cannot be made here (``scripts/setup`` installs the
packages). Storage, index, configuration and log live in `tmp_path`. With `users`, HTTP Basic
authentication is on (``RegisteredUsers``) and the first user is the fixture's own credentials.
`extra_config` is merged into the top level of the generated ``orthanc.json``.

:class:`Orthanc` has

- ``http_port``, ``url`` (``http://127.0.0.1:<port>``), ``dicomweb_url`` (``url + "/dicom-web"``):
  valid *inside* the namespace only. The port is chosen free on the host too, so a connection to
  it from the host namespace is refused rather than reaching some other server.
- ``credentials``: ``(user, password)`` or None; ``netns``: ``/proc/<holder>/ns/net``;
  ``log_path``: Orthanc's log file.
- ``rest(method, path, body=None, headers=None, *, auth=None, timeout=30) -> (status, body)``:
  one HTTP request to the REST API from this process, through the namespace; ``auth`` None means
  the fixture's credentials, False none, a tuple those.
- ``instances()`` (Orthanc ids), ``sop_uids()`` (SOPInstanceUIDs stored), ``file_of(sop_uid)``
  (the stored Part 10 bytes).
- ``run(args, **kwargs) -> CompletedProcess`` and ``popen(args, **kwargs) -> Popen``: a command in
  the namespace (``nsenter --net=<netns> -- args...``; the pid is the command's own, nsenter
  execs it). This is how to run ``python -m dicomfs ...`` so it can reach Orthanc.
- ``in_namespace(fn, *args, **kwargs)``: call `fn` in this process in the namespace thread (below)
  and return its result; threads that `fn` starts are in the namespace too.
- ``stop(*, graceful=False)`` / ``start()``: stop Orthanc (SIGKILL, or with ``graceful`` SIGTERM
  and a wait of about 2 s) and start it again in the same namespace with the same storage and
  port, e.g. to test a server that goes away mid-job. ``start()`` returns when ``GET /system``
  answers; ``running()`` tells whether the process is alive.

How the namespace works
-----------------------
A holder process, ``unshare --net -- sh -c 'ip link set lo up && echo up && exec sleep
infinity'``, creates the namespace (unshare execs, so the holder's pid is the one in the new
namespace) and keeps it alive across Orthanc restarts. Orthanc runs as ``nsenter --net=/proc/
<holder>/ns/net -- Orthanc --logfile=... orthanc.json``. Both are started through ``setpriv
--pdeathsig KILL``, so they die with the thread that started them (the test's thread: call
``start()`` from a thread that outlives the server) even when pytest itself is killed. For
requests from the pytest process, a single-worker thread pool opens ``/proc/<holder>/ns/net``
and calls ``setns(fd, CLONE_NEWNET)`` through libc in its initializer: a network namespace
belongs to a thread (task), not to the process, so sockets that thread creates (and threads it
starts) live in the namespace while the rest of pytest stays in the host's. Teardown kills
Orthanc, shuts the thread down, and kills the holder, in ``finally`` blocks: nothing is left
running. Start-up takes about 0.1 s, a ``rest()`` call about 1 ms, ``run(["curl", ...])`` 12 ms.

What Orthanc 1.10.1 + DICOMweb 1.7 (Debian bookworm) does with STOW-RS
-----------------------------------------------------------------------
- It wants ``Content-Type: multipart/related; type="application/dicom"; boundary=...``; without
  a multipart type or boundary: 415 with Orthanc's JSON error (``{"HttpError": ..., "HttpStatus":
  415, "OrthancError": ...}``). Chunked request bodies and ``Expect: 100-continue`` work.
- Success: 200, ``Content-Type: application/dicom+json`` (XML with ``Accept:
  application/dicom+xml``), a dataset with RetrieveURL (00081190), FailedSOPSequence (00081198,
  present and empty) and ReferencedSOPSequence (00081199, one item per stored instance with
  00081150 class, 00081155 instance UID, 00081190 URL).
- 200 is not proof of storage: a part whose Content-Type is not application/dicom is dropped, and
  a body without its closing boundary stores nothing, both with 200 and an empty 00081199. Check
  that the SOPInstanceUID is in 00081199.
- A part that is not DICOM: 400, with no item in 00081198 for it (the good parts of the same
  request are stored and listed). POST to ``/studies/<uid>`` with an instance of another study:
  409, the instance in 00081198 with FailureReason (00081197) 272 (0x0110).
- Any transfer syntax pydicom writes (explicit/implicit little endian, deflated, RLE) is stored
  byte for byte. An instance sent again is 200 and listed as referenced, but with the default
  ``OverwriteInstances: false`` the first file is kept (``extra_config={"OverwriteInstances":
  True}`` stores the new one).
- Wrong or missing credentials: 401, empty body, ``WWW-Authenticate: Basic realm="Orthanc Secure
  Area"``. Idle keep-alive connections are closed after 1 s (``Keep-Alive: timeout=1``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

__all__ = ["DICOMWEB_PLUGIN", "ORTHANC_BINARY", "Orthanc", "orthanc"]

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
# The path the Debian package installs (``dpkg -L orthanc-dicomweb``); a symlink to the .so.1.7.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CLONE_NEWNET = 0x40000000
# The holder and Orthanc get SIGKILL when the thread that started them ends (PR_SET_PDEATHSIG,
# kept across nsenter's and unshare's exec), so even a killed pytest leaves nothing running.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL", "--"]
READY_TIMEOUT = 20.0

T = TypeVar("T")


def _free_host_port() -> int:
    """A TCP port nothing listens on in the host namespace (so the host sees a refusal there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns({path}, CLONE_NEWNET): {os.strerror(error)}")
    finally:
        os.close(fd)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class Orthanc:
    """A running Orthanc in its own network namespace; see the module docstring."""

    http_port: int
    url: str
    dicomweb_url: str
    credentials: tuple[str, str] | None
    netns: str
    config_path: Path
    log_path: Path
    _holder: subprocess.Popen[bytes] = field(repr=False)
    _thread: concurrent.futures.ThreadPoolExecutor = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- running things in the namespace -----------------------------------------------------

    def nsenter(self, args: list[str]) -> list[str]:
        """`args` prefixed so that they run in the namespace."""
        return ["nsenter", f"--net={self.netns}", "--", *args]

    def run(self, args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command in the namespace (``subprocess.run`` arguments)."""
        return subprocess.run(self.nsenter(list(args)), **kwargs)

    def popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in the namespace (``subprocess.Popen`` arguments)."""
        return subprocess.Popen(self.nsenter(list(args)), **kwargs)

    def in_namespace(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call `fn` in the thread that lives in the namespace and return (or raise) its result.

        Calls are serialized: one thread serves them all, one at a time.
        """
        return self._thread.submit(fn, *args, **kwargs).result()

    # -- REST -------------------------------------------------------------------------------

    def rest(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             *, auth: tuple[str, str] | bool | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        """One request to Orthanc, from inside the namespace; returns (status, body)."""
        headers = dict(headers or {})
        credentials = self.credentials if auth is None or auth is True else (auth or None)
        if credentials and "Authorization" not in headers:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"

        def request() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        return self.in_namespace(request)

    def _json(self, path: str) -> Any:
        status, body = self.rest("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status}: {body[:500]!r}")
        return json.loads(body)

    def instances(self) -> list[str]:
        """Orthanc's ids of the stored instances."""
        ids: list[str] = self._json("/instances")
        return ids

    def sop_uids(self) -> set[str]:
        """The SOPInstanceUIDs of the stored instances."""
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in self._json("/instances?expand")}

    def _id_of(self, sop_uid: str) -> str:
        status, body = self.rest("POST", "/tools/lookup", body=sop_uid.encode())
        if status != 200:
            raise AssertionError(f"POST /tools/lookup: HTTP {status}: {body[:500]!r}")
        ids = [item["ID"] for item in json.loads(body) if item.get("Type") == "Instance"]
        if not ids:
            raise KeyError(f"no instance with SOPInstanceUID {sop_uid} in Orthanc")
        instance: str = ids[0]
        return instance

    def file_of(self, sop_uid: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of the instance with this SOPInstanceUID."""
        instance = self._id_of(sop_uid)
        status, body = self.rest("GET", f"/instances/{instance}/file")
        if status != 200:
            raise AssertionError(f"GET /instances/{instance}/file: HTTP {status}")
        return body

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start Orthanc (again) in the namespace; returns when GET /system answers 200."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("Orthanc is already running")
        self._process = subprocess.Popen(
            [*_DIE_WITH_PARENT, *self.nsenter([ORTHANC_BINARY, f"--logfile={self.log_path}", str(self.config_path)])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        last = "no answer yet"
        while True:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(f"Orthanc exited with status {code} while starting; "
                                   f"its log ({self.log_path}):\n{_tail(self.log_path)}")
            try:
                status, body = self.rest("GET", "/system", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except OSError as error:
                last = repr(error)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer GET /system within {READY_TIMEOUT:.0f} s ({last}); "
                                   f"its log ({self.log_path}):\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Orthanc; the namespace, port and storage stay for :meth:`start`.

        By default Orthanc is killed (SIGKILL: instant, like a crash or a pulled cable; what it
        had acknowledged is in its SQLite index and stays). ``graceful=True`` sends SIGTERM and
        waits (SIGKILL after 10 s): Orthanc 1.10 then takes about 2 s, its HTTP server waiting
        for its threads.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            if graceful:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
            else:
                process.kill()
        process.wait()

    def running(self) -> bool:
        """Whether the Orthanc process is alive (not whether it answers yet)."""
        return self._process is not None and self._process.poll() is None


def _skip_unless_available() -> None:
    if not os.access(ORTHANC_BINARY, os.X_OK):
        pytest.skip("Orthanc is not installed (Debian package orthanc; scripts/setup installs it)")
    if not os.path.exists(DICOMWEB_PLUGIN):
        pytest.skip(f"the Orthanc DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}; Debian package "
                    "orthanc-dicomweb; scripts/setup installs it)")
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"), ("setpriv", "util-linux"),
                          ("ip", "iproute2")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package}; scripts/setup installs it)")


def _start_holder() -> subprocess.Popen[bytes]:
    """A process in a new network namespace with loopback up; skips if namespaces are refused."""
    holder = subprocess.Popen(
        [*_DIE_WITH_PARENT, "unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert holder.stdout is not None and holder.stderr is not None
    line = holder.stdout.readline()
    if line.strip() != b"up":
        holder.kill()
        holder.wait()
        error = holder.stderr.read().decode(errors="replace").strip()
        holder.stdout.close()
        holder.stderr.close()
        pytest.skip(f"cannot make a private network namespace here (unshare --net): {error or 'no reason given'}")
    holder.stdout.close()
    holder.stderr.close()
    return holder


def _config(root: Path, port: int, users: dict[str, str] | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "Name": "dicomfs-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": port,
        "RemoteAccessAllowed": True,  # the namespace has nothing but loopback
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "DicomServerEnabled": False,  # Orthanc >= 1.9.6 (and the namespace isolates it anyway)
        "DicomPort": 4242,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "HttpDescribeErrors": True,
        "SaveJobs": False,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 10,
        "DeidentifyLogs": False,
    }
    config.update(extra or {})
    return config


@contextlib.contextmanager
def orthanc(tmp_path: Path, *, users: dict[str, str] | None = None,
            extra_config: dict[str, Any] | None = None) -> Iterator[Orthanc]:
    """Run a real Orthanc with DICOMweb in a private network namespace; see the module docstring."""
    _skip_unless_available()
    root = Path(tmp_path)
    root.mkdir(parents=True, exist_ok=True)
    port = int((extra_config or {}).get("HttpPort", 0)) or _free_host_port()
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(_config(root, port, users, extra_config), indent=2))
    log_path = root / "orthanc.log"

    holder = _start_holder()
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="orthanc-netns",
                                                       initializer=_enter_netns, initargs=(netns,))
        try:
            server = Orthanc(http_port=port, url=f"http://127.0.0.1:{port}",
                             dicomweb_url=f"http://127.0.0.1:{port}/dicom-web",
                             credentials=next(iter(users.items())) if users else None,
                             netns=netns, config_path=config_path, log_path=log_path,
                             _holder=holder, _thread=thread)
            try:
                server.start()
                yield server
            finally:
                server.stop()
        finally:
            thread.shutdown(wait=True)
    finally:
        holder.kill()
        holder.wait()
