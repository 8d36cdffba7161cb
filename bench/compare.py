"""Side by side with Orthanc: ingest, browsing, large GET, litmus and storage of dicomfs and of
Debian's Orthanc, measured in one run, on one machine, with one corpus, each on a fresh store.

Run from the repository, as root (Orthanc lives in a private network namespace; one section
mounts the store with FUSE)::

    .venv/bin/python bench/compare.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]
                                      [--doc FILE]

**Where things run.** Every Orthanc is Debian's ``orthanc`` started by ``tests/orthanc_server.py``
in a network namespace that has only loopback, with that fixture's configuration (no
authentication, 10 HTTP threads, no compression unless said, WebDAV at ``/webdav/`` with uploads
allowed, both on by default in 1.10). Every Orthanc is fresh: new storage and SQLite index. The
dicomfs WebDAV bridge (``dicomfs --store S --config C webdav --bind 127.0.0.1:0``) runs *inside
the same namespace* (``nsenter``), and so does every client: litmus and the REST client as
commands run with ``nsenter``, the Python timing code (``http.client``) in the fixture's
namespace thread (``in_namespace``). So both servers are reached the same way, over the same
loopback. Every dicomfs store is fresh and uncompressed unless said (``[storage] compression``),
made and filled with the real command line. After each dicomfs upload path the disk is let
settle (``settle_the_disk``: those paths delete what they stored, which slows the next ~30 s of
file creations on ext4 without a journal, whoever creates them). Sources are read once before
each timed ingest (page cache) and ``sync`` runs. MB means 10^6 bytes.

**The corpus** is made by ``../shared/corpus/make_corpus.py`` (24 patients x 2 studies x 2
series x 25 instances of 64x64 = 2,400 small instances, ``--large 50``: 50 CT of 512x512 16-bit,
~0.5 MB, and one 100-frame secondary capture of ~52 MB; seed 1; ``--quick``: 4 patients x 2 x
2 x 15 = 240 small, 5 large and the big one). Without ``../shared/corpus`` the same shape comes
from :func:`dicomfs.samples.write_corpus` plus the 96-frame 50 MB instance of ``bench/webdav.py``,
and the output says so.

1. **Ingest** of the whole corpus, files/s from the start until every file is stored:
   ``dicomfs ingest DIR --quiet`` (command start to end); WebDAV PUT of every file (read into
   memory first) into the bridge's ``uploads/`` with 1 and with 4 keep-alive connections, until
   ``STORE/uploads/`` is empty and ``dicomfs stats`` counts them all (``bench/webdav.py``'s
   ``put_until_ingested``); ``cp -r`` of the corpus folders into ``MOUNT/uploads/`` of a fresh
   ``dicomfs mount``, until the same. Against Orthanc: ``POST /instances`` of each file by
   ``bench/export.py``'s stdlib client with 1 and 4 connections (command start to end; each
   answer comes once the instance is stored); and PUT of the same in-memory files into
   ``/webdav/uploads/`` with 1 and 4 connections, until ``/statistics`` counts every instance
   (Python's client sends no ``Expect: 100-continue``, which Orthanc never answers). Each path
   runs 2 rounds (``--quick``: 1), fresh stores every time; the best round counts. Beside the
   bridge, the same PUTs go to ``bench/bare_webdav.py``, a cheroot server with the bridge's settings
   that only writes each body to a file: the floor under any cheroot server, without a target; and
   the same ``cp -r`` goes into ``bench/bare_fuse.py --writable``, a pyfuse3 file system that only
   writes the files to a folder: the floor under any pyfuse3 mount. Targets: each
   dicomfs path >= 3x Orthanc's WebDAV (the faster of its 1- and 4-connection runs; WebDAV
   against WebDAV with the same connections) and >= 2x Orthanc's REST with 4 connections.
2. **Browsing** a fresh pair of archives of 2,000 then 20,000 patients (``--quick``: 200 then
   2,000), one tiny instance each (8x8 CT, ~1 kB: one template from
   :func:`dicomfs.samples.make_instance` stamped with each patient's IDs and UIDs, since
   generating 20,000 one-instance series takes minutes), filled with ``dicomfs ingest`` and with
   ``POST /instances`` over 4 connections; the second size adds to the first. At each size:
   PROPFIND Depth 1 of ``by-patients/``, of one patient's study folder and GET of its instance
   (paths found by walking ``by-patients/`` on each server), with the six named properties of
   ``bench/webdav.py`` (resourcetype, getcontentlength, getlastmodified, getetag, creationdate,
   displayname), on one keep-alive connection per server (made again when Orthanc closes it
   after 1 s idle, with the clock restarted). The first request after filling is printed as
   "cold"; then rounds alternating the servers, 11 of the ``by-patients/`` listing and 41 of the
   others, whose ~1 ms needs more samples (``--quick``: 5 and 15); the median counts. Targets:
   each <= 1x Orthanc's time at 2,000 patients; and flat: dicomfs's study-folder PROPFIND and GET
   at 20,000 patients <= 1.25x its own at 2,000, its ``by-patients/`` listing <= 1.25x its own
   per patient listed. Orthanc's growth is shown the same way, without a target. The flat figures
   of dicomfs come from as many rounds again of dicomfs alone, Orthanc idle, run right after the
   alternated ones: what dicomfs is compared with there is itself, and alternated rounds put each
   of its requests just after one of Orthanc's, which grows 20x from 2,000 to 20,000 patients.
3. **Large GET** of the big instance from ``by-uids/<study>/<series>/<sop>.dcm`` (the bridge over
   the store of the first ``dicomfs ingest``; Orthanc's ``/webdav/by-uids/...`` over the Orthanc
   of the first 4-connection REST ingest), ``http.client`` in 1 MiB ``readinto`` calls, a new
   connection per GET, one untimed GET first, best of 7 (``--quick``: 3), alternating. No target.
4. **litmus** (``litmus -k``, every group) on each ``uploads/`` folder of a fresh store and a fresh
   Orthanc, run while the corpus is written (it tests behaviour, not speed; Orthanc's ``http``
   group waits 30 s for a 100-continue that never comes). Tests passed per group; no target.
5. **Storage**: bytes allocated on disk (like ``du``) after ingesting the corpus: the whole store
   folder (blobs and LMDB index) of ``dicomfs ingest`` with compression none, zlib and zstd,
   against Orthanc's storage and index folders with ``StorageCompression`` false and true (its
   zlib), both filled by ``POST /instances`` over 4 connections. No target.

The table shows each figure, Orthanc's and the ratio dicomfs / Orthanc (times: dicomfs's time /
Orthanc's), with the machine and versions above it. Other processes' CPU use is sampled from
``/proc`` every second (processes that are neither this run's descendants nor name its work
folder; kernel threads left out) and printed for every measurement with the CPU time the
hypervisor stole: figures taken while the two came to a quarter of a core or more are flagged
as contended. ``--doc FILE`` also writes the report into FILE between the markers ``<!--
bench/compare.py quick|full: begin/end -->`` (added at the end the first time), leaving the
rest of the file alone.

The targets are printed as PASS/FAIL; the exit status is 0 whatever they say, since this is a
measurement, and 2 only when it cannot run. Every Orthanc is stopped (and its namespace holder
killed) by the fixture's ``finally`` blocks, every bridge with SIGTERM, every mount undone
(``dicomfs umount``, else ``fusermount3 -u -z``); every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import pydicom
import webdav as dav
from _shared import CannotRun, Row, dicomfs_command, finish, options, print_report, progress, settle_the_disk, work_folder
from export import REFERENCE_CLIENT, stored_count, timed
from fuse import Dicomfs as Cli
from fuse import bare_mounted, files_in, release, warm
from ingest import disk_usage
from ingest import ingest as timed_ingest

from dicomfs.samples import Corpus, SampleFile, make_instance, write_corpus, write_instance

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from tests.orthanc_server import Orthanc

SHARED_CORPUS = REPO.parent / "shared" / "corpus" / "make_corpus.py"
BARE_WEBDAV = Path(__file__).with_name("bare_webdav.py")
INGEST_VS_WEBDAV = 3.0
INGEST_VS_REST = 2.0
BROWSE_VS_ORTHANC = 1.0
FLAT = 1.25
CONTENDED = 0.25  # cores used by other processes during a measurement
SHORT, LONG = 120, 900  # subprocess and wait timeouts, seconds
PROPFIND = {"Depth": "1", "Content-Type": 'application/xml; charset="utf-8"'}
PROPFIND_BODY = dav.PROPFIND_BODIES["6 named props"]
_RESPONSE = re.compile(rb"<(?:[A-Za-z0-9_]+:)?response[\s>]")
_HREF = re.compile(rb"<(?:[A-Za-z0-9_]+:)?href>([^<]*)</")
_LITMUS = re.compile(r"<- summary for `(\w+)': of (\d+) tests run: (\d+) passed")


# -- other processes ------------------------------------------------------------------------------


class Others:
    """CPU time of the processes that are not this run's, sampled from /proc every second, and the
    time the hypervisor gave our CPUs to other machines (steal, from /proc/stat).

    Ours: this process's descendants (Orthanc, bridges, litmus, ingest workers) and anything whose
    command line names the work folder (the mount daemon, which detaches). Kernel threads are
    left out (their work is partly ours: writeback). A foreign process that lives less than a
    second is missed.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = str(workdir).encode()
        self.ours: set[int] = {os.getpid()}
        self.theirs: set[int] = set()
        self.last: dict[int, int] = {}
        self.ticks = 0
        self.windows: list[tuple[str, float, float]] = []  # label, seconds, others' CPU + steal seconds
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Others:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        stats: dict[int, tuple[int, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
                except (OSError, IndexError, ValueError):
                    continue
        with self._lock:
            for pid, (_, cpu) in stats.items():
                if pid not in self.ours and pid not in self.theirs:
                    self._classify(pid, stats)
                if pid in self.theirs:
                    before = self.last.get(pid)
                    self.ticks += cpu - before if before is not None else (cpu if self.last else 0)
            self.last = {pid: cpu for pid, (_, cpu) in stats.items()}

    def _classify(self, pid: int, stats: dict[int, tuple[int, int]]) -> None:
        chain, current = [], pid
        while current in stats and current > 2 and current not in self.ours:
            chain.append(current)
            current = stats[current][0]
        if current == 2 or pid == 2:
            return  # a kernel thread: neither
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = self.workdir in f.read()
        except OSError:
            named = False
        (self.ours if current in self.ours or named else self.theirs).update(chain or [pid])

    @staticmethod
    def _steal() -> int:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        return int(fields[8]) if len(fields) > 8 else 0

    @contextlib.contextmanager
    def window(self, label: str) -> Iterator[None]:
        """Note the CPU others (and the hypervisor's steal) take while the block runs."""
        self.sample()
        ticks, steal, started = self.ticks, self._steal(), time.perf_counter()
        yield
        self.sample()
        seconds, hertz = time.perf_counter() - started, os.sysconf("SC_CLK_TCK")
        others, stolen = (self.ticks - ticks) / hertz / seconds, (self._steal() - steal) / hertz / seconds
        self.windows.append((label, seconds, (others + stolen) * seconds))
        self.notes.append(f"others {others:.2f} cores, steal {stolen:.2f}"
                          + (" CONTENDED" if others + stolen >= CONTENDED else ""))

    def last_note(self) -> str:
        return self.notes[-1]

    def summary(self) -> str:
        if not self.windows:
            return "no measurement taken"
        total = sum(s for _, s, _ in self.windows)
        cpu = sum(c for _, _, c in self.windows)
        busy = [(label, c / s) for label, s, c in self.windows if s > 0 and c / s >= CONTENDED]
        text = (f"other processes and steal took {cpu / total:.2f} cores on average during the {len(self.windows)} "
                "measurements")
        if busy:
            text += "; contended (>= 0.25 cores): " + ", ".join(f"{label} ({cores:.2f})" for label, cores in busy)
        else:
            text += "; none contended (>= 0.25 cores)"
        return text


# -- data -----------------------------------------------------------------------------------------


def make_main_corpus(workdir: Path, *, quick: bool) -> tuple[Corpus, str]:
    """The corpus of sections 1, 3 and 5, and a line saying what and where from."""
    patients, per_series, large = (4, 15, 5) if quick else (24, 25, 50)
    shape = (f"{patients} patients x 2 studies x 2 series x {per_series} instances (64x64) = "
             f"{patients * 4 * per_series:,} small, {large} of 512x512 16-bit (~0.5 MB) and one of ~50 MB")
    if SHARED_CORPUS.is_file():
        folder = workdir / "corpus"
        done = subprocess.run([sys.executable, str(SHARED_CORPUS), str(folder), "--patients", str(patients),
                               "--studies-per-patient", "2", "--series-per-study", "2", "--instances-per-series",
                               str(per_series), "--large", str(large), "--seed", "1"],
                              capture_output=True, text=True, timeout=LONG)
        if done.returncode:
            raise CannotRun(f"make_corpus.py exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        manifest = folder.parent / "manifest.json"  # out of the corpus: every file left is DICOM
        (folder / "manifest.json").rename(manifest)
        entries = json.loads(manifest.read_text())["files"]
        files = tuple(SampleFile(folder / e["path"], True, "", e["PatientID"], e["StudyInstanceUID"],
                                 e["SeriesInstanceUID"], e["SOPInstanceUID"], e["size"])
                      for e in entries if e["kind"] == "instance")
        return Corpus(folder, files), f"../shared/corpus/make_corpus.py (seed 1): {shape}"
    folder = workdir / "corpus"
    grid = write_corpus(folder / "grid", patients=patients, studies_per_patient=2, series_per_study=2,
                        instances_per_series=per_series, pixels=64, large=large, seed=1)
    big = dav.write_big_instance(folder / "big")
    files = (*grid.files, SampleFile(big.path, True, "", "BIG", big.study_uid, big.series_uid, big.sop_uid, big.size))
    return Corpus(folder, files), (f"../shared/corpus is absent: dicomfs.samples.write_corpus with the same shape "
                                   f"({shape}; the big one: 96 frames from bench/webdav.py)")


BROWSE_ROOT = "1.2.826.0.1.3680043.8.498.77"


def browse_id(number: int) -> str:
    return f"BRW{number:07d}"


def write_browse_sets(workdir: Path, sizes: tuple[int, int]) -> list[list[Path]]:
    """One tiny instance per patient, patients 1..sizes[0] then up to sizes[1], in two folders.

    One template is encoded once; each file is the template with its placeholders (PatientID,
    PatientName and the three UIDs, all of fixed length) replaced, so writing is cheap.
    """
    stamp = 1_000_000  # + the patient's number: 7 digits, no leading zero (a UID component may have none)
    placeholders = {"id": browse_id(0), "name": f"BROWSE^{stamp}", "study": f"{BROWSE_ROOT}.1.{stamp}",
                    "series": f"{BROWSE_ROOT}.2.{stamp}", "sop": f"{BROWSE_ROOT}.3.{stamp}"}
    ds = make_instance(patient_id=placeholders["id"], patient_name=placeholders["name"],
                       study_uid=placeholders["study"], series_uid=placeholders["series"], sop_uid=placeholders["sop"],
                       modality="CT", study_description="BROWSE", series_description="ONE", rows=8, columns=8, seed=3)
    template_path = workdir / "browse-template.dcm"
    write_instance(template_path, ds)
    template = template_path.read_bytes()
    sets: list[list[Path]] = []
    first = 1
    for number, last in enumerate(sizes):
        folder = workdir / f"browse-{number + 1}"
        folder.mkdir()
        paths = []
        for n in range(first, last + 1):
            data = template
            for key, old in placeholders.items():
                new = old[:-7] + str(stamp + n) if key != "id" else browse_id(n)
                data = data.replace(old.encode(), new.encode())
            path = folder / f"{n:07d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        sets.append(paths)
        first = last + 1
    return sets


# -- servers and clients --------------------------------------------------------------------------


def endpoint(server: Orthanc, workdir: Path) -> dav.Server:
    """Orthanc as the ``bench/webdav.py`` helpers see a server (a name, a URL, connections)."""
    end = dav.Server("orthanc", [], workdir)
    end.url = server.url + "/"
    return end


class Client:
    """One keep-alive connection to a server, made again (the clock restarted) when the server has
    closed it: Orthanc closes connections idle for 1 s. Used from the namespace thread."""

    def __init__(self, server: dav.Server) -> None:
        self.server = server
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[float, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = self.server.connection()
            started = time.perf_counter()
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            seconds = time.perf_counter() - started
            if response.status not in (200, 207):
                raise CannotRun(f"{self.server.name}: {method} {path}: HTTP {response.status}: {data[:300]!r}")
            return seconds, data
        raise AssertionError("unreachable")

    def listing(self, path: str) -> tuple[float, list[tuple[str, bool]]]:
        """PROPFIND Depth 1: the seconds and the children (href, is a folder), the folder itself left out."""
        seconds, data = self.request("PROPFIND", path, PROPFIND_BODY, PROPFIND)
        children = []
        for block in _RESPONSE.split(data)[1:]:
            found = _HREF.search(block)
            if found is None:
                continue
            href = quote(unquote(urlsplit(found.group(1).decode()).path), safe="/")
            if unquote(href).rstrip("/") != unquote(path).rstrip("/"):
                folder = b"collection" in block
                children.append((href.rstrip("/") + "/" if folder else href, folder))
        return seconds, children

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def litmus(server: Orthanc, url: str, folder: Path) -> dict[str, tuple[int, int]]:
    """``litmus -k URL`` in the namespace; {group: (tests run, passed)}; its logs stay in ``folder``."""
    folder.mkdir(parents=True)
    done = server.run(["litmus", "-k", url], capture_output=True, text=True, timeout=LONG, cwd=folder)
    (folder / "litmus.out").write_text(done.stdout + done.stderr)
    return {group: (int(run), int(passed)) for group, run, passed in _LITMUS.findall(done.stdout)}


@dataclass
class Ingested:
    seconds: float
    note: str = ""


class Bench:
    """The run's shared state: the command, the work folder, fresh Orthancs, stores and bridges."""

    def __init__(self, command: list[str], workdir: Path, others: Others, *, quick: bool) -> None:
        self.command, self.workdir, self.others, self.quick = command, workdir, others, quick
        self.count = 0
        (workdir / "reference_client.py").write_text(REFERENCE_CLIENT)

    def orthanc(self, label: str, **config: Any) -> contextlib.AbstractContextManager[Orthanc]:
        from tests.orthanc_server import orthanc

        self.count += 1
        return orthanc(self.workdir / "orthanc" / f"{self.count:02d}-{label}", extra_config=config or None)

    def store(self, label: str, compression: str = "none") -> Cli:
        self.count += 1
        config = self.workdir / f"{compression}.toml"
        config.write_text(f'[storage]\ncompression = "{compression}"\n')
        cli = Cli(self.command, self.workdir / "stores" / f"{self.count:02d}-{label}", config)
        cli.store.parent.mkdir(exist_ok=True)
        cli.run("init")
        return cli

    @contextlib.contextmanager
    def bridge(self, server: Orthanc, cli: Cli) -> Iterator[dav.Server]:
        """``dicomfs webdav`` over ``cli``'s store, inside ``server``'s namespace, for the block."""
        bridge = dav.Server(f"bridge-{cli.store.name}", server.nsenter(cli.argv("webdav", "--bind", "127.0.0.1:0")),
                            self.workdir, env=cli.env)
        try:
            yield bridge.start()
        finally:
            bridge.stop()
            errors = [line for line in bridge.stderr().splitlines() if "ERROR" in line or "Traceback" in line]
            if errors:
                progress(f"  the bridge logged {len(errors)} error line(s), first: {errors[0][:300]}")

    def rest(self, server: Orthanc, paths: list[Path], clients: int) -> float:
        """POST /instances of every file with ``clients`` connections (command start to end)."""
        listing = self.workdir / "listing.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        before = stored_count(server)
        done, seconds, *_ = timed(server, [sys.executable, str(self.workdir / "reference_client.py"),
                                                             "rest", str(server.http_port), str(clients), "1",
                                                             str(listing)])
        stored = stored_count(server) - before
        if done.returncode or stored != len(paths):
            raise CannotRun(f"POST /instances x {clients}: exit {done.returncode}, {stored} of {len(paths)} stored: "
                            f"{(done.stdout + done.stderr).strip()[-1000:]}")
        return seconds


# -- 1. ingest ------------------------------------------------------------------------------------


def ingest_round(bench: Bench, corpus: Corpus, files: list[tuple[str, bytes]], stack: contextlib.ExitStack,
                 host: Orthanc | None) -> tuple[dict[str, Ingested], Orthanc, Cli]:
    """Every ingest path once, fresh stores, alternating dicomfs and Orthanc; returns the results,
    the Orthanc whose namespace the bridges run in (``host``; when None, this round's 4-connection
    REST Orthanc, which then stays until ``stack`` closes) and this round's ``dicomfs ingest`` store."""
    count, paths = len(corpus.files), [f.path for f in corpus.files]
    results: dict[str, Ingested] = {}
    others = bench.others

    def settle() -> None:
        """After a dicomfs upload path: it deletes each file once stored, and on these disks (ext4
        without a journal) the next ~30 s of file creations pay for it (``settle_the_disk``),
        whichever path is measured next. Only after those: in a slow phase of the machine a
        creation stays above the probe's bar anyway, and waiting before every path added 35 s each."""
        said = settle_the_disk(bench.workdir, most_seconds=35.0)
        if "without a journal" in said and "after waiting 0 s" not in said:
            progress(f"  {said}")

    def note(key: str, seconds: float, extra: str = "") -> None:
        results[key] = Ingested(seconds, f"{extra}; {others.last_note()}".lstrip("; "))
        progress(f"  {key:<26} {seconds:7.2f} s = {count / seconds:6.0f} files/s  {results[key].note}")

    config = bench.workdir / "none.toml"
    config.write_text('[storage]\ncompression = "none"\n')
    bench.count += 1
    store = bench.workdir / "stores" / f"{bench.count:02d}-ingest"
    store.parent.mkdir(exist_ok=True)
    with others.window("dicomfs ingest"):
        run = timed_ingest(bench.command, config, "corpus", corpus, store)
    if run.exit_status:
        raise CannotRun(f"dicomfs ingest exited {run.exit_status}")
    note("dicomfs ingest", run.seconds, f"peak RSS {run.peak_rss_mb:.0f} MB")
    ingest_cli = Cli(bench.command, store, config)

    main_server = host
    for clients in (4, 1):
        warm(corpus)
        with contextlib.ExitStack() as this_run:
            kept = main_server is None and clients == 4
            server = (stack if kept else this_run).enter_context(bench.orthanc(f"rest-c{clients}"))
            main_server = server if kept else main_server
            with others.window(f"Orthanc REST x{clients}"):
                seconds = bench.rest(server, paths, clients)
        note(f"Orthanc REST x{clients}", seconds)
    assert main_server is not None

    for clients in (1, 4):
        cli = bench.store(f"webdav-c{clients}")
        warm(corpus)
        with bench.bridge(main_server, cli) as bridge, others.window(f"dicomfs WebDAV x{clients}"):
            ingested, puts, spawned = main_server.in_namespace(dav.put_until_ingested, bridge, cli, files, clients)
        note(f"dicomfs WebDAV x{clients}", ingested, f"PUTs alone {puts:.2f} s, {spawned} ingest processes")
        settle()
        warm(corpus)
        with bare_webdav(bench, main_server) as (bare, folder), others.window(f"bare cheroot PUT x{clients}"):
            seconds = main_server.in_namespace(dav.put_all, bare, "/uploads/", files, clients)
        if files_in(folder) != count:
            raise CannotRun(f"PUT into the bare cheroot server left {files_in(folder)} files, not {count}")
        note(f"bare cheroot PUT x{clients}", seconds, "nothing ingested")
        warm(corpus)
        with bench.orthanc(f"webdav-c{clients}") as server, others.window(f"Orthanc WebDAV x{clients}"):
            started = time.perf_counter()
            server.in_namespace(dav.put_all, endpoint(server, bench.workdir), "/webdav/uploads/", files, clients)
            puts = time.perf_counter() - started
            deadline = time.monotonic() + LONG
            while (stored := stored_count(server)) < count:
                if time.monotonic() > deadline:
                    raise CannotRun(f"Orthanc WebDAV x{clients}: {stored} of {count} stored after {LONG} s")
                time.sleep(0.01)
            seconds = time.perf_counter() - started
        note(f"Orthanc WebDAV x{clients}", seconds, f"PUTs alone {puts:.2f} s")

    cli = bench.store("fuse")
    mountpoint = bench.workdir / "mnt"
    with cli.mounted(mountpoint):
        warm(corpus)
        with others.window("dicomfs FUSE cp -r"):
            started = time.perf_counter()
            subprocess.run(["cp", "-r", *map(str, sorted(corpus.root.iterdir())), str(mountpoint / "uploads")],
                           check=True, timeout=LONG)
            copied = time.perf_counter() - started
            deadline = time.monotonic() + LONG
            while True:  # the clock stops when uploads/ is seen empty; `dicomfs stats` then confirms
                seen_empty = time.perf_counter()
                if not files_in(cli.store / "uploads") and cli.instances() >= count:
                    break
                if time.monotonic() > deadline:
                    raise CannotRun(f"FUSE: {files_in(cli.store / 'uploads')} files still in uploads/ after {LONG} s")
                time.sleep(0.02)
            seconds = seen_empty - started
    note("dicomfs FUSE cp -r", seconds, f"cp alone {copied:.2f} s")
    settle()
    bench.count += 1
    staging = bench.workdir / "bare-fuse" / f"{bench.count:02d}"
    staging.mkdir(parents=True)
    with bare_mounted(staging, bench.workdir / "mnt-bare", writable=True) as bare:
        warm(corpus)
        with others.window("bare pyfuse3 cp -r"):
            started = time.perf_counter()
            subprocess.run(["cp", "-r", *map(str, sorted(corpus.root.iterdir())), str(bare)], check=True, timeout=LONG)
            seconds = time.perf_counter() - started
    if files_in(staging) != count:
        raise CannotRun(f"cp -r into the bare pyfuse3 file system left {files_in(staging)} files, not {count}")
    note("bare pyfuse3 cp -r", seconds, "nothing ingested")
    settle()  # for what comes next: the next round, or the browsing archives
    return results, main_server, ingest_cli


@contextlib.contextmanager
def bare_webdav(bench: Bench, host: Orthanc) -> Iterator[tuple[dav.Server, Path]]:
    """``bench/bare_webdav.py`` in ``host``'s namespace, as the bridges run, over a new folder."""
    bench.count += 1
    folder = bench.workdir / "bare-webdav" / f"{bench.count:02d}"
    server = dav.Server(f"bare-webdav-{bench.count:02d}", host.nsenter([sys.executable, str(BARE_WEBDAV), str(folder)]),
                        bench.workdir)
    try:
        yield server.start(), folder
    finally:
        server.stop()


def ingest_rows(results: list[dict[str, Ingested]], count: int, size: int) -> list[Row]:
    best = {key: min(r[key].seconds for r in results) for key in results[0]}
    rate = {key: count / seconds for key, seconds in best.items()}
    orthanc_webdav = max(rate["Orthanc WebDAV x1"], rate["Orthanc WebDAV x4"])
    of = f" (best of {len(results)})" if len(results) > 1 else ""

    def detail(key: str) -> dict[str, object]:
        return {"seconds": [r[key].seconds for r in results], "notes": [r[key].note for r in results],
                "files": count, "bytes": size, "mb_per_second": size / 1e6 / best[key]}

    rows = [Row("ingest", f"`dicomfs ingest` vs Orthanc REST POST /instances, 4 connections{of}", rate["dicomfs ingest"],
                "files/s", rate["Orthanc REST x4"], limit=INGEST_VS_REST, detail=detail("dicomfs ingest")),
            Row("ingest", "  the same vs Orthanc WebDAV uploads/ (its faster of 1 and 4 connections)",
                rate["dicomfs ingest"], "files/s", orthanc_webdav, limit=INGEST_VS_WEBDAV),
            Row("ingest", "  the same vs Orthanc REST, 1 connection", rate["dicomfs ingest"], "files/s",
                rate["Orthanc REST x1"], detail={"orthanc": detail("Orthanc REST x1"),
                                                 "orthanc_x4": detail("Orthanc REST x4")})]
    for clients in (1, 4):
        key = f"dicomfs WebDAV x{clients}"
        rows.append(Row("ingest", f"WebDAV PUT into uploads/ until ingested, {clients} connection{'s' * (clients > 1)}: "
                        f"dicomfs vs Orthanc{of}", rate[key], "files/s", rate[f"Orthanc WebDAV x{clients}"],
                        limit=INGEST_VS_WEBDAV, detail={"dicomfs": detail(key),
                                                        "orthanc": detail(f"Orthanc WebDAV x{clients}")}))
        rows.append(Row("ingest", "  the same dicomfs figure vs Orthanc REST, 4 connections", rate[key], "files/s",
                        rate["Orthanc REST x4"], limit=INGEST_VS_REST))
        floor = f"bare cheroot PUT x{clients}"
        rows.append(Row("ingest", f"  PUT into a bare cheroot server (the floor: files written, nothing ingested) vs "
                        f"Orthanc WebDAV, {clients} connection{'s' * (clients > 1)}", rate[floor], "files/s",
                        rate[f"Orthanc WebDAV x{clients}"], detail=detail(floor)))
        rows.append(Row("ingest", "  dicomfs WebDAV PUT until ingested vs that floor", rate[key], "files/s", rate[floor]))
    key = "dicomfs FUSE cp -r"
    rows.append(Row("ingest", f"FUSE `cp -r` into uploads/ until ingested vs Orthanc WebDAV (its faster){of}", rate[key],
                    "files/s", orthanc_webdav, limit=INGEST_VS_WEBDAV, detail=detail(key)))
    rows.append(Row("ingest", "  the same vs Orthanc REST, 4 connections", rate[key], "files/s", rate["Orthanc REST x4"],
                    limit=INGEST_VS_REST))
    floor = "bare pyfuse3 cp -r"
    rows.append(Row("ingest", "  `cp -r` into a bare pyfuse3 file system (the floor: files written, nothing ingested) vs "
                    "Orthanc WebDAV (its faster)", rate[floor], "files/s", orthanc_webdav, detail=detail(floor)))
    rows.append(Row("ingest", "  dicomfs FUSE `cp -r` until ingested vs that floor", rate[key], "files/s", rate[floor]))
    return rows


# -- 2. browsing ----------------------------------------------------------------------------------


Measure = tuple[str, str, bytes | None, dict[str, str] | None]  # label, method, body, headers


def browse_paths(client: Client, prefix: str, patient_id: str) -> tuple[float, dict[str, str]]:
    """Walk by-patients/ to ``patient_id``'s study folder and its first instance; the first
    listing's seconds (cold) and the paths."""
    by_patients = f"{prefix}by-patients/"
    cold, patients = client.listing(by_patients)
    patient = next((href for href, folder in patients if folder and patient_id in unquote(href)), None)
    if patient is None:
        raise CannotRun(f"{client.server.name}: no {patient_id} among {len(patients)} entries of {by_patients}")
    study = next(href for href, folder in client.listing(patient)[1] if folder)
    series = next(href for href, folder in client.listing(study)[1] if folder)
    instance = next(href for href, folder in client.listing(series)[1] if not folder and href.endswith(".dcm"))
    return cold, {"by-patients": by_patients, "study": study, "get": instance, "patients_listed": str(len(patients))}


def browse_once(bridge: dav.Server, orthanc: dav.Server, patient_id: str,
                rounds: dict[str, int]) -> dict[str, dict[str, Any]]:
    """In the namespace: each measure on both servers, alternating; {side: {measure: seconds list, ...}}."""
    sides = {"dicomfs": (Client(bridge), "/"), "orthanc": (Client(orthanc), "/webdav/")}
    found: dict[str, dict[str, Any]] = {}
    try:
        for side, (client, prefix) in sides.items():
            cold, paths = browse_paths(client, prefix, patient_id)
            found[side] = {"paths": paths, "cold_ms": cold * 1000}
        for measure in ("by-patients", "study", "get"):
            calls = []
            for side, (client, _) in sides.items():
                path = found[side]["paths"][measure]
                if measure == "get":
                    calls.append(lambda c=client, p=path: c.request("GET", p)[0])
                else:
                    calls.append(lambda c=client, p=path: c.listing(p)[0])
            mine, theirs = dav.alternate(rounds[measure], *calls)
            found["dicomfs"][measure], found["orthanc"][measure] = mine, theirs
            # dicomfs against itself at two sizes: rounds of its own, Orthanc idle. Alternated, each
            # request of ours follows one of Orthanc's, which at 20,000 patients takes 20x longer
            # than at 2,000 (95 ms for a study folder), so ours meet a busier machine at one size
            # only: a study folder took 1.3 ms alternated and 0.6 ms alone at 20,000, 0.9 and 0.8
            # ms at 2,000 (docs/benchmarks.md).
            found["dicomfs"][f"{measure} alone"] = [calls[0]() for _ in range(rounds[measure])]
    finally:
        for client, _ in sides.values():
            client.close()
    return found


def measure_browse(bench: Bench, sizes: tuple[int, int], rows: list[Row]) -> None:
    started = time.perf_counter()
    sets = write_browse_sets(bench.workdir, sizes)
    progress(f"browsing: {sizes[0]:,} then {sizes[1]:,} one-instance patients written in "
             f"{time.perf_counter() - started:.1f} s")
    listing, cheap = (5, 15) if bench.quick else (11, 41)
    rounds = {"by-patients": listing, "study": cheap, "get": cheap}
    patient_id = browse_id(sizes[0] // 2)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    cli = bench.store("browse")
    with bench.orthanc("browse") as server, bench.bridge(server, cli) as bridge:
        orthanc = endpoint(server, bench.workdir)
        for size, paths in zip(sizes, sets, strict=True):
            started = time.perf_counter()
            cli.run("ingest", "--quiet", str(paths[0].parent), timeout=LONG)
            ours = time.perf_counter() - started
            theirs = bench.rest(server, paths, 4)
            if cli.instances() != size or stored_count(server) != size:
                raise CannotRun(f"browse archives: dicomfs {cli.instances()}, Orthanc {stored_count(server)}, not {size}")
            progress(f"  {size:,} patients: filled in {ours:.1f} s (dicomfs ingest) and {theirs:.1f} s (Orthanc REST x4)")
            with bench.others.window(f"browsing at {size:,} patients"):
                results[size] = server.in_namespace(browse_once, bridge, orthanc, patient_id, rounds)
            for side in ("dicomfs", "orthanc"):
                r = results[size][side]
                progress(f"  {size:,} patients, {side:<7}: by-patients/ cold {r['cold_ms']:.1f} ms, then "
                         + ", ".join(f"{m} {statistics.median(r[m]) * 1000:.1f} ms" for m in r if m not in ("paths", "cold_ms"))
                         + f" (medians); {r['paths']['patients_listed']} entries")
            progress(f"  {bench.others.last_note()}")
    rows += browse_rows(results, sizes, rounds)


def browse_rows(results: dict[int, dict[str, dict[str, Any]]], sizes: tuple[int, int],
                rounds: dict[str, int]) -> list[Row]:
    names = {"by-patients": "PROPFIND Depth 1 by-patients/", "study": "PROPFIND Depth 1 of a study folder",
             "get": "GET of one small instance (by-patients path)"}
    small, large = sizes

    def ms(size: int, side: str, measure: str) -> float:
        return float(statistics.median(results[size][side][measure])) * 1000

    def detail(size: int, measure: str) -> dict[str, object]:
        return {side: {"ms": [s * 1000 for s in results[size][side][measure]], "cold_ms": results[size][side]["cold_ms"],
                       "path": results[size][side]["paths"][measure]} for side in ("dicomfs", "orthanc")}

    rows = []
    for size in sizes:
        for measure, name in names.items():
            rows.append(Row("browse", f"{name}, {size:,} patients (median of {rounds[measure]})",
                            ms(size, "dicomfs", measure), "ms", ms(size, "orthanc", measure), higher_is_better=False,
                            limit=BROWSE_VS_ORTHANC if size == small else None, detail=detail(size, measure)))
    scale = large / small
    for side, who in (("dicomfs", "dicomfs"), ("orthanc", "Orthanc (both columns Orthanc)")):
        limit = FLAT if side == "dicomfs" else None
        how, alone = (", in rounds of its own", " alone") if side == "dicomfs" else ("", "")
        rows.append(Row("flat", f"flat? {who}: by-patients/ per {small:,} patients listed, at {large:,} (left) vs at "
                        f"{small:,}{how}", ms(large, side, "by-patients" + alone) / scale, "ms",
                        ms(small, side, "by-patients" + alone), higher_is_better=False, limit=limit))
        for measure in ("study", "get"):
            rows.append(Row("flat", f"flat? {who}: {names[measure]}, at {large:,} patients (left) vs at {small:,}{how}",
                            ms(large, side, measure + alone), "ms", ms(small, side, measure + alone),
                            higher_is_better=False, limit=limit))
    return rows


# -- 3. large GET ---------------------------------------------------------------------------------


def measure_large_get(bench: Bench, server: Orthanc, cli: Cli, big: SampleFile) -> list[Row]:
    rounds = 3 if bench.quick else 7
    path = dav.dav_path("by-uids", big.study_uid, big.series_uid, f"{big.sop_uid}.dcm")
    orthanc = endpoint(server, bench.workdir)

    def once(target: dav.Server, where: str) -> float:
        with contextlib.closing(target.connection()) as conn:
            return dav.get_once(target, where, big.size, conn)

    with bench.bridge(server, cli) as bridge:
        def both() -> tuple[list[float], list[float]]:
            once(bridge, path)
            once(orthanc, "/webdav" + path)
            return dav.alternate(rounds, lambda: once(bridge, path), lambda: once(orthanc, "/webdav" + path))

        with bench.others.window("large GET"):
            mine, theirs = server.in_namespace(both)
    mb = big.size / 1e6
    progress(f"large GET {mb:.1f} MB: dicomfs " + " ".join(f"{mb / s:.0f}" for s in mine) + " MB/s | Orthanc "
             + " ".join(f"{mb / s:.0f}" for s in theirs) + f" MB/s; {bench.others.last_note()}")
    return [Row("get", f"GET of the {mb:.0f} MB instance over WebDAV, by-uids/ (best of {rounds})", mb / min(mine), "MB/s",
                mb / min(theirs), detail={"dicomfs_mbps": [mb / s for s in mine], "orthanc_mbps": [mb / s for s in theirs],
                                          "bytes": big.size})]


# -- 5. storage -----------------------------------------------------------------------------------


def measure_storage(bench: Bench, corpus: Corpus, main_server: Orthanc, ingest_cli: Cli) -> list[Row]:
    ours = {"none": disk_usage(ingest_cli.store)}
    for compression in ("zlib", "zstd"):
        cli = bench.store(f"storage-{compression}", compression)
        warm(corpus)
        cli.run("ingest", "--quiet", str(corpus.root), timeout=LONG)
        ours[compression] = disk_usage(cli.store)

    def orthanc_bytes(server: Orthanc) -> int:
        root = server.config_path.parent
        return disk_usage(root / "storage") + disk_usage(root / "index")

    theirs = {"none": orthanc_bytes(main_server)}
    warm(corpus)
    with bench.orthanc("zlib", StorageCompression=True) as server:
        started = time.perf_counter()
        bench.rest(server, [f.path for f in corpus.files], 4)
        progress(f"  Orthanc REST x4 with StorageCompression: {time.perf_counter() - started:.2f} s")
        theirs["zlib"] = orthanc_bytes(server)
    source = sum(f.size for f in corpus.files)
    progress("storage: corpus " + f"{source / 1e6:.1f} MB; dicomfs " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in ours.items())
             + "; Orthanc " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in theirs.items()))
    detail = {"corpus_bytes": source, "corpus_allocated": disk_usage(corpus.root), "dicomfs": ours, "orthanc": theirs}
    return [Row("storage", f"bytes on disk, uncompressed (store with its index; the corpus: {source / 1e6:.0f} MB)",
                ours["none"] / 1e6, "MB", theirs["none"] / 1e6, higher_is_better=False, detail=detail),
            Row("storage", "bytes on disk, dicomfs zlib vs Orthanc zlib (StorageCompression)", ours["zlib"] / 1e6, "MB",
                theirs["zlib"] / 1e6, higher_is_better=False),
            Row("storage", "bytes on disk, dicomfs zstd vs Orthanc zlib", ours["zstd"] / 1e6, "MB", theirs["zlib"] / 1e6,
                higher_is_better=False)]


# -- the run --------------------------------------------------------------------------------------


LITMUS_GROUPS = ("basic", "copymove", "props", "locks", "http")  # litmus's default $TESTS, in its order


@contextlib.contextmanager
def litmus_running(bench: Bench) -> Iterator[Callable[[], list[Row]]]:
    """litmus on a fresh store's and a fresh Orthanc's uploads/, in a thread, while the block runs;
    yields the function that waits for it and makes the rows. Leaving the block waits for litmus,
    then stops the bridge and Orthanc."""
    found: dict[str, dict[str, tuple[int, int]]] = {}
    failed: list[Exception] = []
    with bench.orthanc("litmus") as server, bench.bridge(server, bench.store("litmus")) as bridge:
        def run() -> None:
            try:
                found["dicomfs"] = litmus(server, f"{bridge.url}uploads/", bench.workdir / "litmus-dicomfs")
                found["orthanc"] = litmus(server, f"{server.url}/webdav/uploads/", bench.workdir / "litmus-orthanc")
            except Exception as error:  # handed to the waiting thread
                failed.append(error)

        thread = threading.Thread(target=run, daemon=True)

        def rows() -> list[Row]:
            thread.join(LONG)
            if failed or thread.is_alive():
                raise CannotRun(f"litmus: {failed[0] if failed else f'still running after {LONG} s'}")
            made = []
            for group in LITMUS_GROUPS:
                ours, theirs = found["dicomfs"].get(group, (0, 0)), found["orthanc"].get(group, (0, 0))
                made.append(Row("litmus", f"litmus `{group}`: tests passed (dicomfs of {ours[0]} run, Orthanc of "
                                f"{theirs[0]})", ours[1], "tests", theirs[1], detail={"dicomfs": ours, "orthanc": theirs}))
            progress("litmus (run, passed): " + "; ".join(f"{g} dicomfs {r.detail['dicomfs']} Orthanc {r.detail['orthanc']}"
                                                          for g, r in zip(LITMUS_GROUPS, made, strict=True)))
            return made

        thread.start()
        try:
            yield rows
        finally:
            thread.join(LONG)


def measure(bench: Bench, rows: list[Row], machine: dict[str, object]) -> None:
    """Append each section's rows to ``rows`` as it ends."""
    try:
        from tests.orthanc_server import ORTHANC_BINARY
    except ImportError as error:
        raise CannotRun(f"cannot import tests.orthanc_server (run from the repository): {error}") from None
    missing = [tool for tool in (ORTHANC_BINARY, "litmus", "nsenter", "fusermount3") if not shutil.which(tool)]
    if missing or not os.path.exists("/dev/fuse"):
        raise CannotRun(f"missing: {', '.join(missing) or '/dev/fuse'} (scripts/setup installs them)")
    with litmus_running(bench) as litmus_rows:
        started = time.perf_counter()
        corpus, origin = make_main_corpus(bench.workdir, quick=bench.quick)
        size = sum(f.size for f in corpus.files)
        machine["corpus"] = f"{origin}; {len(corpus.files):,} files, {size / 1e6:.1f} MB"
        progress(f"corpus: {machine['corpus']}, written in {time.perf_counter() - started:.1f} s")
        rows_of_litmus = litmus_rows()
    with contextlib.ExitStack() as stack:
        files = dav.upload_files(corpus)
        rounds = 1 if bench.quick else 2
        results = []
        main_server, ingest_cli = None, None
        for number in range(rounds):
            progress(f"ingest, round {number + 1} of {rounds}:")
            result, main_server, store = ingest_round(bench, corpus, files, stack, main_server)
            results.append(result)
            ingest_cli = ingest_cli or store  # the first round's, beside the first round's kept Orthanc
        rows += ingest_rows(results, len(corpus.files), size)
        assert main_server is not None and ingest_cli is not None
        big = max(corpus.files, key=lambda f: f.size)
        storage_rows = measure_storage(bench, corpus, main_server, ingest_cli)
        get_rows = measure_large_get(bench, main_server, ingest_cli, big)
    measure_browse(bench, (200, 2_000) if bench.quick else (2_000, 20_000), rows)
    rows += get_rows + rows_of_litmus + storage_rows


# -- report ---------------------------------------------------------------------------------------


def machine_facts(command: list[str], workdir: Path, quick: bool) -> dict[str, object]:
    def first(path: str, key: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    def output(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=SHORT).stdout.strip()
        return "?"

    import cheroot
    import wsgidav

    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    # What was measured: the commit, and any uncommitted change to the product (not to bench/ or docs)
    changed = [line[3:] for line in output("git", "-C", str(REPO), "status", "--porcelain").splitlines()
               if line[3:].startswith(("dicomfs/", "bridge/"))]
    revision = output("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    revision += f" with uncommitted changes to {', '.join(changed)}" if changed else " (no uncommitted product change)"
    versions = output("dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "orthanc", "orthanc-dicomweb", "litmus")
    return {"cpu": f"{os.cpu_count()} x {first('/proc/cpuinfo', 'model name')}",
            "memory": first("/proc/meminfo", "MemTotal"), "kernel": platform.release(), "debian": debian,
            "disk": " ".join(output("findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)).split()),
            "python": platform.python_version(), "dicomfs": f"{output(*command, '--version')} at {revision}",
            "packages": versions.replace("\n", ", "), "pydicom": pydicom.__version__, "wsgidav": wsgidav.__version__,
            "cheroot": cheroot.__version__, "command": shlex.join(["bench/compare.py", *sys.argv[1:]]),
            "workdir": str(workdir), "quick": quick}


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = options(__doc__.splitlines()[0] if __doc__ else None,
                     "240 small + 6 large instances, browsing at 200 and 2,000 patients, one ingest round: "
                     "the same table in at most two minutes")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    workdir = work_folder(parser, args, "compare")
    machine = machine_facts(command, workdir, args.quick)
    machine["disk"] = f"{machine['disk']} ({args.disk_settled})"
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    rows: list[Row] = []
    report = io.StringIO()
    started = time.perf_counter()
    status = 0
    try:
        import pytest

        skipped: type[BaseException] = pytest.skip.Exception
    except ImportError:
        skipped = CannotRun
    with Others(workdir) as others:
        try:
            measure(Bench(command, workdir, others, quick=args.quick), rows, machine)
        except (CannotRun, subprocess.SubprocessError, OSError, RuntimeError, skipped) as error:
            print(f"cannot run: {error}", file=sys.stderr, flush=True)
            status = 2
        finally:
            release(workdir, keep=args.keep)
    machine["others"] = others.summary()

    def report_both(shown: list[Row]) -> None:
        with contextlib.redirect_stdout(report):
            print("\n" + "\n".join(f"- {key}: {machine[key]}" for key in (
                "cpu", "memory", "kernel", "debian", "disk", "python", "dicomfs", "packages", "pydicom", "wsgidav",
                "cheroot", "corpus", "others") if key in machine))
            print("\nThe reference is Orthanc, measured in the same run; ratio = dicomfs / Orthanc (for times, dicomfs's "
                  "time / Orthanc's). The `flat?` rows compare one server with itself at two archive sizes.")
            print_report(shown)
        print(report.getvalue(), end="", flush=True)

    return finish(args, machine, rows, status, started, report_both)


if __name__ == "__main__":
    sys.exit(main())
