"""WebDAV bridge benchmark: GET, PROPFIND and PUT through ``dicomfs webdav``, each against wsgidav's
own FilesystemProvider serving the same bytes from a plain folder.

Run from the repository::

    .venv/bin/python bench/webdav.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]
                                     [--profile DIR]

Both servers run as subprocesses on 127.0.0.1 with a free port, so the client (this process)
never shares a GIL with a server: the bridge with the real command line (``dicomfs --store S
--config C.toml webdav --bind 127.0.0.1:0``, no users, so no password is asked), the reference
as a small script hosting ``WsgiDAVApp`` over ``FilesystemProvider`` (anonymous ``simple_dc``,
``lock_storage`` and ``property_manager`` on, as the bridge has) in ``cheroot.wsgi.Server``
with the bridge's thread count, request queue and timeout. Both use the same ``block_size``:
the bridge's ``webdav.block_size`` as the configuration file written here sets it (262144). The
data comes from :mod:`dicomfs.samples`; the store is made and filled with ``dicomfs init`` and
``dicomfs ingest``, uncompressed. The plain folder holds copies of the same source files under
the names the bridge gives them (``<SOPInstanceUID>.dcm``), so sizes, names and bodies match.
Work happens on disk (``/var/tmp``); every file read is in the page cache first. MB means
10^6 bytes.

1. **GET** of one 50 MB instance (512x512 16-bit, 96 frames) from ``by-uids/<study>/<series>/``
   against the same file in the plain folder, read by ``http.client`` in 1 MiB ``readinto``
   calls over a keep-alive connection; best of 7 rounds (``--quick``: 3), alternating servers.
   Also with ``curl -o /dev/null`` when curl is installed (its ``time_total``), without a target.
   Target: >= 0.8x the reference's MB/s (Python client).
2. **PROPFIND Depth 1** of a 2,000-instance series folder (``by-uids/<study>/<series>/``, which
   also lists ``series.json``) against a plain folder of the 2,000 same-size files, with the six
   named properties (resourcetype, getcontentlength, getlastmodified, getetag, creationdate,
   displayname) and with allprop; one untimed request first (the bridge's first listing of a
   folder reads the index; it is printed as "cold"), then 15 rounds (``--quick``: 5) per side,
   alternating. Reported: best and median ms, the ratio of the bests (the median ratio is in the
   detail). Target: <= 1.5x the reference's time.
3. **PUT** of 500 small instances (64x64, ~10 kB; ``--quick``: 200) from memory, one keep-alive
   connection per client, into ``uploads/`` (bridge) or a fresh folder (reference). The bridge's
   clock stops when ``STORE/uploads/`` holds no file any more (polled every 5 ms), confirmed by
   ``dicomfs stats --json`` counting every new instance; the reference's when the last answer
   arrives. Sequential (one client), then 4 concurrent clients with another 500 instances. Also
   printed: the PUTs' own rate, and how many processes the bridge started meanwhile (the store's
   bulk ingest spawns worker processes for a group of 64 files or more). Target (sequential):
   >= 0.7x the reference's files/s; the concurrent figures are reported without a target.

``--profile DIR`` also records the bridge with py-spy (``/work/perf/tools/bin/py-spy`` or on
PATH) during each section's bridge rounds, as collapsed stacks in ``DIR/<section>.txt``; the
figures of such a run are slowed by the sampling and are not comparable.

The targets are printed as PASS/FAIL; the exit status is 0 whatever they say, since this is a
measurement, and 2 only when it cannot run. Both servers are stopped with SIGTERM in a
``finally`` (then SIGKILL after 20 s) and every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pydicom
from _shared import CannotRun, Row, dicomfs_command, finish, options, print_report, progress, work_folder
from _shared import Cli as Dicomfs
from _shared import py_spy as find_py_spy

from dicomfs.samples import Corpus, make_instance, write_corpus, write_instance

GET_VS_REFERENCE = 0.8
PROPFIND_VS_REFERENCE = 1.5
PUT_VS_REFERENCE = 0.7
BLOCK_SIZE = 262144  # webdav.block_size's default, written to the bridge's configuration file
THREADS = 32  # webdav.threads' default; the reference gets the same
CHUNK = 1 << 20
CONCURRENT_CLIENTS = 4
SHORT, LONG = 120, 900  # subprocess and wait timeouts, seconds
NAMED_PROPS = ("resourcetype", "getcontentlength", "getlastmodified", "getetag", "creationdate", "displayname")
PROPFIND_BODIES = {
    "6 named props": ('<?xml version="1.0" encoding="utf-8"?>\n<D:propfind xmlns:D="DAV:"><D:prop>'
                      + "".join(f"<D:{name}/>" for name in NAMED_PROPS) + "</D:prop></D:propfind>").encode(),
    "allprop": b'<?xml version="1.0" encoding="utf-8"?>\n<D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>',
}
_NAMESPACE = uuid.UUID("0b7c5f0e-8a53-4f7e-9d1c-3c2b8e6a9f11")

# The reference server: wsgidav's FilesystemProvider in cheroot, configured like the bridge
# (locks, a property manager, the block size, the thread count), anonymous.
REFERENCE_SERVER = r"""
import signal, sys, threading
from cheroot import wsgi
from wsgidav.fs_dav_provider import FilesystemProvider
from wsgidav.wsgidav_app import WsgiDAVApp

folder, block_size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
app = WsgiDAVApp({
    "provider_mapping": {"/": FilesystemProvider(folder, fs_opts={})},
    "simple_dc": {"user_mapping": {"*": True}},
    "http_authenticator": {"domain_controller": None, "accept_basic": True, "accept_digest": False,
                           "default_to_digest": False, "trusted_auth_header": None},
    "lock_storage": True,
    "property_manager": True,
    "block_size": block_size,
    "logging": {"enable": False},
    "verbose": 1,
})
server = wsgi.Server(("127.0.0.1", 0), app, numthreads=threads, server_name="reference",
                     request_queue_size=64, timeout=60, shutdown_timeout=5)
server.prepare()
stop = threading.Event()
for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
threading.Thread(target=server.serve, daemon=True).start()
print(f"serving {folder} at http://127.0.0.1:{server.bind_addr[1]}/", flush=True)
stop.wait()
server.stop()
"""


# -- servers --------------------------------------------------------------------------------------


class Server:
    """A WebDAV server subprocess that prints ``... at http://HOST:PORT/`` once it listens."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env=self.env)
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"\bat (https?://\S+/)", self.out.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
                break
            if self.process.poll() is not None:
                raise CannotRun(f"{self.name} server exited {self.process.returncode}: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise CannotRun(f"{self.name} server printed no URL within 60 s: {self.stderr()[-2000:]}")
            time.sleep(0.02)
        return self

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (the bridge then ingests what it queued), SIGKILL after 20 s; our own process only."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"  {self.name} server (pid {process.pid}) still running 20 s after SIGTERM: SIGKILL",
                  file=sys.stderr, flush=True)
            process.kill()
            process.wait(timeout=20)

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.host_port
        return http.client.HTTPConnection(host, port, timeout=SHORT)


class Profiler:
    """py-spy recording the bridge during one section (``--profile``), or nothing."""

    def __init__(self, py_spy: str | None, folder: Path | None, pid: int) -> None:
        self.py_spy, self.folder, self.pid = py_spy, folder, pid

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.py_spy or self.folder is None:
            yield
            return
        out = self.folder / f"{name}.txt"
        recorder = subprocess.Popen([self.py_spy, "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250",
                                     "--threads", "--output", str(out), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # py-spy attaches
        try:
            yield
        finally:
            recorder.send_signal(signal.SIGINT)
            try:
                _, err = recorder.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                _, err = recorder.communicate()
            progress(f"  py-spy: {out} ({err.decode(errors='replace').strip().splitlines()[-1:] or ['']})")


class ChildWatcher:
    """The processes a server starts while the block runs (the store's bulk ingest spawns workers),
    seen by polling /proc every 20 ms; each new pid's parent is read once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.children: set[int] = set()
        self._known: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ChildWatcher:
        self._scan()
        self.children.clear()  # only those started from now on
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._scan()

    def _scan(self) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in self._known:
                continue
            self._known.add(int(entry))
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == self.pid:
                self.children.add(int(entry))


# -- data -----------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, parts))).int}"


@dataclass(frozen=True)
class Instance:
    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int


def write_big_instance(folder: Path) -> Instance:
    """One 50 MB instance: 96 frames of 512x512 16-bit pixels."""
    folder.mkdir(parents=True)
    study_uid, series_uid, sop_uid = _uid("big", "study"), _uid("big", "series"), _uid("big", 1)
    ds = make_instance(patient_id="BIG", patient_name="BIG^INSTANCE", study_uid=study_uid, series_uid=series_uid,
                       sop_uid=sop_uid, modality="CT", rows=512, columns=512, frames=96, study_description="BIG",
                       series_description="96 frames", seed=7)
    path = folder / "big.dcm"
    return Instance(path, study_uid, series_uid, sop_uid, write_instance(path, ds))


def plain_copy(sources: list[tuple[Path, str]], folder: Path) -> None:
    """Copy each source file into ``folder`` under the given name."""
    folder.mkdir(parents=True)
    for source, name in sources:
        shutil.copyfile(source, folder / name)


def read_all(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(CHUNK):
                pass


def files_in(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def dav_path(*parts: str) -> str:
    return "/" + "/".join(quote(part) for part in parts)


# -- requests -------------------------------------------------------------------------------------


def get_once(server: Server, path: str, expected: int, conn: http.client.HTTPConnection) -> float:
    """GET ``path`` over ``conn``, reading the body in 1 MiB readinto calls; return the seconds."""
    buffer = bytearray(CHUNK)
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    total = 0
    while n := response.readinto(buffer):
        total += n
    seconds = time.perf_counter() - started
    if response.status != 200 or total != expected:
        raise CannotRun(f"{server.name}: GET {path} gave {response.status} with {total} bytes, expected {expected}")
    return seconds


def curl_once(server: Server, path: str, expected: int) -> float:
    done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                           server.url.rstrip("/") + path], capture_output=True, text=True, timeout=SHORT)
    code, size, seconds = done.stdout.split()
    if code != "200" or int(size) != expected:
        raise CannotRun(f"{server.name}: curl GET {path} gave {code} with {size} bytes, expected {expected}")
    return float(seconds)


_RESPONSE = re.compile(rb"<(?:[A-Za-z0-9_]+:)?response[\s>]")


def propfind_once(server: Server, path: str, body: bytes, conn: http.client.HTTPConnection) -> tuple[float, int, int]:
    """PROPFIND Depth 1; return the seconds, the number of <response> elements and the body size."""
    started = time.perf_counter()
    conn.request("PROPFIND", path, body=body, headers={"Depth": "1", "Content-Type": 'application/xml; charset="utf-8"'})
    response = conn.getresponse()
    data = response.read()
    seconds = time.perf_counter() - started
    if response.status != 207:
        raise CannotRun(f"{server.name}: PROPFIND {path} gave {response.status}: {data[:500]!r}")
    return seconds, len(_RESPONSE.findall(data)), len(data)


def propfind_seconds(server: Server, path: str, body: bytes, conn: http.client.HTTPConnection) -> float:
    return propfind_once(server, path, body, conn)[0]


def put_all(server: Server, folder: str, files: list[tuple[str, bytes]], clients: int) -> float:
    """PUT every (name, bytes) into ``folder`` from ``clients`` threads, each with one keep-alive
    connection; return the seconds until the last answer."""
    errors: list[str] = []
    shares = [files[i::clients] for i in range(clients)]

    def client(share: list[tuple[str, bytes]]) -> None:
        conn = server.connection()
        try:
            for name, data in share:
                conn.request("PUT", f"{folder}{quote(name)}", body=data, headers={"Content-Type": "application/dicom"})
                response = conn.getresponse()
                answer = response.read()
                if response.status not in (201, 204):
                    errors.append(f"PUT {name}: {response.status} {answer[:300]!r}")
                    return
        except (OSError, http.client.HTTPException) as error:
            errors.append(f"{type(error).__name__}: {error}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise CannotRun(f"{server.name}: {len(errors)} client(s) failed: {errors[0]}")
    return seconds


def alternate(rounds: int, bridge: Callable[[], float], reference: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Run ``rounds`` of each, alternating which goes first, so both see the same noise."""
    ours: list[float] = []
    theirs: list[float] = []
    for number in range(rounds):
        if number % 2:
            theirs.append(reference())
            ours.append(bridge())
        else:
            ours.append(bridge())
            theirs.append(reference())
    return ours, theirs


# -- 1. GET ---------------------------------------------------------------------------------------


def measure_get(bridge: Server, reference: Server, big: Instance, profiler: Profiler, *, rounds: int) -> list[Row]:
    bridge_path = dav_path("by-uids", big.study_uid, big.series_uid, f"{big.sop_uid}.dcm")
    reference_path = dav_path("get", f"{big.sop_uid}.dcm")
    mb = big.size / 1e6
    rows: list[Row] = []
    with contextlib.closing(bridge.connection()) as ours, contextlib.closing(reference.connection()) as theirs:
        get_once(bridge, bridge_path, big.size, ours)  # warm: the blob and the file into the page cache
        get_once(reference, reference_path, big.size, theirs)
        with profiler.section("get"):
            mine, other = alternate(rounds, lambda: get_once(bridge, bridge_path, big.size, ours),
                                    lambda: get_once(reference, reference_path, big.size, theirs))
    best, ref_best = mb / min(mine), mb / min(other)
    progress(f"  GET {mb:.1f} MB, http.client: dicomfs " + " ".join(f"{mb / s:.0f}" for s in mine)
             + " MB/s | reference " + " ".join(f"{mb / s:.0f}" for s in other) + " MB/s")
    rows.append(Row("get", f"GET {mb:.0f} MB instance, http.client 1 MiB reads (best of {rounds})", best, "MB/s",
                    ref_best, limit=GET_VS_REFERENCE,
                    detail={"bytes": big.size, "dicomfs_mbps": [mb / s for s in mine],
                            "reference_mbps": [mb / s for s in other], "path": bridge_path}))
    if shutil.which("curl"):
        mine, other = alternate(rounds, lambda: curl_once(bridge, bridge_path, big.size),
                                lambda: curl_once(reference, reference_path, big.size))
        progress(f"  GET {mb:.1f} MB, curl:        dicomfs " + " ".join(f"{mb / s:.0f}" for s in mine)
                 + " MB/s | reference " + " ".join(f"{mb / s:.0f}" for s in other) + " MB/s")
        rows.append(Row("get", f"GET {mb:.0f} MB instance, curl (best of {rounds})", mb / min(mine), "MB/s",
                        mb / min(other), detail={"dicomfs_mbps": [mb / s for s in mine],
                                                 "reference_mbps": [mb / s for s in other]}))
    return rows


# -- 2. PROPFIND ----------------------------------------------------------------------------------


def measure_propfind(bridge: Server, reference: Server, study_uid: str, series_uid: str, count: int,
                     profiler: Profiler, *, rounds: int) -> list[Row]:
    bridge_path = dav_path("by-uids", study_uid, series_uid) + "/"
    reference_path = "/propfind/"
    rows: list[Row] = []
    with contextlib.closing(bridge.connection()) as ours, contextlib.closing(reference.connection()) as theirs:
        for label, body in PROPFIND_BODIES.items():
            cold, mine_entries, mine_bytes = propfind_once(bridge, bridge_path, body, ours)
            ref_cold, ref_entries, ref_bytes = propfind_once(reference, reference_path, body, theirs)
            if mine_entries < count + 1 or ref_entries != count + 1:
                raise CannotRun(f"PROPFIND {label}: {mine_entries} responses from dicomfs, {ref_entries} from the "
                                f"reference; expected {count + 1} (+1 for series.json from dicomfs)")
            with profiler.section(f"propfind-{label.replace(' ', '-')}"):
                mine, other = alternate(rounds, functools.partial(propfind_seconds, bridge, bridge_path, body, ours),
                                        functools.partial(propfind_seconds, reference, reference_path, body, theirs))
            best, median = min(mine) * 1000, statistics.median(mine) * 1000
            ref_best, ref_median = min(other) * 1000, statistics.median(other) * 1000
            progress(f"  PROPFIND {label:<13} dicomfs best {best:6.1f} median {median:6.1f} ms (cold {cold * 1000:.1f}, "
                     f"{mine_entries} responses, {mine_bytes / 1e6:.2f} MB) | reference best {ref_best:6.1f} median "
                     f"{ref_median:6.1f} ms (first {ref_cold * 1000:.1f}, {ref_entries} responses, {ref_bytes / 1e6:.2f} MB)")
            rows.append(Row("propfind", f"PROPFIND Depth 1, {count:,} instances, {label}: best (of {rounds})", best, "ms",
                            ref_best, higher_is_better=False, limit=PROPFIND_VS_REFERENCE,
                            detail={"dicomfs_ms": [s * 1000 for s in mine], "reference_ms": [s * 1000 for s in other],
                                    "dicomfs_cold_ms": cold * 1000, "reference_first_ms": ref_cold * 1000,
                                    "dicomfs_responses": mine_entries, "reference_responses": ref_entries,
                                    "dicomfs_body_bytes": mine_bytes, "reference_body_bytes": ref_bytes,
                                    "median_ratio": median / ref_median}))
            rows.append(Row("propfind", f"PROPFIND Depth 1, {count:,} instances, {label}: median", median, "ms",
                            ref_median, higher_is_better=False))
    return rows


# -- 3. PUT ---------------------------------------------------------------------------------------


def upload_files(corpus: Corpus) -> list[tuple[str, bytes]]:
    """(flat name, bytes) of every file, read into memory: both servers get the same bodies."""
    return [("_".join(s.path.relative_to(corpus.root).parts), s.path.read_bytes()) for s in corpus.files]


def put_until_ingested(bridge: Server, cli: Dicomfs, files: list[tuple[str, bytes]], clients: int) -> tuple[float, float, int]:
    """PUT into uploads/, wait until STORE/uploads/ is empty and the store counts them all; return
    (seconds until ingested, seconds of the PUTs alone, processes the bridge started meanwhile)."""
    before = cli.instances()
    staged = cli.store / "uploads"
    with ChildWatcher(bridge.pid) as watcher:
        started = time.perf_counter()
        put_seconds = put_all(bridge, "/uploads/", files, clients)
        deadline = time.monotonic() + LONG
        while files_in(staged) and time.monotonic() < deadline:
            time.sleep(0.005)
        seen_empty = time.perf_counter()
    while True:
        if files_in(staged) == 0:
            stored = cli.instances() - before
            if stored >= len(files):
                return seen_empty - started, put_seconds, len(watcher.children)
            seen_empty = time.perf_counter()
        if time.monotonic() > deadline:
            raise CannotRun(f"uploads: {files_in(staged)} files still in uploads/, {cli.instances() - before} of "
                            f"{len(files)} stored after {LONG} s")
        time.sleep(0.005)


def measure_put(bridge: Server, reference: Server, cli: Dicomfs, corpora: dict[int, Corpus], plain: Path,
                profiler: Profiler) -> list[Row]:
    rows: list[Row] = []
    for clients, corpus in corpora.items():
        files = upload_files(corpus)
        count = len(files)
        folder = f"put-{clients}"
        (plain / folder).mkdir()
        os.sync()  # earlier writes to disk now, not inside the measurement
        with profiler.section(f"put-{clients}"):
            ingested, puts, spawned = put_until_ingested(bridge, cli, files, clients)
        os.sync()
        ref_seconds = put_all(reference, f"/{folder}/", files, clients)
        if files_in(plain / folder) != count:
            raise CannotRun(f"the reference holds {files_in(plain / folder)} of {count} PUT files")
        rate, ref_rate = count / ingested, count / ref_seconds
        who = "1 client" if clients == 1 else f"{clients} concurrent clients"
        progress(f"  PUT {count} files, {who}: dicomfs {ingested:.2f} s until ingested ({puts:.2f} s of PUTs, "
                 f"{count / puts:.0f} files/s) = {rate:.0f} files/s, {spawned} processes started by the bridge | "
                 f"reference {ref_seconds:.2f} s = {ref_rate:.0f} files/s")
        size = sum(len(data) for _, data in files)
        rows.append(Row("put", f"PUT {count} files (~{size / count / 1e3:.0f} kB) into uploads/ until ingested, {who}",
                        rate, "files/s", ref_rate, limit=PUT_VS_REFERENCE if clients == 1 else None,
                        detail={"until_ingested_seconds": ingested, "put_seconds": puts, "bridge_child_processes": spawned,
                                "reference_seconds": ref_seconds, "bytes": size}))
        rows.append(Row("put", f"  the PUTs alone (answers, not yet ingested), {who}", count / puts, "files/s",
                        ref_rate))
    return rows


# -- the run --------------------------------------------------------------------------------------


def measure(command: list[str], workdir: Path, rows: list[Row], *, quick: bool, profile: Path | None,
            py_spy: str | None) -> None:
    """Write the data, start both servers, append each section's rows to ``rows`` as it ends."""
    started = time.perf_counter()
    series_size = 2000
    big = write_big_instance(workdir / "src-big")
    series = write_corpus(workdir / "src-series", patients=1, studies_per_patient=1, series_per_study=1,
                          instances_per_series=series_size, pixels=64, seed=11)
    put_count = 200 if quick else 500
    per_series = 25
    corpora = {
        clients: write_corpus(workdir / f"src-put-{clients}", patients=put_count // (2 * per_series),
                              studies_per_patient=1, series_per_study=2, instances_per_series=per_series,
                              seed=20 + clients)
        for clients in (1, CONCURRENT_CLIENTS)
    }
    progress(f"data: 1 instance of {big.size / 1e6:.1f} MB, a series of {len(series.files)}, "
             f"2 x {put_count} to upload, written in {time.perf_counter() - started:.1f} s")

    config = workdir / "dicomfs.toml"
    config.write_text(f'[storage]\ncompression = "none"\n\n[webdav]\nblock_size = {BLOCK_SIZE}\nthreads = {THREADS}\n')
    cli = Dicomfs(command, workdir / "store", config)
    cli.run("init")
    started = time.perf_counter()
    cli.run("ingest", "--quiet", str(big.path), str(series.root), timeout=LONG)
    stored = cli.instances()
    if stored != series_size + 1:
        raise CannotRun(f"the store holds {stored} instances, expected {series_size + 1}")
    progress(f"  ingested {stored} instances in {time.perf_counter() - started:.1f} s")

    plain = workdir / "plain"
    plain_copy([(big.path, f"{big.sop_uid}.dcm")], plain / "get")
    plain_copy([(s.path, f"{s.sop_uid}.dcm") for s in series.files], plain / "propfind")
    read_all([plain / "get" / f"{big.sop_uid}.dcm"])  # the bridge's blob is read by the first, untimed GET
    os.sync()

    bridge = Server("dicomfs", cli.argv("webdav", "--bind", "127.0.0.1:0"), workdir, env=cli.env)
    reference = Server("reference", [sys.executable, "-c", REFERENCE_SERVER, str(plain), str(BLOCK_SIZE), str(THREADS)],
                       workdir)
    try:
        bridge.start()
        reference.start()
        progress(f"servers: dicomfs {bridge.url} (pid {bridge.pid}), reference {reference.url} (pid {reference.pid}); "
                 f"block_size {BLOCK_SIZE}, {THREADS} threads")
        profiler = Profiler(py_spy, profile, bridge.pid)
        rows += measure_get(bridge, reference, big, profiler, rounds=3 if quick else 7)
        sample = series.files[0]
        rows += measure_propfind(bridge, reference, sample.study_uid, sample.series_uid, series_size, profiler,
                                 rounds=5 if quick else 15)
        rows += measure_put(bridge, reference, cli, corpora, plain, profiler)
    finally:
        for server in (bridge, reference):
            server.stop()
    log = bridge.stderr()
    problems = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    if problems:
        progress(f"  the bridge logged {len(problems)} error line(s), first: {problems[0][:300]}")


# -- report ---------------------------------------------------------------------------------------


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = options(__doc__.splitlines()[0] if __doc__ else None, "fewer rounds, 200 uploads instead of 500",
                     profile="record the bridge with py-spy into DIR (slows the bridge: figures not comparable)")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    py_spy = find_py_spy(parser, args)
    workdir = work_folder(parser, args, "webdav")
    import cheroot
    import wsgidav

    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "pydicom": pydicom.__version__, "wsgidav": wsgidav.__version__, "cheroot": cheroot.__version__,
               "dicomfs": shlex.join(command), "workdir": str(workdir), "quick": args.quick,
               "block_size": BLOCK_SIZE, "profiled": bool(args.profile)}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    status = 0
    try:
        measure(command, workdir, rows, quick=args.quick, profile=args.profile, py_spy=py_spy)
    except (CannotRun, subprocess.SubprocessError, OSError) as error:
        print(f"cannot run: {error}", file=sys.stderr, flush=True)
        status = 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return finish(args, machine, rows, status, started, print_report)


if __name__ == "__main__":
    sys.exit(main())
