"""Export benchmark: ``dicomfs export`` (STOW-RS) into a real Orthanc, against Orthanc's own ingest
of the same files through its REST API, in the same run.

Run from the repository, as root (the archive lives in a private network namespace)::

    .venv/bin/python bench/export.py [--quick] [--rounds N] [--workdir DIR] [--keep] [--json FILE]
                                     [--dicomfs CMD] [--profile DIR]

The archive is Debian's Orthanc with its DICOMweb plugin, started by ``tests/orthanc_server.py``
in a network namespace that has only loopback; **every run gets a fresh Orthanc** (new storage and
SQLite index, nothing stored yet), so no run pays for what an earlier one left behind. Storage
folders are deleted only at the end (ext4 slows new files down for a while after a big delete).
Orthanc has the fixture's configuration: no authentication, 10 HTTP threads, no compression.

The data comes from :mod:`dicomfs.samples`, ingested with the real command line into one
uncompressed store (``dicomfs --store S --config C.toml init | ingest --quiet DIR``):

- **small**: 2,000 instances (20 patients x 2 studies x 2 series x 25, 64x64 pixels, ~10 kB;
  ``--quick``: 8 patients, 800), sent 16 per request;
- **large**: 50 instances of 512x512 16-bit, 6 frames (~3.1 MB; ``--quick``: 20), sent 2 per
  request.

Each set is exported at concurrency 1 and 4 (``[destinations.orthanc]`` type ``stowrs``, ``url``,
``concurrency``, ``instances_per_request``; every other key at its default). The export is the
real command line run *inside* the namespace (``server.run``: ``nsenter ... dicomfs --store S
--config C export --to orthanc --wait SELECTOR...``, the PatientIDs of the set), timed by this
process from the command's start to its end: Python's start, the imports, opening the store,
making the job, sending, the ``--wait`` loop (woken by its runner as the job ends) and the exit
all count; nothing is subtracted. The job's own duration (``finished - started`` from ``dicomfs jobs show
JOB``) is the second figure, and the rest of the command's time is printed split in three:
start-up (command start to the job's ``created``), claim (``created`` to ``started``) and tail
(``finished`` to the command's end). MB/s counts the Part 10 bytes of the instances (10^6
bytes per MB).

The package's modules are byte-compiled first (``compileall``), as an installation has them: an
environment with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module edited since
its last ``.pyc`` at every start of the command.

The reference is Orthanc's ingest of the same files through its REST API, ``POST /instances``
with one file's raw bytes per request, by a small stdlib-only Python script run in the namespace
the same way and timed the same way, start to end: sequentially (one client) and with 4 parallel
clients (threads taking files from one shared queue), each with one keep-alive connection,
reading each file when it sends it. Its own time (first request to last answer) is the second
reference figure. Also measured, without a target: the same script as a bare STOW-RS client (the
export's batches, multipart bodies, keep-alive), which tells Orthanc's STOW-RS cost apart from
the exporter's: the table compares it with the export and with the REST reference (what STOW-RS
itself costs Orthanc, whoever sends), and gives Orthanc's CPU seconds per run (median) for each
side. After every run Orthanc's ``/statistics`` must count every instance (and the job
must have succeeded), else the benchmark stops. Before every run the store and the sources are
read once (page cache) and ``sync`` runs. Each (set, concurrency) is measured in ``--rounds``
rounds (5; ``--quick``: 2), the order of export / REST / bare STOW-RS rotating from round to
round; the table compares the best run of each side (all runs are printed as they go and kept in
the JSON): on a shared machine the same run varies by 2x and more from one round to the next.

Both sides are timed alike, twice: from their process's start to its end (the target's figure:
both include an interpreter's start, ours also the imports, the store and the job's creation),
and their sending alone (the job's ``finished - started``; the script's first request to last
answer). The table's "fixed cost" row is the difference of the two for each side: what the
command costs besides sending, against what the script costs besides sending.

Target: the exporter is never the bottleneck: its instances/s (small set) or MB/s (large set),
command start to end, >= 0.9x the REST reference's at the same concurrency. The other figures
(the job's own duration, the bare STOW-RS client, the CPU seconds of the client and of Orthanc)
are printed without targets. The machine's CPUs are shared by the client and Orthanc (and by
whatever else runs), so the CPU time each side used is printed for every run.

``--profile DIR`` runs each export under py-spy (``/work/perf/tools/bin/py-spy`` or on PATH,
``record --subprocesses --threads --format raw``), writing ``DIR/<set>-c<N>.txt`` (collapsed
stacks, the last round's); the figures of such a run are slowed by the sampling and not comparable.

The targets are printed as PASS/FAIL; the exit status is 0 whatever they say, since this is a
measurement, and 2 only when it cannot run. Every Orthanc is stopped (and its namespace holder
killed) by the fixture's ``finally`` blocks, and the end checks that none of this run's is left;
every subprocess has a timeout.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _shared import (  # noqa: E402
    CannotRun,
    Row,
    children_cpu,
    dicomfs_command,
    finish,
    options,
    print_report,
    process_cpu,
    progress,
    work_folder,
)
from _shared import Cli as Dicomfs  # noqa: E402
from _shared import py_spy as find_py_spy  # noqa: E402

from dicomfs.samples import make_instance, write_corpus, write_instance  # noqa: E402

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from tests.orthanc_server import Orthanc

EXPORT_VS_REFERENCE = 0.9
CONCURRENCIES = (1, 4)
SHORT, LONG = 120, 600  # subprocess timeouts, seconds
CHUNK = 1 << 20
_NAMESPACE = uuid.UUID("5d0e2b9c-6a41-4c57-b7a3-0f1e9c2d4b88")

# The reference client: stdlib only, so its start costs what a bare interpreter costs. ``rest``
# POSTs each file to /instances; ``stow`` POSTs batches to /dicom-web/studies as multipart/related.
# Each of CLIENTS threads keeps one keep-alive connection and takes the next batch from a shared
# iterator. Prints one JSON line: its own seconds (first request to last answer) and counts.
REFERENCE_CLIENT = r"""
import http.client, json, secrets, sys, threading, time

mode, port, clients, per_request, listing = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with open(listing) as f:
    paths = [line for line in f.read().split("\n") if line]
if mode == "rest":
    per_request = 1
batches = iter([paths[i:i + per_request] for i in range(0, len(paths), per_request)])
lock = threading.Lock()
errors, stored = [], [0]


def request(conn, batch):
    if mode == "rest":
        with open(batch[0], "rb") as f:
            body = f.read()
        conn.request("POST", "/instances", body=body, headers={"Content-Type": "application/dicom"})
    else:
        boundary = "ref-" + secrets.token_hex(16)
        parts = []
        for path in batch:
            with open(path, "rb") as f:
                data = f.read()
            parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {len(data)}\r\n\r\n".encode())
            parts.append(data)
            parts.append(b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        conn.request("POST", "/dicom-web/studies", body=b"".join(parts), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
    response = conn.getresponse()
    return response.status, response.read()


def check(batch, status, answer):
    if status != 200:
        return f"HTTP {status}: {answer[:300]!r}"
    if mode == "rest":
        result = json.loads(answer)
        return "" if result.get("Status") == "Success" else f"not stored: {answer[:300]!r}"
    result = json.loads(answer)
    referenced = (result.get("00081199") or {}).get("Value") or []
    failed = (result.get("00081198") or {}).get("Value") or []
    if len(referenced) != len(batch) or failed:
        return f"{len(referenced)} of {len(batch)} referenced, {len(failed)} failed"
    return ""


def client():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        while True:
            with lock:
                batch = next(batches, None)
            if batch is None or errors:
                return
            try:
                status, answer = request(conn, batch)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()  # Orthanc closes keep-alive connections idle for 1 s: once more, anew
                status, answer = request(conn, batch)
            problem = check(batch, status, answer)
            if problem:
                errors.append(problem)
                return
            with lock:
                stored[0] += len(batch)
    except Exception as error:
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        conn.close()


threads = [threading.Thread(target=client) for _ in range(clients)]
started = time.perf_counter()
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "stored": stored[0], "errors": errors[:3]}))
sys.exit(1 if errors else 0)
"""


@dataclass(frozen=True)
class Set:
    """One set of instances to export, with its batching."""

    name: str
    label: str
    selectors: tuple[str, ...]
    paths: tuple[Path, ...]
    sizes: int  # bytes in all
    per_request: int
    unit: str  # the unit of the row with the target

    @property
    def count(self) -> int:
        return len(self.paths)


@dataclass
class Measured:
    """One timed run: seconds from the command's start to its end, and the second figure."""

    seconds: float
    own_seconds: float
    cpu_seconds: float  # the client's user + system time
    orthanc_cpu_seconds: float
    extra: dict[str, object] = field(default_factory=dict)


# -- data -----------------------------------------------------------------------------------------


def _uid(*parts: object) -> str:
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(map(str, parts))).int}"


def write_large(folder: Path, count: int, frames: int) -> list[Path]:
    """``count`` instances of one series: 512x512 16-bit, ``frames`` frames each."""
    folder.mkdir(parents=True)
    study_uid, series_uid = _uid("large", "study"), _uid("large", "series")
    paths = []
    for number in range(1, count + 1):
        ds = make_instance(patient_id="LARGE", patient_name="LARGE^EXPORT", study_uid=study_uid,
                           series_uid=series_uid, sop_uid=_uid("large", number), modality="CT", rows=512,
                           columns=512, frames=frames, instance_number=number, study_description="EXPORT BENCH",
                           series_description=f"512x512x{frames}", seed=number)
        path = folder / f"IM{number:04d}.dcm"
        write_instance(path, ds)
        paths.append(path)
    return paths


def read_all(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(CHUNK):
                pass


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _, names in os.walk(folder) for name in names]


# -- processes ------------------------------------------------------------------------------------


def orthanc_pid(server: Orthanc) -> int | None:
    process = getattr(server, "_process", None)  # the fixture's Popen; setpriv and nsenter exec Orthanc
    return getattr(process, "pid", None)


def timed(server: Orthanc, argv: list[str],
          env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float, float, float, float, float]:
    """Run ``argv`` in the namespace; (result, wall seconds, its CPU seconds, Orthanc's CPU seconds,
    wall-clock time at the start and at the end)."""
    pid = orthanc_pid(server)
    cpu, orthanc_cpu = children_cpu(), process_cpu(pid)
    began = time.time()
    started = time.perf_counter()
    done: subprocess.CompletedProcess[str] = server.run(argv, capture_output=True, text=True, timeout=LONG, env=env)
    seconds = time.perf_counter() - started
    ended = time.time()
    return done, seconds, children_cpu() - cpu, process_cpu(pid) - orthanc_cpu, began, ended


def stored_count(server: Orthanc) -> int:
    status, body = server.rest("GET", "/statistics")
    if status != 200:
        raise CannotRun(f"Orthanc GET /statistics: HTTP {status}: {body[:300]!r}")
    return int(json.loads(body)["CountInstances"])


# -- runs -----------------------------------------------------------------------------------------


class Bench:
    def __init__(self, cli: Dicomfs, workdir: Path, py_spy: str | None, profile: Path | None) -> None:
        self.cli, self.workdir, self.py_spy, self.profile = cli, workdir, py_spy, profile
        self.runs = 0

    def fresh_orthanc(self, label: str) -> AbstractContextManager[Orthanc]:
        from tests.orthanc_server import orthanc

        self.runs += 1
        return orthanc(self.workdir / "orthanc" / f"{self.runs:02d}-{label}")

    def warm(self, data: Set) -> None:
        read_all(files_under(self.cli.store))
        read_all(list(data.paths))
        os.sync()

    def export(self, data: Set, concurrency: int) -> Measured:
        self.warm(data)
        with self.fresh_orthanc(f"export-{data.name}-c{concurrency}") as server:
            config = self.workdir / f"export-{data.name}-c{concurrency}.toml"
            config.write_text(
                '[storage]\ncompression = "none"\n\n[destinations.orthanc]\ntype = "stowrs"\n'
                f'url = "{server.dicomweb_url}"\nconcurrency = {concurrency}\n'
                f"instances_per_request = {data.per_request}\n")
            argv = self.cli.argv("export", "--to", "orthanc", "--wait", *data.selectors, config=config)
            if self.py_spy and self.profile is not None:
                out = self.profile / f"{data.name}-c{concurrency}"
                argv = [self.py_spy, "record", "--subprocesses", "--threads", "--rate", "250", "--format", "raw",
                        "--output", f"{out}.txt", "--", *argv]
            done, seconds, cpu, orthanc_cpu, began, ended = timed(server, argv, env={**self.cli.env,
                                                                                     "DICOMFS_CONFIG": str(config)})
            if done.returncode != 0:
                raise CannotRun(f"dicomfs export exited {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}")
            found = re.search(r"^job (\S+): ", done.stdout, re.M)
            if found is None:
                raise CannotRun(f"dicomfs export printed no job id: {done.stdout.strip()[-2000:]}")
            job_id = found.group(1)
            stored = stored_count(server)
        shown = json.loads(self.cli.run("jobs", "show", job_id).stdout)
        if shown["state"] != "success" or shown["done_items"] != data.count or stored != data.count:
            raise CannotRun(f"export {data.name} c{concurrency}: job {shown['state']}, {shown['done_items']} of "
                            f"{data.count} sent, Orthanc holds {stored}: {shown.get('last_error')}")
        created, run_from, run_to = (float(shown[key]) for key in ("created", "started", "finished"))
        # Where the command's time went besides the job: start-up until the job was made, the
        # wait until the runner claimed it, and from the job's end to the command's exit.
        split = {"startup": created - began, "claim": run_from - created, "tail": ended - run_to}
        return Measured(seconds, run_to - run_from, cpu, orthanc_cpu, {"job": job_id, **split})

    def reference(self, data: Set, concurrency: int, mode: str) -> Measured:
        self.warm(data)
        script = self.workdir / "reference_client.py"
        listing = self.workdir / f"{data.name}.txt"
        with self.fresh_orthanc(f"{mode}-{data.name}-c{concurrency}") as server:
            argv = [sys.executable, str(script), mode, str(server.http_port), str(concurrency),
                    str(data.per_request), str(listing)]
            done, seconds, cpu, orthanc_cpu, _, _ = timed(server, argv)
            stored = stored_count(server)
        try:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {}
        if done.returncode != 0 or result.get("stored") != data.count or stored != data.count:
            raise CannotRun(f"reference {mode} {data.name} c{concurrency} exited {done.returncode}, Orthanc holds "
                            f"{stored} of {data.count}: {result.get('errors') or done.stderr.strip()[-2000:]}")
        return Measured(seconds, float(result["seconds"]), cpu, orthanc_cpu)


def rates(data: Set, seconds: float) -> tuple[float, float]:
    return data.count / seconds, data.sizes / 1e6 / seconds


KINDS = ("export", "rest", "stow")
KIND_NAMES = {"export": "dicomfs export", "rest": "REST reference", "stow": "bare STOW-RS"}


def measure_set(bench: Bench, data: Set, rounds: int) -> list[Row]:
    rows: list[Row] = []
    for position, concurrency in enumerate(CONCURRENCIES):
        where = f"{data.label}, concurrency {concurrency}"
        progress(f"{where}: load {_load()}")
        runs: dict[str, list[Measured]] = {kind: [] for kind in KINDS}
        for number in range(rounds):
            # Rotate which kind goes first, so all meet the same drift of the machine.
            shift = (number + position) % len(KINDS)
            for kind in KINDS[shift:] + KINDS[:shift]:
                m = bench.export(data, concurrency) if kind == "export" else bench.reference(data, concurrency, kind)
                runs[kind].append(m)
                per_second, mbps = rates(data, m.seconds)
                split = ""
                if kind == "export":
                    split = (f"; start-up {m.extra['startup']:.2f} s, claim {m.extra['claim']:.2f} s, "
                             f"tail {m.extra['tail']:.2f} s")
                progress(f"  {where}: {KIND_NAMES[kind]:<14} {m.seconds:6.2f} s = {per_second:6.0f} inst/s "
                         f"{mbps:6.1f} MB/s (own {m.own_seconds:6.2f} s; CPU client {m.cpu_seconds:5.2f} s, Orthanc "
                         f"{m.orthanc_cpu_seconds:5.2f} s{split})")
        best = {kind: min(measured, key=lambda m: m.seconds) for kind, measured in runs.items()}
        own = {kind: min(m.own_seconds for m in measured) for kind, measured in runs.items()}
        detail = {**{kind: [asdict(m) for m in measured] for kind, measured in runs.items()},
                  "instances": data.count, "bytes": data.sizes, "instances_per_request": data.per_request,
                  "concurrency": concurrency, "rounds": rounds}
        primary = data.unit == "inst/s"
        other_unit = "MB/s" if primary else "inst/s"

        def rate(seconds: float, unit: str) -> float:
            per_second, mbps = rates(data, seconds)
            return per_second if unit == "inst/s" else mbps

        ours, rest, stow = (best[kind].seconds for kind in KINDS)
        of = f" (best of {rounds})" if rounds > 1 else ""
        rows.append(Row(data.name, f"export {where}: command start to end{of}", rate(ours, data.unit), data.unit,
                        rate(rest, data.unit), limit=EXPORT_VS_REFERENCE, detail=detail))
        rows.append(Row(data.name, f"  the same in {other_unit}", rate(ours, other_unit), other_unit,
                        rate(rest, other_unit)))
        rows.append(Row(data.name, "  sending alone: the job's finished - started vs the script's first request to last answer",
                        rate(own["export"], data.unit), data.unit, rate(own["rest"], data.unit)))
        fixed = {kind: min(m.seconds - m.own_seconds for m in measured) for kind, measured in runs.items()}
        rows.append(Row(data.name, "  fixed cost besides sending (start-up, claim, tail vs the script's start and exit)",
                        fixed["export"] * 1000, "ms", fixed["rest"] * 1000, higher_is_better=False))
        rows.append(Row(data.name, "  export vs a bare STOW-RS client (same batches), start to end",
                        rate(ours, data.unit), data.unit, rate(stow, data.unit)))
        # What STOW-RS itself costs the archive against its REST ingest, whoever the client: the
        # ceiling any STOW-RS exporter meets. Orthanc's CPU is the median over the rounds.
        rows.append(Row(data.name, "  the protocol: a bare STOW-RS client vs the REST reference, start to end",
                        rate(stow, data.unit), data.unit, rate(rest, data.unit)))
        cpu = {kind: statistics.median(m.orthanc_cpu_seconds for m in measured) for kind, measured in runs.items()}
        rows.append(Row(data.name, "  Orthanc's CPU per run (median): receiving the export vs the REST reference",
                        cpu["export"] * 1000, "ms", cpu["rest"] * 1000, higher_is_better=False))
        rows.append(Row(data.name, "  Orthanc's CPU per run (median): receiving the bare STOW-RS client vs the REST reference",
                        cpu["stow"] * 1000, "ms", cpu["rest"] * 1000, higher_is_better=False))
    return rows


# -- the run --------------------------------------------------------------------------------------


def measure(command: list[str], workdir: Path, rows: list[Row], *, quick: bool, rounds: int | None,
            profile: Path | None, py_spy: str | None) -> None:
    """Write the data, fill the store, append each set's rows to ``rows`` as it ends."""
    try:
        from tests.orthanc_server import DICOMWEB_PLUGIN, ORTHANC_BINARY
    except ImportError as error:
        raise CannotRun(f"cannot import tests.orthanc_server (run from the repository): {error}") from None
    if not os.access(ORTHANC_BINARY, os.X_OK) or not os.path.exists(DICOMWEB_PLUGIN):
        raise CannotRun(f"Orthanc ({ORTHANC_BINARY}) or its DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed "
                        "(scripts/setup installs them)")
    started = time.perf_counter()
    patients, large_count, frames = (8, 20, 6) if quick else (20, 50, 6)
    rounds = rounds or (2 if quick else 5)
    small = write_corpus(workdir / "src" / "small", patients=patients, studies_per_patient=2, series_per_study=2,
                         instances_per_series=25, pixels=64, seed=31)
    large = write_large(workdir / "src" / "large", large_count, frames)
    sets = [
        Set("small", f"{len(small.files):,} small (~{sum(f.size for f in small.files) / len(small.files) / 1e3:.0f} kB), "
            "16/request", tuple(sorted({f.patient_id for f in small.files})), tuple(f.path for f in small.files),
            sum(f.size for f in small.files), 16, "inst/s"),
        Set("large", f"{len(large)} large (~{sum(p.stat().st_size for p in large) / len(large) / 1e6:.1f} MB), 2/request",
            ("LARGE",), tuple(large), sum(p.stat().st_size for p in large), 2, "MB/s"),
    ]
    progress(f"data: {sets[0].count} small instances ({sets[0].sizes / 1e6:.1f} MB), {sets[1].count} large "
             f"({sets[1].sizes / 1e6:.1f} MB), written in {time.perf_counter() - started:.1f} s")

    # As an installation has them: without .pyc files (PYTHONDONTWRITEBYTECODE=1 in the environment,
    # or modules edited since they were last imported) every module compiles again at every start
    # of the command, 40 ms and more, while the reference's stdlib modules have theirs.
    compiled = subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "dicomfs"), str(REPO / "bridge")],
                              capture_output=True, text=True, timeout=SHORT)
    if compiled.returncode != 0:
        raise CannotRun(f"compileall failed: {(compiled.stdout + compiled.stderr).strip()[-2000:]}")

    config = workdir / "dicomfs.toml"
    config.write_text('[storage]\ncompression = "none"\n')
    cli = Dicomfs(command, workdir / "store", config)
    cli.run("init")
    started = time.perf_counter()
    cli.run("ingest", "--quiet", str(workdir / "src"), timeout=LONG)
    stored = int(json.loads(cli.run("stats", "--json").stdout)["instances"])
    if stored != sum(s.count for s in sets):
        raise CannotRun(f"the store holds {stored} instances, expected {sum(s.count for s in sets)}")
    progress(f"  ingested {stored} instances in {time.perf_counter() - started:.1f} s")
    (workdir / "reference_client.py").write_text(REFERENCE_CLIENT)
    for data in sets:
        (workdir / f"{data.name}.txt").write_text("".join(f"{p}\n" for p in data.paths))

    bench = Bench(cli, workdir, py_spy, profile)
    for data in sets:
        rows += measure_set(bench, data, rounds)


# -- report ---------------------------------------------------------------------------------------


def leftover_orthancs(workdir: Path) -> list[str]:
    """Orthanc processes still running on this run's folders (others' Orthancs are not ours)."""
    done = subprocess.run(["pgrep", "-a", "Orthanc"], capture_output=True, text=True)
    return [line for line in done.stdout.strip().splitlines() if str(workdir) in line]


def _load() -> str:
    """The load averages (1, 5, 15 min): the machine is shared, and they say how much."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = options(__doc__.splitlines()[0] if __doc__ else None,
                     "800 small + 20 large instances instead of 2,000 + 50, two rounds instead of three",
                     profile="run each export under py-spy, stacks into DIR (slows the export: figures not comparable)")
    parser.add_argument("--rounds", type=int, metavar="N", help="rounds of each measurement (default 5; --quick: 2)")
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds wants 1 or more")
    command = dicomfs_command(parser, args)
    py_spy = find_py_spy(parser, args)
    workdir = work_folder(parser, args, "export")
    orthanc_version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "orthanc", "orthanc-dicomweb"],
                                     capture_output=True, text=True).stdout or "?"
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "pydicom": pydicom.__version__, "orthanc": orthanc_version, "dicomfs": shlex.join(command),
               "workdir": str(workdir), "quick": args.quick, "rounds": args.rounds or (2 if args.quick else 3),
               "profiled": bool(args.profile), "load": _load(), "disk": args.disk_settled}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    status = 0
    try:
        import pytest

        skipped: type[BaseException] = pytest.skip.Exception
    except ImportError:
        skipped = CannotRun
    try:
        measure(command, workdir, rows, quick=args.quick, rounds=args.rounds, profile=args.profile, py_spy=py_spy)
    except (CannotRun, subprocess.SubprocessError, OSError, RuntimeError, skipped) as error:
        print(f"cannot run: {error}", file=sys.stderr, flush=True)
        status = 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["load_at_end"] = _load()
    left = leftover_orthancs(workdir)
    if left:
        print(f"Orthanc processes still running: {left}", file=sys.stderr, flush=True)
    return finish(args, machine, rows, status, started, print_report)


if __name__ == "__main__":
    sys.exit(main())
