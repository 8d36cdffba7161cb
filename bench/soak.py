"""Soak test: ten minutes of mixed load on one store, its daemons killed with SIGKILL and restarted
every two minutes, then the invariants checked.

Run from the repository (as root: it mounts with FUSE)::

    .venv/bin/python bench/soak.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]

**What runs.** Everything binds 127.0.0.1 only; every daemon is the real command line in a
subprocess, its stdout and stderr in ``logs/<name>-<n>.log`` of the work folder.

- Store A (``storage.compression = "none"``, ``log.level = "info"``, ``jobs.lease = 10`` and
  ``jobs.retry_max_delay = 10`` so a job held by a killed runner moves on within seconds, no
  users: loopback without a password, every right) served by three processes at once:
  ``dicomfs mount MNT --foreground --auto-unmount``, ``dicomfs webdav --bind 127.0.0.1:PORT`` and
  ``dicomfs worker``. The mount and the bridge run jobs too (``jobs.run`` defaults to true): the
  lease decides which of the three runs a job.
- Store B, the export target: ``dicomfs webdav`` on its own store, one ``[users.soak]`` with the
  ``read`` and ``transfer`` rights. Store A names it ``[peers.target]`` with ``bucket_size = 64
  KiB`` and ``workers = 1``, so a job takes long enough to be hit by the kills.

Before the load, two sets are ingested into A with ``dicomfs ingest``: the *export set* from
:func:`dicomfs.samples.write_corpus` (one patient per kill cycle, 2 studies x 1 series x 40
instances of 256x256 pixels, ~130 kB each), which nothing deletes, and the *seed set* from
:func:`dicomfs.samples.make_instance` (4 patients ``SEED<n>`` x 2 studies x 2 series x 10
instances of 32x32) that the deleter may delete.

**The load** (``--quick``: 60 s instead of 600 s), from threads of this process:

- 4 uploaders, each on its own keep-alive connection, PUT new unique instances (32x32, made by
  :func:`dicomfs.samples.make_instance`; 10 per series, 3 series per study, one patient per
  uploader) into ``/uploads/<name>.dcm`` of A's bridge, 20 ms apart. A PUT that fails with a
  connection error is sent again under the same name until it is answered (or the load ends).
- 2 mount readers: list ``MNT/by-uids/`` (now and then ``MNT/by-patients/`` and a patient), a
  study, a series, read one instance whole and compare its SHA-256 with the bytes this process
  sent or ingested under that SOPInstanceUID; 2 bridge readers: the same with ``PROPFIND
  Depth: 1`` and ``GET``. Each pauses 20 ms between instances.
- 1 deleter, every 1.5 s: one instance, or one whole series, chosen among those known stored for
  at least 3 s (seed set, and acknowledged uploads gone from ``uploads/``), alternately by
  WebDAV ``DELETE`` and by ``os.unlink`` / ``shutil.rmtree`` in the mount. It deletes a series
  only once its uploader has finished it and every instance of it is known stored, so nothing
  acknowledged later falls into a series being deleted. A delete answered 2xx (or returning
  without error in the mount) counts its instances as *deleted*; one cut off by a kill as *maybe
  deleted* (they may be there or not, never twice).
- The exports: 3 s before each kill cycle, ``dicomfs send --to target <PatientID>`` queues a job
  for the next patient of the export set.
- The kills: every 120 s (``--quick``: at 20 s and 50 s), staggered 2 s apart: B's bridge, A's
  bridge, A's mount, A's worker, each with SIGKILL, then restarted at once (the mount after
  ``fusermount3 -uz``); the next kill waits until the restarted daemon is ready (the bridge
  printed ``serving``, the mount answers a listing, the worker printed ``running jobs``).

**"Acknowledged".** An upload is *acknowledged* when its PUT was answered 201 or 204: from then
the bridge holds the complete file in ``STORE/uploads/`` and answers for it. A tracker thread
notes when each acknowledged file leaves ``uploads/`` (it is removed only once stored); an upload
acknowledged just before a SIGKILL may still sit there, and the product must store it later (at
the next start). The invariant is checked on the final store, whatever happened in between.

**Errors.** A connection error (refused, reset, closed, broken pipe, timeout; ``ENOTCONN``,
``ECONNABORTED`` or ``ENOENT`` in the mount) counts as a *reset* when a kill window of the daemon
it talks to (SIGKILL to ready + 3 s) overlaps the request (for a keep-alive connection: the time
since the connection was opened). Reads and listings that meet an instance or series the deleter
is deleting (404 or ``ENOENT``) are counted apart as *raced a delete*. Everything else is an error,
counted by kind (with up to three examples each), and fails the run.

**After the load**: the load threads stop, every daemon is stopped with SIGTERM and started again
once (a clean restart), ``uploads/`` of A is given up to 60 s (``--quick``: 15 s) to drop every
acknowledged file, and the export jobs up to 120 s (``--quick``: 20 s) to end; then every daemon
is stopped and the checks run:

1. ``dicomfs check`` (with SHA-256 verification) exits 0 on A and on B;
2. every acknowledged upload is stored in A exactly once (by SOPInstanceUID), except the ones
   deleted (absent) and maybe deleted (at most once); no SOPInstanceUID is stored twice at all;
3. nothing deleted is in A;
4. every export job ended in ``success``, and B holds exactly the export set's instances, each
   with the SHA-256 of the source file;
5. no error but resets during the load, and the daemons logged no ``Traceback``.

Printed: requests served per kind (and per second of load), errors by kind, kills, uploads
acknowledged / stored / left in ``uploads/``, deletes, exports, the checks with PASS/FAIL. Exit
status 0 when every check passes, 1 when one fails (the work folder is then kept, with the
daemons' logs), 2 when the soak cannot run. Every daemon is killed and the mount unmounted
(``fusermount3 -uz``) in a ``finally``; every subprocess has a timeout. Figures on a shared
machine are contended: the rates are the load's, not the product's best.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _shared import CannotRun, dicomfs_command, finish, options, progress, work_folder  # noqa: E402

from dicomfs.passwords import hash_password  # noqa: E402
from dicomfs.samples import make_instance, write_corpus, write_instance  # noqa: E402
from dicomfs.store import Instance, Level, Store  # noqa: E402

UPLOADERS, MOUNT_READERS, BRIDGE_READERS = 4, 2, 2
PER_SERIES, SERIES_PER_STUDY = 10, 3
UPLOAD_PAUSE, READ_PAUSE, DELETE_EVERY = 0.02, 0.02, 1.5
SETTLED = 3.0  # seconds an instance must be known stored before the deleter may pick it
STAGGER = 2.0  # seconds between the kills of one cycle
GRACE = 3.0  # seconds after a restarted daemon is ready that still count as its kill window
HTTP_TIMEOUT = 30
HANG = 30.0  # seconds without an answer from the mount that count as a hang
SHORT = 120
USER = "soak"


@dataclass(frozen=True)
class Plan:
    load: float
    first_kill: float
    period: float
    drain: float
    export_wait: float

    def cycles(self) -> list[float]:
        times, at = [], self.first_kill
        while at + 3 * STAGGER + 2 <= self.load:
            times.append(at)
            at += self.period
        return times


FULL = Plan(load=600, first_kill=120, period=120, drain=60, export_wait=120)
QUICK = Plan(load=60, first_kill=20, period=30, drain=15, export_wait=20)


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Line:
    """One line of the report: a figure, or a check with its verdict."""

    section: str
    name: str
    value: str
    check: bool | None = None  # None: a figure, no verdict
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return self.check


def print_lines(lines: list[Line]) -> None:
    print("\n| section | measure | value | check |")
    print("|---|---|---:|---|")
    for line in lines:
        verdict = "-" if line.check is None else ("PASS" if line.check else "FAIL")
        print(f"| {line.section} | {line.name} | {line.value} | {verdict} |")
    checks = [line for line in lines if line.check is not None]
    failed = sum(not line.check for line in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} checks passed.")


# -- daemons --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Windows:
    """When each daemon was down: from its SIGKILL to GRACE seconds after it was ready again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: dict[str, list[list[float | None]]] = defaultdict(list)

    def down(self, name: str) -> None:
        with self._lock:
            self._spans[name].append([time.monotonic(), None])

    def up(self, name: str) -> None:
        with self._lock:
            if self._spans[name] and self._spans[name][-1][1] is None:
                self._spans[name][-1][1] = time.monotonic() + GRACE

    def overlaps(self, name: str, start: float, end: float) -> bool:
        with self._lock:
            return any(s is not None and s <= end and (e is None or e >= start) for s, e in self._spans[name])


class Daemon:
    """One long-running dicomfs process, restartable; ``ready`` says when it answers."""

    def __init__(self, name: str, argv: list[str], logs: Path, ready: Callable[[Daemon], bool]) -> None:
        self.name, self.argv, self.logs, self.ready = name, argv, logs, ready
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.mountpoint: Path | None = None
        self.hung_kills = 0
        self.log: Path = logs / f"{name}-0.log"

    def start(self, timeout: float = 60) -> float:
        """Start it and wait until it is ready; returns the seconds that took."""
        began = time.monotonic()
        for attempt in range(3):
            self.starts += 1
            self.log = self.logs / f"{self.name}-{self.starts}.log"
            with open(self.log, "wb") as log:
                self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self.ready(self):
                    return time.monotonic() - began
                time.sleep(0.05)
            else:
                self.kill()
                raise CannotRun(f"{self.name} not ready after {timeout:.0f} s: {self.tail()}")
            progress(f"  {self.name} exited {self.process.returncode} at start (attempt {attempt + 1}): {self.tail()}")
            time.sleep(1)
        raise CannotRun(f"{self.name} would not start: {self.tail()}")

    def tail(self, lines: int = 8) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def logged(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # A FUSE daemon with a thread stuck in the kernel on its own mount survives SIGKILL.
                aborted = self.mountpoint is not None and abort_fuse(self.mountpoint)
                progress(f"  {self.name} (pid {self.process.pid}) still there 10 s after SIGKILL"
                         + ("; its FUSE connection aborted" if aborted else ""))
                self.hung_kills += 1
                self.process.wait(timeout=SHORT)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if it had to be killed)."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            progress(f"  {self.name} ignored SIGTERM for {timeout:.0f} s: killed")
            self.kill()
            return None


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=SHORT, check=False)


def abort_fuse(mountpoint: Path) -> bool:
    """Abort the FUSE connection of ``mountpoint`` (fusectl), which fails every request a hung daemon
    will never answer and lets its process die; True if there was one to abort."""
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint) and " - fuse" in line:
                device = fields[2].split(":")[1]
    if device is None:
        return False
    connections = Path("/sys/fs/fuse/connections")
    if not (connections / device).exists():
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], capture_output=True, timeout=SHORT, check=False)
    try:
        (connections / device / "abort").write_text("1")
    except OSError:
        return False
    return True


def mount_ready(mountpoint: Path) -> Callable[[Daemon], bool]:
    def ready(_: Daemon) -> bool:
        try:
            return os.path.ismount(mountpoint) and "by-uids" in os.listdir(mountpoint)
        except OSError:
            return False
    return ready


def logged(text: str) -> Callable[[Daemon], bool]:
    return lambda daemon: daemon.logged(text)


# -- what this process knows ----------------------------------------------------------------------


@dataclass
class Known:
    """One instance this process ingested or uploaded."""

    sop: str
    study: str
    series: str
    sha256: str
    size: int
    kind: str  # "export", "seed" or "upload"
    name: str = ""  # the upload's file name in uploads/


class Ledger:
    """Everything the load threads learn, behind one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: dict[str, Known] = {}
        self.acked: dict[str, float] = {}  # sop -> when its PUT was answered 2xx
        self.stored_at: dict[str, float] = {}  # sop -> when it was known stored (gone from uploads/, or ingested)
        self.closed_series: set[str] = set()  # series an uploader finished
        self.series_members: dict[str, list[str]] = defaultdict(list)
        self.deleting: set[str] = set()  # sops, series and studies a delete was sent for
        self.deleted: set[str] = set()
        self.maybe_deleted: set[str] = set()
        self.served: Counter[str] = Counter()
        self.resets: Counter[str] = Counter()
        self.raced: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.deletes: Counter[str] = Counter()
        self.busy: dict[str, tuple[str, float]] = {}  # thread -> (mount operation, since when)

    def add(self, item: Known) -> None:
        with self.lock:
            self.known[item.sop] = item
            self.series_members[item.series].append(item.sop)

    def ok(self, kind: str) -> None:
        with self.lock:
            self.served[kind] += 1

    def error(self, kind: str, text: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.examples[kind]) < 3:
                self.examples[kind].append(f"{time.strftime('%H:%M:%S')} {text[:300]}")

    def touched(self, *names: str) -> bool:
        with self.lock:
            return any(name in self.deleting for name in names)


CONNECTION_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE}


def is_connection_error(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError, http.client.IncompleteRead, http.client.BadStatusLine)):
        return True
    return isinstance(error, OSError) and error.errno in CONNECTION_ERRNOS


class Soak:
    def __init__(self, command: list[str], workdir: Path, plan: Plan) -> None:
        self.command, self.workdir, self.plan = command, workdir, plan
        self.ledger = Ledger()
        self.windows = Windows()
        self.stop = threading.Event()
        self.mountpoint = workdir / "mnt"
        self.store_a, self.store_b = workdir / "store-a", workdir / "store-b"
        self.config_a, self.config_b = workdir / "a.toml", workdir / "b.toml"
        self.logs = workdir / "logs"
        self.port_a, self.port_b = free_port(), free_port()
        self.password = uuid.uuid4().hex
        self.daemons: dict[str, Daemon] = {}
        self.export_patients: list[str] = []
        self.export_jobs: list[str] = []
        self.kills: Counter[str] = Counter()
        self.restart_seconds: list[float] = []
        self.load_seconds = 0.0
        self.threads: list[threading.Thread] = []
        self.began = 0.0

    # -- set-up -----------------------------------------------------------------------------------

    def cli(self, store: Path, config: Path, *args: str, timeout: float = SHORT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.command, "--store", str(store), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, "DICOMFS_CONFIG": str(config)})
        if check and done.returncode != 0:
            raise CannotRun(f"dicomfs {' '.join(args)} exited {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}")
        return done

    def prepare(self) -> None:
        self.logs.mkdir()
        self.mountpoint.mkdir()
        self.config_a.write_text(
            '[storage]\ncompression = "none"\n\n[log]\nlevel = "info"\n\n[jobs]\nlease = 10\nretry_max_delay = 10\n\n'
            f'[peers.target]\nurl = "http://127.0.0.1:{self.port_b}/"\nusername = "{USER}"\npassword = "{self.password}"\n'
            'bucket_size = 65536\nworkers = 1\n')
        self.config_b.write_text('[storage]\ncompression = "none"\n\n[log]\nlevel = "info"\n\n'
                                 f'[users.{USER}]\npassword_hash = "{hash_password(self.password)}"\n'
                                 'rights = ["read", "transfer"]\n')
        self.cli(self.store_a, self.config_a, "init")
        self.cli(self.store_b, self.config_b, "init")
        started = time.perf_counter()
        cycles = len(self.plan.cycles())
        export = write_corpus(self.workdir / "src-export", patients=max(cycles, 1), studies_per_patient=2,
                              series_per_study=1, instances_per_series=40, pixels=256, seed=71)
        seed_root = self.workdir / "src-seed"
        seed_root.mkdir()
        chooser = random.Random(72)
        for patient in range(4):
            for _ in range(2):
                study = f"2.25.{uuid.uuid4().int}"
                for series_number in range(1, 3):
                    series = f"2.25.{uuid.uuid4().int}"
                    for number in range(1, PER_SERIES + 1):
                        sop = f"2.25.{uuid.uuid4().int}"
                        path = seed_root / f"{sop}.dcm"
                        write_instance(path, make_instance(
                            patient_id=f"SEED{patient}", patient_name=f"SEED^{patient}", study_uid=study, series_uid=series,
                            sop_uid=sop, rows=32, columns=32, instance_number=number, series_number=series_number,
                            seed=chooser.randrange(1 << 30)))
                        data = path.read_bytes()
                        self.ledger.add(Known(sop, study, series, hashlib.sha256(data).hexdigest(), len(data), "seed"))
        for f in export.files:
            data = f.path.read_bytes()
            self.ledger.add(Known(f.sop_uid, f.study_uid, f.series_uid, hashlib.sha256(data).hexdigest(), len(data), "export"))
        self.cli(self.store_a, self.config_a, "ingest", "--quiet", str(export.root), timeout=600)
        self.export_patients = sorted({f.patient_id for f in export.files})
        self.cli(self.store_a, self.config_a, "ingest", "--quiet", str(seed_root), timeout=600)
        now = time.monotonic()
        with self.ledger.lock:
            for sop in self.ledger.known:
                self.ledger.stored_at[sop] = now - SETTLED
            self.ledger.closed_series.update(k.series for k in self.ledger.known.values() if k.kind == "seed")
        size = sum(f.size for f in export.files)
        progress(f"set-up: export set {len(export.files)} instances ({size / 1e6:.1f} MB, patients "
                 f"{', '.join(self.export_patients)}), seed set {4 * 2 * 2 * PER_SERIES} instances, ingested into A in "
                 f"{time.perf_counter() - started:.1f} s")
        shutil.rmtree(export.root)
        shutil.rmtree(seed_root)
        a = [*self.command, "--store", str(self.store_a), "--config", str(self.config_a)]
        b = [*self.command, "--store", str(self.store_b), "--config", str(self.config_b)]
        self.daemons = {
            "target": Daemon("target", [*b, "webdav", "--bind", f"127.0.0.1:{self.port_b}"], self.logs, logged("serving ")),
            "bridge": Daemon("bridge", [*a, "webdav", "--bind", f"127.0.0.1:{self.port_a}"], self.logs, logged("serving ")),
            "mount": Daemon("mount", [*a, "mount", str(self.mountpoint), "--foreground", "--auto-unmount"], self.logs,
                            mount_ready(self.mountpoint)),
            "worker": Daemon("worker", [*a, "worker"], self.logs, logged("running jobs")),
        }
        self.daemons["mount"].mountpoint = self.mountpoint

    def start_all(self) -> None:
        for daemon in self.daemons.values():
            seconds = daemon.start()
            progress(f"  {daemon.name} ready in {seconds:.1f} s (pid {daemon.process.pid if daemon.process else '-'})")

    def stop_all(self) -> dict[str, int | None]:
        statuses = {}
        for name in ("worker", "mount", "bridge", "target"):
            statuses[name] = self.daemons[name].stop()
        abort_fuse(self.mountpoint)
        unmount(self.mountpoint)
        return statuses

    # -- the load ---------------------------------------------------------------------------------

    def failed(self, kind: str, component: str, error: BaseException, since: float, *raced: str) -> None:
        """Count a failed request: a reset (a kill window overlaps it), a race with a delete, or an error."""
        now = time.monotonic()
        not_found = (isinstance(error, FileNotFoundError) or (isinstance(error, HttpStatus) and error.status == 404))
        if not_found and raced and self.ledger.touched(*raced):
            with self.ledger.lock:
                self.ledger.raced[kind] += 1
            return
        if is_connection_error(error) and self.windows.overlaps(component, since, now):
            with self.ledger.lock:
                self.ledger.resets[kind] += 1
            return
        name = f"HTTP {error.status}" if isinstance(error, HttpStatus) else type(error).__name__
        if isinstance(error, OSError) and error.errno:
            name += f" {errno.errorcode.get(error.errno, error.errno)}"
        self.ledger.error(f"{kind}: {name}", str(error))

    def uploader(self, number: int) -> None:
        client = Http(self.port_a)
        chooser = random.Random(number)
        patient = f"SOAK{number}-{uuid.uuid4().hex[:6]}"
        made = 0
        scratch = self.workdir / f"gen-{number}.dcm"
        study = series = ""
        while not self.stop.is_set():
            if made % (PER_SERIES * SERIES_PER_STUDY) == 0:
                study = f"2.25.{uuid.uuid4().int}"
            if made % PER_SERIES == 0:
                if series:
                    with self.ledger.lock:
                        self.ledger.closed_series.add(series)
                series = f"2.25.{uuid.uuid4().int}"
            sop = f"2.25.{uuid.uuid4().int}"
            ds = make_instance(patient_id=patient, patient_name=f"SOAK^{number}", study_uid=study, series_uid=series,
                               sop_uid=sop, rows=32, columns=32, instance_number=made % PER_SERIES + 1,
                               series_number=(made // PER_SERIES) % SERIES_PER_STUDY + 1, seed=chooser.randrange(1 << 30))
            write_instance(scratch, ds)
            data = scratch.read_bytes()
            name = f"u{number}-{made:06d}.dcm"
            self.ledger.add(Known(sop, study, series, hashlib.sha256(data).hexdigest(), len(data), "upload", name))
            made += 1
            while not self.stop.is_set():
                began = client.since()
                try:
                    client.request("PUT", f"/uploads/{name}", data, expect=(201, 204))
                except (OSError, http.client.HTTPException, HttpStatus) as error:
                    self.failed("PUT", "bridge", error, began)
                    client.close()
                    if not is_connection_error(error):
                        break  # an answer that is not 2xx: not acknowledged, counted; go on with the next one
                    time.sleep(0.2)
                    continue
                with self.ledger.lock:
                    self.ledger.acked[sop] = time.monotonic()
                self.ledger.ok("PUT")
                break
            time.sleep(UPLOAD_PAUSE)
        client.close()

    def tracker(self) -> None:
        """Notes when acknowledged uploads leave uploads/ (they are stored then)."""
        uploads = self.store_a / "uploads"
        flagged: set[tuple[str, float]] = set()
        while not self.stop.is_set():
            with self.ledger.lock:
                waiting = [(sop, self.ledger.known[sop].name) for sop in self.ledger.acked if sop not in self.ledger.stored_at]
            now = time.monotonic()
            gone = [sop for sop, name in waiting if not (uploads / name).exists()]
            with self.ledger.lock:
                for sop in gone:
                    self.ledger.stored_at[sop] = now
                hung = [(thread, op, since) for thread, (op, since) in self.ledger.busy.items() if now - since > HANG]
            for thread, op, since in hung:
                if (thread, since) not in flagged:
                    flagged.add((thread, since))
                    self.ledger.error(f"{op}: no answer for {HANG:.0f} s (mount hung)", f"{thread}, since load+"
                                      f"{since - self.began:.0f} s")
            self.stop.wait(0.5)

    def check_content(self, kind: str, sop: str, data: bytes) -> None:
        with self.ledger.lock:
            item = self.ledger.known.get(sop)
        if item is None:
            self.ledger.error(f"{kind}: unknown instance", f"{sop} is listed but was never sent nor ingested")
        elif hashlib.sha256(data).hexdigest() != item.sha256:
            self.ledger.error(f"{kind}: content differs", f"{sop}: {len(data)} bytes read, {item.size} sent, SHA-256 differs")
        else:
            self.ledger.ok(kind)

    def mount_reader(self, number: int) -> None:
        chooser = random.Random(100 + number)
        root = self.mountpoint
        while not self.stop.is_set():
            began = time.monotonic()
            step, path, raced = "list", root / "by-uids", []
            with self.ledger.lock:
                self.ledger.busy[threading.current_thread().name] = ("mount list/read", began)
            try:
                if chooser.random() < 0.1:
                    patients = os.listdir(root / "by-patients")
                    self.ledger.ok("mount list")
                    if patients:
                        path = root / "by-patients" / chooser.choice(patients)
                        os.listdir(path)
                        self.ledger.ok("mount list")
                studies = os.listdir(root / "by-uids")
                self.ledger.ok("mount list")
                if not studies:
                    self.stop.wait(0.2)
                    continue
                study = chooser.choice(studies)
                raced = [study]
                path = root / "by-uids" / study
                series_names = [n for n in os.listdir(path) if not n.endswith(".json")]
                self.ledger.ok("mount list")
                if not series_names:
                    continue
                series = chooser.choice(series_names)
                raced.append(series)
                path = path / series
                files = [n for n in os.listdir(path) if n.endswith(".dcm")]
                self.ledger.ok("mount list")
                if not files:
                    continue
                name = chooser.choice(files)
                raced.append(name[:-4])
                path, step = path / name, "read"
                with open(path, "rb") as f:
                    data = f.read()
                self.check_content("mount read", name[:-4], data)
            except OSError as error:
                self.failed(f"mount {step}", "mount", error, began, *raced)
                if is_connection_error(error):
                    self.stop.wait(0.2)
            finally:
                with self.ledger.lock:
                    self.ledger.busy.pop(threading.current_thread().name, None)
            self.stop.wait(READ_PAUSE)

    def bridge_reader(self, number: int) -> None:
        chooser = random.Random(200 + number)
        client = Http(self.port_a)
        while not self.stop.is_set():
            step, raced = "PROPFIND", []
            began = client.since()
            try:
                studies = [n for n in client.listing("/by-uids/") if not n.endswith(".json")]
                self.ledger.ok("PROPFIND")
                if not studies:
                    self.stop.wait(0.2)
                    continue
                study = chooser.choice(studies)
                raced = [study]
                series_names = [n for n in client.listing(f"/by-uids/{quote(study)}/") if not n.endswith(".json")]
                self.ledger.ok("PROPFIND")
                if not series_names:
                    continue
                series = chooser.choice(series_names)
                raced.append(series)
                files = [n for n in client.listing(f"/by-uids/{quote(study)}/{quote(series)}/") if n.endswith(".dcm")]
                self.ledger.ok("PROPFIND")
                if not files:
                    continue
                name = chooser.choice(files)
                raced.append(name[:-4])
                step = "GET"
                data = client.request("GET", f"/by-uids/{quote(study)}/{quote(series)}/{quote(name)}", expect=(200,))
                self.check_content("GET", name[:-4], data)
            except (OSError, http.client.HTTPException, HttpStatus) as error:
                self.failed(step, "bridge", error, began, *raced)
                client.close()
                if is_connection_error(error):
                    self.stop.wait(0.2)
            self.stop.wait(READ_PAUSE)
        client.close()

    def deletable(self, chooser: random.Random, whole_series: bool) -> tuple[str, str, list[str]] | None:
        """(study, series, sops) to delete: one settled instance, or a closed series whose every instance is settled."""
        now = time.monotonic()
        with self.ledger.lock:
            ledger = self.ledger

            def settled(sop: str) -> bool:
                item = ledger.known[sop]
                if item.kind == "export" or sop in ledger.deleting:
                    return False
                return ledger.stored_at.get(sop, now) <= now - SETTLED

            if whole_series:
                candidates = [s for s in ledger.closed_series if s not in ledger.deleting and ledger.series_members[s]
                              and all(settled(sop) or sop in ledger.deleted for sop in ledger.series_members[s])
                              and any(sop not in ledger.deleted for sop in ledger.series_members[s])
                              and all(ledger.known[sop].kind != "upload" or sop in ledger.acked
                                      for sop in ledger.series_members[s])]
                if not candidates:
                    return None
                series = chooser.choice(sorted(candidates))
                sops = [sop for sop in ledger.series_members[series] if sop not in ledger.deleted]
                study = ledger.known[sops[0]].study
                ledger.deleting.update([series, study, *sops])
                return study, series, sops
            pool = sorted(sop for sop in ledger.stored_at if settled(sop))
            if not pool:
                return None
            sop = chooser.choice(pool)
            item = ledger.known[sop]
            ledger.deleting.update([sop, item.series])
            return item.study, item.series, [sop]

    def deleter(self) -> None:
        chooser = random.Random(300)
        client = Http(self.port_a)
        turn = 0
        while not self.stop.wait(DELETE_EVERY):
            turn += 1
            whole_series = turn % 3 == 0
            picked = self.deletable(chooser, whole_series)
            if picked is None:
                continue
            study, series, sops = picked
            through_mount = turn % 2 == 0
            kind = f"{'mount rm' if through_mount else 'DELETE'} {'series' if whole_series else 'instance'}"
            component = "mount" if through_mount else "bridge"
            began = time.monotonic() if through_mount else client.since()
            if through_mount:
                with self.ledger.lock:
                    self.ledger.busy["deleter"] = (kind, began)
            try:
                if through_mount:
                    path = self.mountpoint / "by-uids" / study / series
                    if whole_series:
                        shutil.rmtree(path)
                    else:
                        os.unlink(path / f"{sops[0]}.dcm")
                else:
                    path_text = f"/by-uids/{quote(study)}/{quote(series)}/" + ("" if whole_series else quote(sops[0]) + ".dcm")
                    client.request("DELETE", path_text, expect=(200, 204))
            except (OSError, http.client.HTTPException, HttpStatus) as error:
                self.failed(kind, component, error, began)
                client.close()
                with self.ledger.lock:
                    self.ledger.maybe_deleted.update(sops)
                    self.ledger.busy.pop("deleter", None)
                continue
            with self.ledger.lock:
                self.ledger.busy.pop("deleter", None)
                self.ledger.deleted.update(sops)
                self.ledger.deletes[kind] += 1
                self.ledger.deletes["instances"] += len(sops)
            self.ledger.ok(kind)
        client.close()

    def start_load(self) -> None:
        targets: list[tuple[str, Callable[[], None]]] = [("tracker", self.tracker), ("deleter", self.deleter)]
        targets += [(f"uploader-{n}", lambda n=n: self.uploader(n)) for n in range(UPLOADERS)]
        targets += [(f"mount-reader-{n}", lambda n=n: self.mount_reader(n)) for n in range(MOUNT_READERS)]
        targets += [(f"bridge-reader-{n}", lambda n=n: self.bridge_reader(n)) for n in range(BRIDGE_READERS)]
        for name, target in targets:
            thread = threading.Thread(target=self.guarded(name, target), name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def guarded(self, name: str, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as error:  # a bug of the soak itself must show, not silently end a thread
                self.ledger.error(f"{name} thread crashed: {type(error).__name__}", repr(error))
        return run

    def stop_load(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + HTTP_TIMEOUT + 10  # one deadline for all: stuck threads do not add up
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            progress(f"  load threads still running {HTTP_TIMEOUT + 10} s after the stop: {alive}; aborting the FUSE "
                     "connection of the mount")
            self.ledger.error("mount: requests never answered at the end of the load", f"threads {alive} stuck")
            abort_fuse(self.mountpoint)
            for thread in self.threads:
                thread.join(timeout=10)

    def kill_and_restart(self, name: str) -> None:
        daemon = self.daemons[name]
        self.windows.down(name)
        daemon.kill()
        self.kills[name] += 1
        if name == "mount":
            abort_fuse(self.mountpoint)  # a dead daemon's connection: fails what still waits on it
            unmount(self.mountpoint)
        seconds = daemon.start()
        self.windows.up(name)
        self.restart_seconds.append(seconds)
        progress(f"    {name}: SIGKILL, ready again in {seconds:.1f} s")

    def queue_export(self) -> None:
        patient = self.export_patients[len(self.export_jobs)]
        done = self.cli(self.store_a, self.config_a, "send", "--to", "target", patient)
        found = re.search(r"^job (\S+): ", done.stdout, re.M)
        if found is None:
            raise CannotRun(f"dicomfs send printed no job id: {done.stdout.strip()}")
        self.export_jobs.append(found.group(1))
        progress(f"    export job {found.group(1)} queued for {patient}")

    def run_load(self) -> None:
        cycles = self.plan.cycles()
        progress(f"load: {self.plan.load:.0f} s, kill cycles at {', '.join(f'{c:.0f}' for c in cycles)} s")
        began = time.monotonic()
        self.start_load()
        for number, at in enumerate(cycles, 1):
            self.stop.wait(max(0.0, began + at - 3 - time.monotonic()))
            progress(f"  cycle {number} at {time.monotonic() - began:.0f} s: {self.status()}")
            self.queue_export()
            self.stop.wait(max(0.0, began + at - time.monotonic()))
            for index, name in enumerate(("target", "bridge", "mount", "worker")):
                self.stop.wait(max(0.0, began + at + index * STAGGER - time.monotonic()))
                self.kill_and_restart(name)
        self.stop.wait(max(0.0, began + self.plan.load - time.monotonic()))
        self.load_seconds = time.monotonic() - began
        progress(f"  end of load at {self.load_seconds:.0f} s: {self.status()}")
        self.stop_load()

    def status(self) -> str:
        with self.ledger.lock:
            served = sum(self.ledger.served.values())
            return (f"{served} requests served, {len(self.ledger.acked)} uploads acknowledged, "
                    f"{sum(self.ledger.resets.values())} resets, {sum(self.ledger.errors.values())} errors")

    # -- after the load ---------------------------------------------------------------------------

    def leftovers(self) -> tuple[list[str], list[str]]:
        """The files in A's uploads/: (acknowledged ones, the others)."""
        with self.ledger.lock:
            acked_names = {self.ledger.known[sop].name for sop in self.ledger.acked}
        names = sorted(str(p.relative_to(self.store_a / "uploads")) for p in (self.store_a / "uploads").rglob("*") if p.is_file())
        return [n for n in names if n in acked_names], [n for n in names if n not in acked_names]

    def jobs(self) -> dict[str, dict[str, Any]]:
        done = self.cli(self.store_a, self.config_a, "jobs", "ls", "--json")
        return {job["id"]: job for job in json.loads(done.stdout)}

    def settle(self) -> None:
        progress("after the load: clean stop and restart of every daemon")
        statuses = self.stop_all()
        progress(f"  stopped (exit statuses {statuses})")
        self.start_all()
        deadline = time.monotonic() + self.plan.drain
        while time.monotonic() < deadline and self.leftovers()[0]:
            time.sleep(0.5)
        acked_left, other_left = self.leftovers()
        progress(f"  uploads/: {len(acked_left)} acknowledged files left, {len(other_left)} other files")
        deadline = time.monotonic() + self.plan.export_wait
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if all(jobs.get(j, {}).get("state") in ("success", "failure", "canceled") for j in self.export_jobs):
                break
            time.sleep(1)
        statuses = self.stop_all()
        progress(f"  stopped again (exit statuses {statuses})")

    def verify(self, lines: list[Line]) -> None:
        ledger = self.ledger
        L = lines.append

        def add(section: str, name: str, value: object, check: bool | None = None, **detail: object) -> None:
            L(Line(section, name, str(value), check, dict(detail)))

        seconds = self.load_seconds or float("nan")
        for kind, count in sorted(ledger.served.items()):
            add("served", kind, f"{count:,} ({count / seconds:.1f}/s)")
        add("served", "all requests", f"{sum(ledger.served.values()):,} in {seconds:.0f} s of load")
        for kind, count in sorted(ledger.resets.items()):
            add("resets", kind, count)
        for kind, count in sorted(ledger.raced.items()):
            add("raced a delete", kind, count)
        for kind, count in sorted(ledger.errors.items()):
            add("errors", kind, count, False, examples=ledger.examples[kind])
        add("errors", "errors other than resets during the kills", sum(ledger.errors.values()),
            not ledger.errors)
        for name in ("target", "bridge", "mount", "worker"):
            add("kills", f"{name} (SIGKILL + restart)", self.kills[name])
        hung = {name: d.hung_kills for name, d in self.daemons.items() if d.hung_kills}
        add("kills", "daemons still alive 10 s after SIGKILL", ", ".join(f"{n} {c}x" for n, c in hung.items()) or "none",
            not hung)
        if self.restart_seconds:
            add("kills", "restart to ready, median / max s",
                f"{sorted(self.restart_seconds)[len(self.restart_seconds) // 2]:.1f} / {max(self.restart_seconds):.1f}")
        logs_with_tracebacks = sorted(p.name for p in self.logs.glob("*.log") if "Traceback" in p.read_text(errors="replace"))
        error_lines = sum(len(re.findall(r"^\S+ \S+ (ERROR|CRITICAL) ", p.read_text(errors="replace"), re.M))
                          for p in self.logs.glob("*.log"))
        add("daemons", "ERROR lines in the daemons' logs", error_lines)
        add("daemons", "logs with a Traceback", ", ".join(logs_with_tracebacks) or "none", not logs_with_tracebacks)

        for label, store, config in (("A", self.store_a, self.config_a), ("B", self.store_b, self.config_b)):
            done = self.cli(store, config, "check", timeout=600, check=False)
            last = (done.stdout + done.stderr).strip().splitlines()
            add("check", f"dicomfs check on {label} (exit {done.returncode})", last[-1] if last else "", done.returncode == 0,
                output=(done.stdout + done.stderr)[-3000:])

        with Store(self.store_a, readonly=True) as store:
            in_a = [r for r in store.walk(Level.INSTANCE) if isinstance(r, Instance)]
        with Store(self.store_b, readonly=True) as store:
            in_b = [r for r in store.walk(Level.INSTANCE) if isinstance(r, Instance)]
        count_a = Counter(r.sop_uid for r in in_a)
        twice = sorted(sop for sop, n in count_a.items() if n > 1)
        acked = set(ledger.acked)
        missing = sorted(sop for sop in acked - ledger.deleted - ledger.maybe_deleted if count_a[sop] != 1)
        acked_left, other_left = self.leftovers()
        stored_during = sum(1 for sop in acked if sop in ledger.stored_at)
        add("uploads", "acknowledged (PUT 201/204)", len(acked))
        add("uploads", "acknowledged and gone from uploads/ during the load", stored_during)
        add("uploads", "acknowledged files still in uploads/ at the end", len(acked_left), not acked_left,
            files=acked_left[:50])
        add("uploads", "other files left in uploads/ (PUTs cut by a kill)", len(other_left), files=other_left[:50])
        add("uploads", "instances in A (export + seed + uploads - deletes)", len(in_a))
        add("invariant", "every acknowledged upload not deleted is stored exactly once", f"{len(missing)} not",
            not missing, missing=[self.describe(sop, count_a[sop]) for sop in missing[:50]])
        add("invariant", "no SOPInstanceUID stored twice", f"{len(twice)} twice", not twice, twice=twice[:50])
        back = sorted(sop for sop in ledger.deleted if count_a[sop])
        maybe_twice = sorted(sop for sop in ledger.maybe_deleted if count_a[sop] > 1)
        add("deletes", ", ".join(f"{k} {v}" for k, v in sorted(ledger.deletes.items()) if k != "instances") or "none",
            f"{ledger.deletes['instances']} instances")
        add("deletes", "maybe deleted (cut by a kill): still there / gone",
            f"{sum(1 for s in ledger.maybe_deleted if count_a[s])} / {sum(1 for s in ledger.maybe_deleted if not count_a[s])}")
        add("invariant", "nothing deleted is in A", f"{len(back)} came back", not back and not maybe_twice,
            back=[self.describe(sop, count_a[sop]) for sop in back[:50]])

        jobs = self.jobs()
        states = {job_id: jobs.get(job_id, {}).get("state", "absent") for job_id in self.export_jobs}
        for job_id in self.export_jobs:
            job = jobs.get(job_id, {})
            add("export", f"job {job_id}: {job.get('done_items', '?')}/{job.get('total_items', '?')} done, "
                f"{job.get('failed_items', '?')} failed", states[job_id], states[job_id] == "success",
                last_error=job.get("last_error"))
        with ledger.lock:
            wanted = {(k.sop, k.sha256) for k in ledger.known.values() if k.kind == "export"}
        export_ids = {f for f in self.export_patients[:len(self.export_jobs)]}
        with Store(self.store_a, readonly=True) as store:
            sent_sops: set[str] = set()
            for patient in export_ids:
                for record in store.resolve(patient):
                    if isinstance(record, Instance):
                        sent_sops.add(record.sop_uid)
                    else:
                        sent_sops.update(r.sop_uid for r in store.walk(Level.INSTANCE, record.id) if isinstance(r, Instance))
        expected = {(sop, sha) for sop, sha in wanted if sop in sent_sops}
        held = Counter((r.sop_uid, r.sha256) for r in in_b)
        add("export", "instances the jobs were to send / held by B", f"{len(expected)} / {sum(held.values())}")
        exact = set(held) == expected and all(n == 1 for n in held.values()) and bool(expected)
        add("invariant", "every export job succeeded and B holds exactly its instances (SHA-256 equal)",
            "yes" if exact and all(s == "success" for s in states.values()) else "no",
            exact and bool(states) and all(s == "success" for s in states.values()),
            missing_in_b=sorted(s for s, _ in expected - set(held))[:20],
            extra_in_b=sorted(s for s, _ in set(held) - expected)[:20])

    def describe(self, sop: str, count: int) -> str:
        item = self.ledger.known.get(sop)
        acked = self.ledger.acked.get(sop)
        when = f"acked at load+{acked - self.began:.1f} s" if acked is not None else "not acked"
        return f"{sop} ({item.kind if item else '?'} {item.name if item else ''}, {when}, stored {count}x)"


class HttpStatus(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"answered {status}: {text[:200]}")
        self.status = status


class Http:
    """One keep-alive connection to a bridge on 127.0.0.1, reopened after an error."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None
        self.opened = time.monotonic()

    def since(self) -> float:
        """When the request about to be sent may have begun: when its connection was opened."""
        return self.opened if self.connection is not None else time.monotonic()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = None

    def request(self, method: str, path: str, body: bytes | None = None, *, headers: dict[str, str] | None = None,
                expect: tuple[int, ...]) -> bytes:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
            self.opened = time.monotonic()
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        data = response.read()
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        if response.status not in expect:
            raise HttpStatus(response.status, f"{method} {path}: {data[:200]!r}")
        return data

    def listing(self, path: str) -> list[str]:
        """The names in a folder, from PROPFIND Depth: 1 (the folder itself left out)."""
        body = self.request("PROPFIND", path, b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop><getcontentlength/>'
                            b"</prop></propfind>", headers={"Depth": "1", "Content-Type": "application/xml"}, expect=(207,))
        names = []
        for href in re.findall(rb"<(?:\w+:)?href>([^<]+)</(?:\w+:)?href>", body):
            text = unquote(href.decode())
            if text.rstrip("/") != unquote(path).rstrip("/"):
                names.append(text.rstrip("/").rsplit("/", 1)[-1])
        return names


# -- the run --------------------------------------------------------------------------------------


def main() -> int:
    parser = options(__doc__.splitlines()[0] if __doc__ else None,
                     f"{QUICK.load:.0f} s of load, kills at {', '.join(f'{c:.0f}' for c in QUICK.cycles())} s "
                     "(at most two minutes in all)")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        parser.error("the soak needs root, /dev/fuse and fusermount3 (apt install fuse3)")
    workdir = work_folder(parser, args, "soak")
    plan = QUICK if args.quick else FULL
    machine: dict[str, object] = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                                  "dicomfs": shlex.join(command), "workdir": str(workdir), "quick": args.quick,
                                  "load_s": plan.load, "loadavg_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    lines: list[Line] = []
    started = time.perf_counter()
    status = 0
    soak = Soak(command, workdir, plan)
    try:
        soak.prepare()
        soak.start_all()
        soak.began = time.monotonic()
        soak.run_load()
        soak.settle()
        soak.verify(lines)
        if any(line.check is False for line in lines):
            status = 1
    except (CannotRun, subprocess.SubprocessError, OSError) as error:
        print(f"cannot run: {error}", file=sys.stderr, flush=True)
        status = 2
    finally:
        soak.stop.set()
        for daemon in soak.daemons.values():
            with contextlib.suppress(Exception):
                daemon.kill()
        with contextlib.suppress(Exception):
            abort_fuse(soak.mountpoint)
        unmount(soak.mountpoint)
        machine["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        if args.keep or status != 0:
            print(f"work folder kept: {workdir} (daemons' logs in {workdir / 'logs'})", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    examples = [line for line in lines if line.section == "errors" and line.detail.get("examples")]
    for line in examples:
        print(f"\n{line.name}, first examples:\n  " + "\n  ".join(str(e) for e in line.detail["examples"]))  # type: ignore[union-attr]
    for line in lines:
        if line.check is False and line.section != "errors":
            shown = f" {json.dumps(line.detail, default=str)[:3000]}" if line.detail else ""
            print(f"\nFAIL {line.name}: {line.value}{shown}")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) * 1.5:
        print(f"\nnote: load average {load:.1f} on {os.cpu_count()} CPUs at the end: the machine was contended "
              "(other benchmarks); rates are lower than on an idle machine.")
    return finish(args, machine, lines, status, started, print_lines)


if __name__ == "__main__":
    sys.exit(main())
