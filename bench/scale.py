"""Scale benchmark: one store grown to 10,000, 100,000 and 1,000,000 instances, measured at each step
(issue #7).

Run from the repository, as root (the mount needs /dev/fuse; ``--drop-caches`` writes
/proc/sys/vm/drop_caches)::

    .venv/bin/python bench/scale.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]
                                    [--steps N,N,...] [--drop-caches]

**The data.** Synthetic, small instances (CT, 8x8 16-bit pixels, ~930 bytes): patients of 2
studies x 2 series x 200 instances, so every series folder holds 200 instances and every study
folder 2 series plus ``study.json`` whatever the size of the archive. Each series is encoded with
:class:`dicomfs.sample_encoder.SeriesEncoder` (one template from
:func:`dicomfs.samples.make_instance` per series, then only SOPInstanceUID, InstanceNumber and
PixelData per instance; the pixels come from a bank of 61 noise images), written to a folder
under ``/dev/shm`` (tmpfs, so deleting the sources never touches the measured disk: ext4 makes
new files skip recently freed inodes for a minute, see ``bench/ingest.py``), ingested with the
real command line (``dicomfs --store S --config C.toml ingest DIR --quiet``, which takes the bulk
path through worker processes) and deleted. The store is uncompressed, on the work folder's disk.

**The steps** (default 10k, 100k, 1M; ``--quick``: 2k, 10k, 40k; ``--steps`` to choose). The store
grows in chunks of 50,000 (``--quick``: 10,000) until the last chunk of each step, which is
always 10,000 instances (``--quick``: 2,000) in one ``dicomfs ingest`` command: its files/s
(command start to end, sources in tmpfs) is the step's ingest rate. Then, with the store idle:

- index and blob bytes: allocated blocks, like ``du``, of ``index/`` and ``blobs/``;
- ``dicomfs stats --json`` and ``dicomfs check --no-hash --json``: wall time of the command
  (process start included), the check's peak RSS (``ru_maxrss``); the full check (hashes) too at
  steps up to 100,000 (``--quick``: every step);
- ``dicomfs mount MNT`` and ``dicomfs webdav --bind 127.0.0.1:0`` are started, both on the
  store. With ``--drop-caches``, ``sync; echo 3 > /proc/sys/vm/drop_caches`` runs before both
  start, so both front ends' first requests read from disk; without it (the default, since
  other people's benchmarks share this machine), the store is in the page cache and "cold"
  means a freshly started daemon;
- ``ls -l`` of the first patient's first series folder (200 instances) through the mount, as a
  subprocess: cold (the first one) and warm (median of 11);
- over one keep-alive HTTP connection: PROPFIND Depth 1 (the six named properties of
  ``bench/webdav.py``) of the first patient's first study folder (``by-uids/<study>/``) and of
  its first series folder (200 instances), and GET of one of its instances: cold (the first)
  and warm (median of 11);
- the same series folder, study folder and instance of the *newest* patient too (warm medians,
  no target): what a user is most likely to open;
- peak RSS (VmHWM from /proc/PID/status) of the mount daemon and the bridge once started,
  after those requests, and again after a walk (then also split, as it is then, into RssAnon
  and the mapped file pages, mostly the LMDB index's memory map): ``ls -l`` of ``by-patients/``, ``by-uids/`` and
  ``by-studies/`` and ``ls -lR`` of 3 patients through the mount, PROPFIND Depth 1 of the same
  roots and of 3 patients' study and series folders over HTTP. The root listings grow with the
  archive by design; their times are printed without a target.

Other processes' CPU use (and the hypervisor's steal) is sampled from /proc every second with
``bench/compare.py``'s ``Others`` and printed for every measurement: figures taken while they
came to a quarter of a core or more are flagged CONTENDED.

Targets (the last step against the first): ingest rate >= 0.8x; ``ls -l``, PROPFIND and GET (warm
medians) <= 1.5x; peak RSS of each daemon < 300 MB at the last step. Before starting, free space
and inodes on the work folder's disk are checked against ~9 kB and 1.05 inodes per instance (a
4 kB blob block, the LMDB index, slack), re-estimated from what was used after each step. The
exit status is 0 whatever the targets say, 2 when it cannot run. The mount is undone and the
bridge stopped in ``finally`` blocks; the sources in /dev/shm are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pydicom
from _shared import CannotRun, dicomfs_command, finish, options, progress, work_folder
from compare import Others
from fuse import Dicomfs as MountingCli
from fuse import daemon_pids
from fuse import release
from ingest import disk_usage
from webdav import PROPFIND_BODIES, Server, dav_path

from dicomfs.sample_encoder import SeriesEncoder
from dicomfs.samples import make_instance

PER_SERIES, SERIES_PER_STUDY, STUDIES_PER_PATIENT = 200, 2, 2
PER_PATIENT = PER_SERIES * SERIES_PER_STUDY * STUDIES_PER_PATIENT
FULL_STEPS, QUICK_STEPS = (10_000, 100_000, 1_000_000), (2_000, 10_000, 40_000)
MEASURED_FULL, MEASURED_QUICK = 10_000, 2_000  # the last chunk of each step, timed
FILL_FULL, FILL_QUICK = 50_000, 10_000
FULL_CHECK_UP_TO = 100_000
ROUNDS = 11
WALKED_PATIENTS = 3
BYTES_PER_INSTANCE = 9_000  # a priori: a 4 kB blob block, the LMDB index, slack
INODES_PER_INSTANCE = 1.05
RATE_VS_FIRST = 0.8
LATENCY_VS_FIRST = 1.5
RSS_LIMIT_MB = 300.0
SHORT, LONG = 120, 3600
UID_ROOT = "1.2.826.0.1.3680043.8.498.78"
PROPFIND_HEADERS = {"Depth": "1", "Content-Type": 'application/xml; charset="utf-8"'}
PROPFIND_BODY = PROPFIND_BODIES["6 named props"]


# -- data -----------------------------------------------------------------------------------------


def patient_id(patient: int) -> str:
    return f"SCALE{patient:07d}"


def study_uid(patient: int, study: int) -> str:
    return f"{UID_ROOT}.1.{patient}.{study}"


def series_uid(serial: int) -> str:
    return f"{UID_ROOT}.2.{serial}"


def sop_uid(serial: int, number: int) -> str:
    return f"{UID_ROOT}.3.{serial}.{number}"


def series_place(serial: int) -> tuple[int, int, int]:
    """(patient, study, series number in the study) of the series numbered ``serial`` (from 1)."""
    index = serial - 1
    per_patient = SERIES_PER_STUDY * STUDIES_PER_PATIENT
    return index // per_patient + 1, index % per_patient // SERIES_PER_STUDY + 1, index % SERIES_PER_STUDY + 1


class Generator:
    """Writes whole series, numbered from 1, in order."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.bank = [(1000 + rng.integers(0, 64, (8, 8), dtype=np.uint16)).astype("<u2").tobytes() for _ in range(61)]
        self.next_serial = 1
        self.seconds = 0.0
        self.bytes_written = 0

    def write(self, folder: Path, instances: int) -> int:
        """Write ``instances`` (a multiple of the series size) into ``folder``; return the count."""
        if instances % PER_SERIES:
            raise ValueError(f"{instances} is not a multiple of {PER_SERIES}")
        started = time.perf_counter()
        folder.mkdir(parents=True)
        for _ in range(instances // PER_SERIES):
            serial = self.next_serial
            self.next_serial += 1
            patient, study, number = series_place(serial)
            template = make_instance(
                patient_id=patient_id(patient), patient_name=f"SCALE^P{patient:07d}", study_uid=study_uid(patient, study),
                series_uid=series_uid(serial), sop_uid=sop_uid(serial, 1), modality="CT", study_date="20240101",
                study_description=f"SCALE {study}", series_description=f"SERIES {number}", series_number=number,
                rows=8, columns=8)
            encoder = SeriesEncoder(template)
            target = folder / f"{serial:07d}"
            target.mkdir()
            for n in range(1, PER_SERIES + 1):
                data = encoder.encode(sop_uid(serial, n), n, self.bank[(serial + n) % len(self.bank)])
                with open(target / f"{n:04d}.dcm", "wb") as f:
                    f.write(data)
                self.bytes_written += len(data)
        self.seconds += time.perf_counter() - started
        return instances


# -- processes ------------------------------------------------------------------------------------


class Cli(MountingCli):
    """``bench/fuse.py``'s dicomfs command line, timing its commands."""

    def timed(self, *args: str, timeout: float = LONG) -> tuple[float, int, str]:
        """Run a command; its wall seconds, peak RSS (bytes, ru_maxrss) and stdout."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            child = subprocess.Popen(self.argv(*args), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env)
            try:
                _, status, usage = _wait4(child, timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise CannotRun(f"dicomfs {' '.join(args)} ran over {timeout} s") from None
            seconds = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            text, problems = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        if code and not (args[0] == "check" and code == 1):
            raise CannotRun(f"dicomfs {' '.join(args)} exited {code}: {problems.strip()[-2000:]}")
        return seconds, usage.ru_maxrss * 1024, text


def _wait4(child: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, os.struct_rusage]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(child.args, timeout)
        time.sleep(0.01)


def vm_hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a process, bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise CannotRun(f"no VmHWM for pid {pid}")


def rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of a process now, bytes: its own memory, and mapped file pages
    (the LMDB index is a memory map: the pages a process has read count in its RSS)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                found[line.split(":")[0]] = int(line.split()[1]) * 1024
    return found.get("RssAnon", 0), found.get("RssFile", 0) + found.get("RssShmem", 0)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as error:
        print(f"  cannot drop the kernel caches ({error})", flush=True)
        return False


def shell_seconds(command: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=LONG)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise CannotRun(f"`{command}` exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds


class Http:
    """One keep-alive connection to the bridge."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn = server.connection()

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
                expect: int = 200) -> tuple[float, bytes]:
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
        if response.status != expect:
            raise CannotRun(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return seconds, data

    def propfind(self, path: str) -> float:
        return self.request("PROPFIND", path, body=PROPFIND_BODY, headers=PROPFIND_HEADERS, expect=207)[0]

    def get(self, path: str) -> float:
        return self.request("GET", path)[0]

    def close(self) -> None:
        self.conn.close()


# -- one step -------------------------------------------------------------------------------------


@dataclass
class Step:
    """The figures at one archive size."""

    instances: int
    figures: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # figure -> others' CPU while it was taken


def folders_of(patient: int) -> tuple[str, str, str]:
    """(study folder, series folder, instance) paths under by-uids/ of a patient's first series."""
    serial = (patient - 1) * STUDIES_PER_PATIENT * SERIES_PER_STUDY + 1
    study = dav_path("by-uids", study_uid(patient, 1)) + "/"
    series = study + dav_path(series_uid(serial))[1:] + "/"
    return study, series, series + dav_path(f"{sop_uid(serial, 1)}.dcm")[1:]


class Run:
    def __init__(self, cli: Cli, workdir: Path, others: Others, *, drop: bool, full_check_up_to: int) -> None:
        self.cli, self.workdir, self.others, self.drop = cli, workdir, others, drop
        self.full_check_up_to = full_check_up_to

    @contextlib.contextmanager
    def window(self, step: Step, key: str) -> Iterator[None]:
        with self.others.window(f"{key} at {step.instances:,}"):
            yield
        step.notes[key] = self.others.last_note()

    def median(self, step: Step, key: str, once: Callable[[], float], rounds: int = ROUNDS) -> list[float]:
        with self.window(step, key):
            times = [once() for _ in range(rounds)]
        step.figures[key] = statistics.median(times) * 1000
        return times

    def measure(self, step: Step, newest: int) -> None:
        """Everything but the ingest rate, on the idle store of ``step``."""
        cli, figures = self.cli, step.figures
        figures["index MB"] = disk_usage(cli.store / "index") / 1e6
        figures["blobs MB"] = disk_usage(cli.store / "blobs") / 1e6
        with self.window(step, "stats s"):
            figures["stats s"], _, out = cli.timed("stats", "--json", timeout=SHORT)
        stored = int(json.loads(out)["instances"])
        if stored != step.instances:
            raise CannotRun(f"the store holds {stored:,} instances, expected {step.instances:,}")
        with self.window(step, "check --no-hash s"):
            figures["check --no-hash s"], rss, out = cli.timed("check", "--no-hash", "--json")
        figures["check --no-hash RSS MB"] = rss / 1e6
        if not json.loads(out)["clean"]:
            raise CannotRun(f"dicomfs check --no-hash found problems: {out[:1000]}")
        if step.instances <= self.full_check_up_to:
            with self.window(step, "check s"):
                figures["check s"], rss, out = cli.timed("check", "--json")
            figures["check RSS MB"] = rss / 1e6
        progress(f"  index {figures['index MB']:,.0f} MB, blobs {figures['blobs MB']:,.0f} MB; stats "
                 f"{figures['stats s']:.2f} s; check --no-hash {figures['check --no-hash s']:.1f} s "
                 f"({figures['check --no-hash RSS MB']:.0f} MB RSS)"
                 + (f"; check {figures['check s']:.1f} s" if "check s" in figures else ""))
        dropped = drop_caches() if self.drop else False
        step.notes["caches"] = "dropped" if dropped else "not dropped"
        mountpoint = self.workdir / "mnt"
        bridge = Server("bridge", cli.argv("webdav", "--bind", "127.0.0.1:0"), self.workdir, env=cli.env)
        with cli.mounted(mountpoint):
            mount_pids = daemon_pids(mountpoint)
            if len(mount_pids) != 1:
                raise CannotRun(f"expected one mount daemon for {mountpoint}, found {mount_pids}")
            try:
                bridge.start()
                self.requests(step, mountpoint, bridge, mount_pids[0], newest)
            finally:
                bridge.stop()

    def requests(self, step: Step, mountpoint: Path, bridge: Server, mount_pid: int, newest: int) -> None:
        figures = step.figures
        figures["mount RSS at start MB"] = vm_hwm(mount_pid) / 1e6
        figures["bridge RSS at start MB"] = vm_hwm(bridge.pid) / 1e6
        study, series, instance = folders_of(1)
        series_folder = shlex.quote(str(mountpoint) + series.rstrip("/"))
        ls = f"ls -l {series_folder} > /dev/null"
        with self.window(step, "ls -l series cold ms"):  # the mount's first look at this folder
            figures["ls -l series cold ms"] = shell_seconds(ls) * 1000
        count = len(os.listdir(mountpoint / series.strip("/")))
        if count != PER_SERIES + 1:  # the instances and series.json
            raise CannotRun(f"{series} holds {count} entries through the mount, expected {PER_SERIES + 1}")
        self.median(step, "ls -l series ms", lambda: shell_seconds(ls))
        client = Http(bridge)
        try:
            with self.window(step, "PROPFIND study cold ms"):
                figures["PROPFIND study cold ms"] = client.propfind(study) * 1000
                figures["PROPFIND series cold ms"] = client.propfind(series) * 1000
                figures["GET instance cold ms"] = client.get(instance) * 1000
            self.median(step, "PROPFIND study ms", lambda: client.propfind(study))
            self.median(step, "PROPFIND series ms", lambda: client.propfind(series))
            self.median(step, "GET instance ms", lambda: client.get(instance))
            figures["mount RSS after requests MB"] = vm_hwm(mount_pid) / 1e6
            figures["bridge RSS after requests MB"] = vm_hwm(bridge.pid) / 1e6
            n_study, n_series, n_instance = folders_of(newest)
            n_ls = f"ls -l {shlex.quote(str(mountpoint) + n_series.rstrip('/'))} > /dev/null"
            shell_seconds(n_ls)
            client.propfind(n_study)
            client.propfind(n_series)
            client.get(n_instance)
            self.median(step, "newest: ls -l series ms", lambda: shell_seconds(n_ls))
            self.median(step, "newest: PROPFIND study ms", lambda: client.propfind(n_study))
            self.median(step, "newest: PROPFIND series ms", lambda: client.propfind(n_series))
            self.median(step, "newest: GET instance ms", lambda: client.get(n_instance))
            # the walk
            with self.window(step, "walk"):
                for view in ("by-patients", "by-uids", "by-studies"):
                    figures[f"ls -l {view}/ ms"] = shell_seconds(f"ls -l {shlex.quote(str(mountpoint / view))} "
                                                                 "> /dev/null") * 1000
                    figures[f"PROPFIND {view}/ ms"] = client.propfind(f"/{view}/") * 1000
                patients = sorted(os.listdir(mountpoint / "by-patients"))
                for name in patients[:WALKED_PATIENTS]:
                    shell_seconds(f"ls -lR {shlex.quote(str(mountpoint / 'by-patients' / name))} > /dev/null")
                walked = min(step.instances // PER_SERIES, WALKED_PATIENTS * STUDIES_PER_PATIENT * SERIES_PER_STUDY)
                for serial in range(1, walked + 1):
                    patient, number, in_study = series_place(serial)
                    if in_study == 1:
                        client.propfind(dav_path("by-uids", study_uid(patient, number)) + "/")
                    client.propfind(dav_path("by-uids", study_uid(patient, number), series_uid(serial)) + "/")
            figures["mount peak RSS MB"] = vm_hwm(mount_pid) / 1e6
            figures["bridge peak RSS MB"] = vm_hwm(bridge.pid) / 1e6
            for who, pid in (("mount", mount_pid), ("bridge", bridge.pid)):
                anon, mapped = rss_parts(pid)
                figures[f"{who} RSS anon MB"], figures[f"{who} RSS file MB"] = anon / 1e6, mapped / 1e6
        finally:
            client.close()
        progress(f"  ls -l series cold {figures['ls -l series cold ms']:.1f} ms, warm {figures['ls -l series ms']:.1f} ms; "
                 f"PROPFIND study {figures['PROPFIND study ms']:.2f} ms, series {figures['PROPFIND series ms']:.1f} ms; "
                 f"GET {figures['GET instance ms']:.2f} ms; ls -l by-patients/ {figures['ls -l by-patients/ ms']:.0f} ms, "
                 f"PROPFIND by-patients/ {figures['PROPFIND by-patients/ ms']:.0f} ms; RSS mount "
                 f"{figures['mount peak RSS MB']:.0f} MB, bridge {figures['bridge peak RSS MB']:.0f} MB; "
                 f"{step.notes['ls -l series ms']}")


# -- growing --------------------------------------------------------------------------------------


def check_room(folder: Path, instances: int, bytes_per: float, inodes_per: float) -> None:
    """Refuse (CannotRun) if ``instances`` more will not fit on ``folder``'s disk."""
    found = os.statvfs(folder)
    free, inodes = found.f_bavail * found.f_frsize, found.f_favail
    need, need_inodes = instances * bytes_per * 1.1, instances * inodes_per * 1.1
    if need > free or (found.f_files and need_inodes > inodes):
        raise CannotRun(f"not enough room on {folder}'s disk for {instances:,} more instances: about "
                        f"{need / 1e9:.1f} GB and {need_inodes:,.0f} inodes needed (at {bytes_per:,.0f} bytes and "
                        f"{inodes_per:.2f} inodes per instance), {free / 1e9:.1f} GB and {inodes:,} inodes free; "
                        "use --workdir on a larger disk or fewer --steps")


def source_root(workdir: Path) -> Path:
    """Where generated files wait for their ingest: tmpfs when it has room, else the work folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        found = os.statvfs(shm)
        if found.f_bavail * found.f_frsize > 2e9:
            return Path(tempfile.mkdtemp(prefix="dicomfs-scale-src-", dir=shm))
    return workdir / "sources"


def ingest_chunk(cli: Cli, generator: Generator, sources: Path, instances: int, label: str) -> float:
    folder = sources / label
    generator.write(folder, instances)
    try:
        seconds, _, _ = cli.timed("ingest", "--quiet", str(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return seconds


def grow(run: Run, generator: Generator, sources: Path, steps: list[int], measured: int, fill: int,
         machine: dict[str, object]) -> list[Step]:
    done: list[Step] = []
    stored = 0
    bytes_per, inodes_per = float(BYTES_PER_INSTANCE), INODES_PER_INSTANCE
    check_room(run.workdir, steps[-1], bytes_per, inodes_per)
    for target in steps:
        started = time.perf_counter()
        before = os.statvfs(run.workdir)
        while stored < target - measured:
            size = min(fill, target - measured - stored)
            ingest_chunk(run.cli, generator, sources, size, f"fill-{stored}")
            stored += size
            progress(f"  {stored:,} instances ({time.perf_counter() - started:.0f} s)")
        step = Step(target)
        with run.window(step, "ingest files/s"):
            seconds = ingest_chunk(run.cli, generator, sources, measured, f"measured-{stored}")
        stored += measured
        step.figures["ingest files/s"] = measured / seconds
        progress(f"{target:,} instances: the last {measured:,} at {measured / seconds:,.0f} files/s "
                 f"({step.notes['ingest files/s']}); {time.perf_counter() - started:.0f} s for this step")
        newest = (stored - 1) // PER_PATIENT + 1
        run.measure(step, newest)
        done.append(step)
        after = os.statvfs(run.workdir)
        grown = target - (done[-2].instances if len(done) > 1 else 0)
        used = (before.f_bavail - after.f_bavail) * after.f_frsize
        if grown and used > 0:
            bytes_per = max(bytes_per, used / grown)
            inodes_per = max(inodes_per, (before.f_favail - after.f_favail) / grown)
        remaining = [s for s in steps if s > target]
        if remaining:
            check_room(run.workdir, remaining[-1] - target, bytes_per, inodes_per)
    machine["generated"] = (f"{generator.bytes_written / 1e6:,.0f} MB in {generator.seconds:.0f} s "
                            f"({stored / generator.seconds:,.0f} files/s)")
    return done


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Line:
    """One measure across the steps, with its target (rate: >= limit x first; time: <= limit x first;
    rss: < limit MB at the last step)."""

    name: str
    key: str
    values: dict[int, float]
    kind: str = ""  # "rate", "time", "rss" or "" (no target)
    limit: float | None = None

    @property
    def ratio(self) -> float | None:
        steps = sorted(self.values)
        if len(steps) < 2 or not self.values[steps[0]]:
            return None
        return self.values[steps[-1]] / self.values[steps[0]]

    @property
    def target(self) -> str:
        if self.kind == "rate":
            return f">= {self.limit:g}x"
        if self.kind == "time":
            return f"<= {self.limit:g}x"
        if self.kind == "rss":
            return f"< {self.limit:g} MB"
        return "-"

    @property
    def passed(self) -> bool | None:
        if not self.kind or not self.values:
            return None
        last = self.values[max(self.values)]
        if self.kind == "rss":
            return last < (self.limit or 0)
        ratio = self.ratio
        if ratio is None:
            return None
        return ratio >= (self.limit or 0) if self.kind == "rate" else ratio <= (self.limit or 0)


LINES: list[tuple[str, str, str, float | None]] = [
    ("ingest, the last chunk of each step (files/s)", "ingest files/s", "rate", RATE_VS_FIRST),
    ("index (MB, du)", "index MB", "", None),
    ("blobs (MB, du)", "blobs MB", "", None),
    ("`ls -l` of a 200-instance series via the mount, cold (ms)", "ls -l series cold ms", "", None),
    ("`ls -l` of a 200-instance series via the mount, warm median (ms)", "ls -l series ms", "time", LATENCY_VS_FIRST),
    ("PROPFIND Depth 1 of a study folder, cold (ms)", "PROPFIND study cold ms", "", None),
    ("PROPFIND Depth 1 of a study folder, median (ms)", "PROPFIND study ms", "time", LATENCY_VS_FIRST),
    ("PROPFIND Depth 1 of a 200-instance series folder, cold (ms)", "PROPFIND series cold ms", "", None),
    ("PROPFIND Depth 1 of a 200-instance series folder, median (ms)", "PROPFIND series ms", "time", LATENCY_VS_FIRST),
    ("GET of one instance, cold (ms)", "GET instance cold ms", "", None),
    ("GET of one instance, median (ms)", "GET instance ms", "time", LATENCY_VS_FIRST),
    ("newest patient: `ls -l` series, median (ms)", "newest: ls -l series ms", "", None),
    ("newest patient: PROPFIND study, median (ms)", "newest: PROPFIND study ms", "", None),
    ("newest patient: PROPFIND series, median (ms)", "newest: PROPFIND series ms", "", None),
    ("newest patient: GET instance, median (ms)", "newest: GET instance ms", "", None),
    ("`ls -l by-patients/` via the mount (ms; grows by design)", "ls -l by-patients/ ms", "", None),
    ("`ls -l by-studies/` via the mount (ms; grows by design)", "ls -l by-studies/ ms", "", None),
    ("PROPFIND `by-patients/` (ms; grows by design)", "PROPFIND by-patients/ ms", "", None),
    ("PROPFIND `by-uids/` (ms; grows by design)", "PROPFIND by-uids/ ms", "", None),
    ("`dicomfs stats` (s, process start included)", "stats s", "", None),
    ("`dicomfs check --no-hash` (s)", "check --no-hash s", "", None),
    ("`dicomfs check --no-hash` peak RSS (MB)", "check --no-hash RSS MB", "", None),
    ("`dicomfs check` with hashes (s)", "check s", "", None),
    ("mount RSS once started (MB, VmHWM)", "mount RSS at start MB", "", None),
    ("bridge RSS once started (MB, VmHWM)", "bridge RSS at start MB", "", None),
    ("mount RSS after the requests (MB, VmHWM)", "mount RSS after requests MB", "", None),
    ("bridge RSS after the requests (MB, VmHWM)", "bridge RSS after requests MB", "", None),
    ("mount peak RSS after the walk (MB, VmHWM)", "mount peak RSS MB", "rss", RSS_LIMIT_MB),
    ("bridge peak RSS after the walk (MB, VmHWM)", "bridge peak RSS MB", "rss", RSS_LIMIT_MB),
    ("mount RSS after the walk: anonymous (MB, RssAnon)", "mount RSS anon MB", "", None),
    ("mount RSS after the walk: mapped files, the LMDB map (MB, RssFile+RssShmem)", "mount RSS file MB", "", None),
    ("bridge RSS after the walk: anonymous (MB, RssAnon)", "bridge RSS anon MB", "", None),
    ("bridge RSS after the walk: mapped files, the LMDB map (MB, RssFile+RssShmem)", "bridge RSS file MB", "", None),
]


def make_lines(steps: list[Step]) -> list[Line]:
    return [Line(name, key, {s.instances: s.figures[key] for s in steps if key in s.figures}, kind, limit)
            for name, key, kind, limit in LINES]


def short(count: int) -> str:
    return f"{count // 1_000_000}M" if count % 1_000_000 == 0 else f"{count // 1000}k" if count % 1000 == 0 else f"{count:,}"


def figure(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"


def print_table(lines: list[Line], steps: list[int], notes: dict[int, dict[str, str]]) -> None:
    first, last = short(steps[0]), short(steps[-1])
    print("\n| measure | " + " | ".join(short(s) for s in steps) + f" | {last}/{first} | target | met? |")
    print("|---|" + "---:|" * len(steps) + "---:|---|---|")
    for line in lines:
        if not line.values:
            continue
        cells = " | ".join(figure(line.values.get(s)) for s in steps)
        ratio = line.ratio
        met = "-" if line.passed is None else ("PASS" if line.passed else "FAIL")
        print(f"| {line.name} | {cells} | {'-' if ratio is None else f'{ratio:.2f}x'} | {line.target} | {met} |")
    checks = [line for line in lines if line.kind and line.values]
    failed = sum(line.passed is not True for line in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} targets met.")
    print("\nOther processes' CPU (and steal) while each timed figure was taken:")
    for count in steps:
        shown = {key: note for key, note in notes.get(count, {}).items()
                 if key in ("ingest files/s", "ls -l series ms", "PROPFIND study ms", "GET instance ms", "check --no-hash s")}
        print(f"- {short(count)}: " + "; ".join(f"{key}: {note}" for key, note in shown.items())
              + f"; caches {notes.get(count, {}).get('caches', '?')}")


def parse_steps(text: str) -> list[int]:
    steps = sorted({int(part.replace("_", "").replace("k", "000").replace("M", "000000")) for part in text.split(",")})
    return steps


def main() -> int:
    parser = options(__doc__.splitlines()[0] if __doc__ else None,
                     "steps of 2k, 10k and 40k instances (the last 2k timed): the same table in at most two minutes")
    parser.add_argument("--steps", metavar="N,N,...", help="archive sizes to measure at, each a multiple of 10,000 "
                        "(--quick: 2,000); e.g. 10k,100k (default 10k,100k,1M)")
    parser.add_argument("--drop-caches", action="store_true", help="drop the kernel's caches before starting the mount "
                        "and the bridge at each step (disturbs whatever else runs on the machine)")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    measured, fill = (MEASURED_QUICK, FILL_QUICK) if args.quick else (MEASURED_FULL, FILL_FULL)
    steps = parse_steps(args.steps) if args.steps else list(QUICK_STEPS if args.quick else FULL_STEPS)
    if any(s < measured or s % measured for s in steps):
        parser.error(f"every step must be a multiple of {measured:,}")
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("needs /dev/fuse and fusermount3 (apt install fuse3)", file=sys.stderr)
        return 2
    workdir = work_folder(parser, args, "scale")
    machine: dict[str, object] = {
        "nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
        "pydicom": pydicom.__version__, "dicomfs": shlex.join(command), "workdir": str(workdir), "quick": args.quick,
        "steps": steps, "measured_chunk": measured,
        "shape": f"patients of {STUDIES_PER_PATIENT} studies x {SERIES_PER_STUDY} series x {PER_SERIES} instances"}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    config = workdir / "dicomfs.toml"
    config.write_text('[storage]\ncompression = "none"\n')
    cli = Cli(command, workdir / "store", config)
    sources = source_root(workdir)
    machine["sources"] = str(sources)
    result: list[Step] = []
    started = time.perf_counter()
    status = 0
    with Others(workdir) as others:
        try:
            cli.run("init")
            run = Run(cli, workdir, others, drop=args.drop_caches,
                      full_check_up_to=steps[-1] if args.quick else FULL_CHECK_UP_TO)
            result = grow(run, Generator(), sources, steps, measured, fill, machine)
        except (CannotRun, subprocess.SubprocessError, OSError) as error:
            print(f"cannot run: {error}", file=sys.stderr, flush=True)
            status = 2
        finally:
            shutil.rmtree(sources, ignore_errors=True)
            release(workdir, keep=args.keep)
    machine["others"] = others.summary()
    lines = make_lines(result)
    done_steps = [s.instances for s in result]

    def report(_: object) -> None:
        print(f"\nOther processes: {machine['others']}.")
        print_table(lines, done_steps, {s.instances: s.notes for s in result})

    return finish(args, machine, lines if result else [], status, started, report)


if __name__ == "__main__":
    sys.exit(main())
