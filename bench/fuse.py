"""FUSE mount benchmark: reads, metadata walks and uploads through ``dicomfs mount``, each against a reference.

Run from the repository, as root (the walks drop the kernel caches)::

    .venv/bin/python bench/fuse.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]

Every store is made, filled and mounted with the real command line (``dicomfs --store S --config
C.toml init | ingest --quiet DIR | mount MOUNT --auto-unmount | umount MOUNT``, with
``DICOMFS_CONFIG`` set to the same file); every reference is measured in the same run, on the
same disk. Data comes from :func:`dicomfs.samples.write_corpus`. GB means 10^9 bytes.

1. **Reading.** 200 large instances (512x512 16-bit CT, ~0.5 MB each; ``--quick``: 40) go into
   one store per storage compression (none, zlib, zstd). The blob files are read once before
   mounting, so both sides read from the OS page cache. Right after mounting, every file under
   ``MOUNT/by-uids`` is read fully with 1 MiB reads ("first read": nothing of the mount is cached;
   the listing is walked before the clock starts), then the same again three times ("repeated
   read", served by the kernel's page cache of the mount; the median pass is reported). The
   reference is the blob files of the uncompressed store (byte-identical to the DICOM files)
   read the same way, median of three passes taken between the repeated passes.
   Targets: first read of the uncompressed store >= 1.0 GB/s; repeated read >= 0.8x direct.
   zlib and zstd are reported without targets.
2. **Metadata walks.** A store of 30,000 small instances (60 patients x 5 studies x 4 series x
   25 instances, 16x16 pixels; ``--quick``: 6 patients, 3,000) plus one series of 1,000
   instances. The mount's ``by-uids`` and ``by-patients`` trees are copied with ``cp -r`` to a
   plain folder on the same disk (the reference tree). ``find by-uids | wc -l`` and
   ``ls -lR by-patients > /dev/null`` run as subprocesses twice each on both sides: the first
   run right after a fresh mount (one mount per command) and after
   ``sync; echo 3 > /proc/sys/vm/drop_caches``, the second right after. ``ls -l`` of the
   1,000-instance series folder is timed the same way. Targets: first run <= 10x the plain
   tree, second run <= 2x; ``ls -l`` of the series < 100 ms (first and second run).
3. **Uploads.** 2,000 small instances (20 patients x 2 x 2 x 25, 64x64 pixels; also with
   ``--quick``) are copied with ``cp -r`` into ``MOUNT/uploads/`` of a fresh store; the clock
   stops when ``STORE/uploads/`` holds no file any more and ``dicomfs stats --json`` counts every
   instance. The reference is ``dicomfs ingest --quiet`` of the same folder into another fresh
   store. Sources are in the page cache for both. Target: >= 0.7x the files/s of the CLI.

**The pyfuse3 floor.** Each section also runs against ``bench/bare_fuse.py``: a pyfuse3 file
system with nothing of dicomfs in it, serving a plain folder from memory (the uncompressed store's
blob files; the plain reference tree; an empty folder for ``cp -r``, where nothing is ingested)
with dicomfs's timeouts, read path (mmap slices) and read-ahead. Its rows, and the dicomfs rows
compared with it, carry no target: they tell what pyfuse3, trio and the kernel cost per request
on this machine, below which no pyfuse3 file system goes, from what dicomfs adds.

The targets are printed as PASS/FAIL; the exit status is 0 whatever they say, since this is a
measurement, and 2 only when it cannot run. Every mount is undone in a ``finally`` (``dicomfs
umount``, else ``fusermount3 -u -z``) and every subprocess has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pydicom
from _shared import CannotRun, Cli, dicomfs_command, finish, options, progress, work_folder

from dicomfs.samples import Corpus, write_corpus

COMPRESSIONS = ("none", "zlib", "zstd")
FIRST_READ_GBPS = 1.0
REPEATED_VS_DIRECT = 0.8
WALK_FIRST_VS_PLAIN = 10.0
WALK_SECOND_VS_PLAIN = 2.0
SERIES_LS_MS = 100.0
UPLOAD_VS_CLI = 0.7
REPEATS = 3
CHUNK = 1 << 20
SHORT, LONG = 120, 3600  # subprocess timeouts, seconds


@dataclass
class Row:
    """One line of the report: a dicomfs figure and the reference it is compared with."""

    section: str
    name: str
    value: float
    unit: str  # "GB/s", "s", "ms" or "files/s"
    reference: float | None = None
    reference_name: str = ""
    higher_is_better: bool = True
    target: str = ""
    passed: bool | None = None
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """dicomfs / reference (rates) or dicomfs time / reference time (times)."""
        if self.reference is None or self.reference <= 0 or self.value != self.value:
            return None
        return self.value / self.reference


# -- command line and mounts ----------------------------------------------------------------------


class Dicomfs(Cli):
    """The dicomfs command line for one store and configuration file, and its mounts."""
    @contextlib.contextmanager
    def mounted(self, mountpoint: Path) -> Iterator[Path]:
        """Mount the store at ``mountpoint`` for the block; always unmounted afterwards."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        try:
            self.run("mount", str(mountpoint), "--auto-unmount", timeout=SHORT)
            if not os.path.ismount(mountpoint):
                raise CannotRun(f"dicomfs mount returned but {mountpoint} is not a mountpoint")
            yield mountpoint
        finally:
            self.unmount(mountpoint)

    def unmount(self, mountpoint: Path) -> None:
        daemons = daemon_pids(mountpoint)
        if os.path.ismount(mountpoint):
            try:
                done = self.run("umount", str(mountpoint), timeout=60, check=False)
                if done.returncode != 0:
                    print(f"  dicomfs umount {mountpoint}: {done.stderr.strip()}", file=sys.stderr, flush=True)
            except subprocess.TimeoutExpired:
                print(f"  dicomfs umount {mountpoint} timed out", file=sys.stderr, flush=True)
        _lazy_unmount(mountpoint)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in daemons) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in daemons:  # our own daemon, by its id, only if it outlived its mount
            if _alive(pid):
                print(f"  mount daemon {pid} still running 20 s after unmount: SIGTERM", file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


BARE = Path(__file__).with_name("bare_fuse.py")


@contextlib.contextmanager
def bare_mounted(source: Path, mountpoint: Path, *, writable: bool = False) -> Iterator[Path]:
    """``bench/bare_fuse.py`` serving ``source`` at ``mountpoint`` for the block, with dicomfs's
    read-ahead (1 MiB): the pyfuse3 floor the dicomfs figures are also compared with."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen([sys.executable, str(BARE), str(source), str(mountpoint),
                               *(["--writable"] if writable else [])], stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        if daemon.stdout.readline().strip() != "ready" or not os.path.ismount(mountpoint):
            raise CannotRun(f"bench/bare_fuse.py did not mount {source} at {mountpoint}")
        device = os.stat(mountpoint).st_dev
        Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").write_text("1024\n")
        yield mountpoint
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        _lazy_unmount(mountpoint)


def _lazy_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, timeout=60)


def daemon_pids(mountpoint: Path) -> list[int]:
    """The dicomfs mount daemon(s) serving ``mountpoint`` (their command line names it)."""
    wanted = str(mountpoint).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        if b"mount" in words and wanted in words and any(b"dicomfs" in w for w in words):
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def release(workdir: Path, *, keep: bool) -> None:
    """The end of a benchmark that mounts: unmount what is left under ``workdir``, then remove it
    unless ``keep`` (never while something is still mounted there)."""
    for mountpoint in mounts_under(workdir):
        print(f"still mounted: {mountpoint}; unmounting", file=sys.stderr, flush=True)
        _lazy_unmount(mountpoint)
    if not keep:
        if mounts_under(workdir):
            print(f"{workdir} still has mounts: not removed", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def mounts_under(folder: Path) -> list[Path]:
    """Mountpoints at or below ``folder``, from /proc/mounts."""
    prefix = str(folder.resolve())
    found = []
    with open("/proc/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


def new_store(command: list[str], workdir: Path, name: str, compression: str) -> Dicomfs:
    config = workdir / f"{name}.toml"
    config.write_text(f'[storage]\ncompression = "{compression}"\n')
    cli = Dicomfs(command, workdir / f"store-{name}", config)
    cli.run("init")
    return cli


# -- helpers --------------------------------------------------------------------------------------


def read_all(paths: list[Path]) -> int:
    """Read every file fully with 1 MiB reads; return the bytes read."""
    buffer = bytearray(CHUNK)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def timed_read(paths: list[Path]) -> tuple[float, int]:
    started = time.perf_counter()
    total = read_all(paths)
    return time.perf_counter() - started, total


def files_under(folder: Path) -> list[Path]:
    return sorted(Path(parent) / name for parent, _, names in os.walk(folder) for name in names)


def warm(corpus: Corpus) -> None:
    """Sources into the page cache, dirty pages of earlier steps to disk."""
    read_all([s.path for s in corpus.files])
    os.sync()


class Caches:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``, remembering whether it worked."""

    def __init__(self) -> None:
        self.dropped = True

    def drop(self) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as error:
            if self.dropped:
                print(f"  cannot drop the kernel caches ({error}): first runs may be warm", flush=True)
            self.dropped = False


def shell(command: str, timeout: float = LONG) -> tuple[float, str, int]:
    """Run ``sh -c command``; return its wall time, stdout and exit status."""
    started = time.perf_counter()
    done = subprocess.run(["sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - started
    if done.returncode:
        print(f"  `{command}` exited {done.returncode}: {done.stderr.strip()[-500:]}", flush=True)
    return seconds, done.stdout.strip(), done.returncode


# -- 1. reading -----------------------------------------------------------------------------------


def measure_reads(command: list[str], workdir: Path, *, quick: bool) -> list[Row]:
    started = time.perf_counter()
    large = write_corpus(workdir / "large", patients=0, large=40 if quick else 200, seed=1)
    size = sum(s.size for s in large.files)
    progress(f"reads: {len(large.files)} large instances, {size / 1e6:.0f} MB, written in "
             f"{time.perf_counter() - started:.1f} s")
    rows: list[Row] = []
    direct_blobs: list[Path] = []
    for compression in COMPRESSIONS:
        cli = new_store(command, workdir, f"read-{compression}", compression)
        warm(large)
        cli.run("ingest", "--quiet", str(large.root), timeout=LONG)
        blobs = files_under(cli.store / "blobs")
        if len(blobs) != len(large.files):
            raise CannotRun(f"{compression} store has {len(blobs)} blobs for {len(large.files)} instances")
        if compression == "none":
            direct_blobs = blobs
            if sum(p.stat().st_size for p in blobs) != size:
                raise CannotRun("uncompressed blobs are not the size of the DICOM files")
        read_all(blobs)  # this store's blobs into the page cache (what the mount reads)
        read_all(direct_blobs)
        os.sync()
        with cli.mounted(workdir / f"mnt-read-{compression}") as mountpoint:
            files = files_under(mountpoint / "by-uids")  # the listing, before the clock
            instances = [p for p in files if p.suffix == ".dcm"]
            first_seconds, first_bytes = timed_read(files)
            if len(instances) != len(large.files):
                raise CannotRun(f"{len(instances)} instances under by-uids, expected {len(large.files)}")
            repeated, direct = [], []
            for _ in range(REPEATS):
                seconds, read = timed_read(direct_blobs)
                direct.append(read / seconds / 1e9)
                seconds, total = timed_read(files)
                if total != first_bytes:
                    raise CannotRun(f"repeated read gave {total} bytes, first read {first_bytes}")
                repeated.append(total / seconds / 1e9)
            dcm_bytes = sum(p.stat().st_size for p in instances)
        if dcm_bytes != size:
            raise CannotRun(f"{compression}: the mount's instances hold {dcm_bytes} bytes, the files {size}")
        first = first_bytes / first_seconds / 1e9
        direct_gbps = statistics.median(direct)
        repeated_gbps = statistics.median(repeated)
        progress(f"  {compression:<5} first {first:6.2f} GB/s  repeated {repeated_gbps:6.2f} GB/s  "
                 f"direct {direct_gbps:6.2f} GB/s")
        detail = {"files": len(files), "bytes": first_bytes, "compression": compression}
        first_row = Row("read", f"first read through the mount ({compression})", first, "GB/s", direct_gbps,
                        "direct blob read", detail={**detail, "seconds": first_seconds})
        repeated_row = Row("read", f"repeated read ({compression})", repeated_gbps, "GB/s", direct_gbps,
                           "direct blob read", detail={**detail, "passes_gbps": repeated, "direct_passes_gbps": direct})
        if compression == "none":
            first_row.target, first_row.passed = f">= {FIRST_READ_GBPS:g} GB/s", first >= FIRST_READ_GBPS
            ratio = repeated_row.ratio or 0.0
            repeated_row.target, repeated_row.passed = f">= {REPEATED_VS_DIRECT:g}x direct", ratio >= REPEATED_VS_DIRECT
        rows += [first_row, repeated_row]
        if compression == "none":
            rows += bare_reads(workdir, cli.store / "blobs", first, repeated_gbps, direct_gbps)
    return rows


def bare_reads(workdir: Path, blobs: Path, first: float, repeated: float, direct: float) -> list[Row]:
    """The same reads through bench/bare_fuse.py over the blob files: the pyfuse3 floor."""
    with bare_mounted(blobs, workdir / "mnt-read-bare") as mountpoint:
        files = files_under(mountpoint)
        seconds, total = timed_read(files)
        bare_first = total / seconds / 1e9
        passes = []
        for _ in range(REPEATS):
            seconds, total = timed_read(files)
            passes.append(total / seconds / 1e9)
    bare_repeated = statistics.median(passes)
    progress(f"  bare pyfuse3 first {bare_first:6.2f} GB/s  repeated {bare_repeated:6.2f} GB/s")
    return [Row("read", "first read through a bare pyfuse3 file system (the floor)", bare_first, "GB/s", direct,
                "direct blob read"),
            Row("read", "repeated read through the bare pyfuse3 file system", bare_repeated, "GB/s", direct,
                "direct blob read", detail={"passes_gbps": passes}),
            Row("read", "first read (none): dicomfs vs the bare pyfuse3 floor", first, "GB/s", bare_first, "bare pyfuse3"),
            Row("read", "repeated read (none): dicomfs vs the bare pyfuse3 floor", repeated, "GB/s", bare_repeated,
                "bare pyfuse3")]


# -- 2. metadata walks ----------------------------------------------------------------------------


def measure_walks(command: list[str], workdir: Path, caches: Caches, *, quick: bool) -> list[Row]:
    started = time.perf_counter()
    grid = write_corpus(workdir / "meta-grid", patients=6 if quick else 60, studies_per_patient=5,
                        series_per_study=4, instances_per_series=25, pixels=16, seed=2)
    series = write_corpus(workdir / "meta-series", patients=1, studies_per_patient=1, series_per_study=1,
                          instances_per_series=1000, pixels=16, seed=5)
    expected = grid.instances + series.instances
    progress(f"walks: {len(grid.files)} + {len(series.files)} small instances written in "
             f"{time.perf_counter() - started:.1f} s")
    cli = new_store(command, workdir, "meta", "none")
    started = time.perf_counter()
    cli.run("ingest", "--quiet", str(grid.root), str(series.root), timeout=LONG)
    stored = cli.instances()
    progress(f"  ingested {stored} instances in {time.perf_counter() - started:.1f} s")
    if stored != expected:
        raise CannotRun(f"the walk store holds {stored} instances, expected {expected}")
    plain = workdir / "meta-plain"
    plain.mkdir()
    mountpoint = workdir / "mnt-meta"
    started = time.perf_counter()
    with cli.mounted(mountpoint):
        for view in ("by-uids", "by-patients"):
            subprocess.run(["cp", "-r", str(mountpoint / view), str(plain / view)], check=True, timeout=LONG)
    progress(f"  copied by-uids and by-patients to a plain tree in {time.perf_counter() - started:.1f} s")
    folder = next((Path(p) for p, _, names in os.walk(plain / "by-patients")
                   if sum(n.endswith(".dcm") for n in names) >= series.instances), None)
    if folder is None:
        raise CannotRun(f"no folder of {series.instances} instances under by-patients")
    series_folder = folder.relative_to(plain)
    bare = workdir / "mnt-meta-bare"

    commands = {
        "find by-uids | wc -l": "find {root}/by-uids | wc -l",
        "ls -lR by-patients": "ls -lR {root}/by-patients > /dev/null",
        f"ls -l of a {series.instances:,}-instance series": "ls -l {series} > /dev/null",
    }
    rows: list[Row] = []
    for label, template in commands.items():
        times: dict[str, list[float]] = {}
        outputs: dict[str, list[str]] = {}
        statuses: list[int] = []
        for side in ("mount", "plain", "bare"):
            root = {"mount": mountpoint, "plain": plain, "bare": bare}[side]
            text = template.format(root=shlex.quote(str(root)), series=shlex.quote(str(root / series_folder)))
            with _side_mounted(side, cli, mountpoint, plain, bare):
                caches.drop()
                runs = [shell(text) for _ in range(2)]
            times[side] = [seconds for seconds, _, _ in runs]
            outputs[side] = [out for _, out, _ in runs]
            statuses += [status for _, _, status in runs]
            progress(f"  {label:<36} {side:<5} " + "  ".join(f"{t * 1000:9.1f} ms" for t in times[side]))
        if outputs["mount"] != outputs["plain"]:
            print(f"  {label}: output differs: mount {outputs['mount']} plain {outputs['plain']}", flush=True)
        for run, which in enumerate(("first", "second")):
            scale = 1000 if label.startswith("ls -l of") else 1
            rows.append(Row("walk", f"{label}, {which} run: the bare pyfuse3 floor", times["bare"][run] * scale,
                            "ms" if scale > 1 else "s", times["plain"][run] * scale, "plain tree",
                            higher_is_better=False))
        ok = not any(statuses)
        for run, which in enumerate(("first", "second")):
            mount_s, plain_s = times["mount"][run], times["plain"][run]
            detail = {"command": template, "exit_statuses": statuses, "output_mount": outputs["mount"][run],
                      "output_plain": outputs["plain"][run], "caches_dropped": caches.dropped}
            if label.startswith("ls -l of"):
                row = Row("walk", f"{label}, {which} run", mount_s * 1000, "ms", plain_s * 1000, "plain tree",
                          higher_is_better=False, target=f"< {SERIES_LS_MS:g} ms",
                          passed=ok and mount_s * 1000 < SERIES_LS_MS, detail=detail)
            else:
                limit = WALK_FIRST_VS_PLAIN if run == 0 else WALK_SECOND_VS_PLAIN
                row = Row("walk", f"{label}, {which} run", mount_s, "s", plain_s, "plain tree",
                          higher_is_better=False, target=f"<= {limit:g}x plain",
                          passed=ok and mount_s <= limit * plain_s, detail=detail)
            rows.append(row)
    return rows


def _side_mounted(side: str, cli: Dicomfs, mountpoint: Path, plain: Path, bare: Path) -> contextlib.AbstractContextManager[object]:
    """What the walk of ``side`` needs mounted: dicomfs, nothing (the plain tree) or the bare file system."""
    if side == "mount":
        return cli.mounted(mountpoint)
    if side == "bare":
        return bare_mounted(plain, bare)
    return contextlib.nullcontext()


# -- 3. uploads -----------------------------------------------------------------------------------


def files_in(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def measure_uploads(command: list[str], workdir: Path) -> list[Row]:
    started = time.perf_counter()
    corpus = write_corpus(workdir / "upload-src", patients=20, studies_per_patient=2, series_per_study=2,
                          instances_per_series=25, seed=3)
    count = corpus.instances
    progress(f"uploads: {count} instances written in {time.perf_counter() - started:.1f} s")

    reference = new_store(command, workdir, "upload-cli", "none")
    warm(corpus)
    started = time.perf_counter()
    reference.run("ingest", "--quiet", str(corpus.root), timeout=LONG)
    cli_seconds = time.perf_counter() - started
    if reference.instances() != count:
        raise CannotRun(f"dicomfs ingest stored {reference.instances()} instances, expected {count}")
    progress(f"  dicomfs ingest   {cli_seconds:7.2f} s  {count / cli_seconds:8.0f} files/s")

    cli = new_store(command, workdir, "upload-fuse", "none")
    mountpoint = workdir / "mnt-upload"
    staged = cli.store / "uploads"
    stored, timed_out = 0, False
    with cli.mounted(mountpoint):
        warm(corpus)
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(corpus.root), str(mountpoint / "uploads" / "cd")], check=True, timeout=LONG)
        copied = time.perf_counter() - started
        deadline = time.monotonic() + LONG
        while True:
            if files_in(staged) == 0:
                seen_empty = time.perf_counter()
                stored = cli.instances()
                if stored >= count:
                    upload_seconds = seen_empty - started
                    break
            if time.monotonic() > deadline:
                timed_out, upload_seconds = True, float("nan")
                stored = cli.instances()
                print(f"  uploads: {files_in(staged)} files still in uploads/, {stored} of {count} stored "
                      f"after {LONG} s", flush=True)
                break
            time.sleep(0.02)
    progress(f"  cp -r to uploads {copied:7.2f} s (cp alone), {upload_seconds:.2f} s until all ingested  "
             f"{count / upload_seconds:8.0f} files/s")
    fuse_rate, cli_rate = count / upload_seconds, count / cli_seconds
    row = Row("upload", f"cp -r of {count:,} files into uploads/ until ingested", fuse_rate, "files/s", cli_rate,
              "dicomfs ingest (CLI)", target=f">= {UPLOAD_VS_CLI:g}x CLI",
              detail={"cp_seconds": copied, "until_ingested_seconds": upload_seconds, "cli_seconds": cli_seconds,
                      "stored": stored, "timed_out": timed_out})
    row.passed = not timed_out and stored == count and fuse_rate >= UPLOAD_VS_CLI * cli_rate
    staging = workdir / "upload-bare"
    staging.mkdir()
    with bare_mounted(staging, workdir / "mnt-upload-bare", writable=True) as bare:
        warm(corpus)
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(corpus.root), str(bare / "cd")], check=True, timeout=LONG)
        bare_seconds = time.perf_counter() - started
    if files_in(staging) != count:
        raise CannotRun(f"cp -r into the bare file system left {files_in(staging)} files, not {count}")
    progress(f"  cp -r to a bare pyfuse3 folder {bare_seconds:7.2f} s  {count / bare_seconds:8.0f} files/s")
    return [row,
            Row("upload", f"cp -r of {count:,} files into a bare pyfuse3 folder (the floor: nothing ingested)",
                count / bare_seconds, "files/s", cli_rate, "dicomfs ingest (CLI)"),
            Row("upload", "cp -r into uploads/ until ingested: dicomfs vs the bare pyfuse3 floor", fuse_rate,
                "files/s", count / bare_seconds, "bare pyfuse3")]


# -- report ---------------------------------------------------------------------------------------


def _figure(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    if unit == "GB/s":
        return f"{value:,.2f} GB/s"
    if unit == "s":
        return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"
    if unit == "ms":
        return f"{value:,.1f} ms"
    return f"{value:,.0f} {unit}"


def print_report(rows: list[Row]) -> None:
    print("\n| measurement | dicomfs | reference | vs reference | target |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        ratio = row.ratio
        if ratio is None:
            versus = "-"
        elif row.higher_is_better:
            versus = f"{ratio:.2f}x"
        else:
            versus = f"{ratio:.2f}x the time"
        target = "-" if not row.target else f"{row.target}: {'PASS' if row.passed else 'FAIL'}"
        name = row.name.replace("|", "\\|")  # a pipe in a command would end the markdown cell
        print(f"| {name} | {_figure(row.value, row.unit)} | {_figure(row.reference, row.unit)} "
              f"{row.reference_name} | {versus} | {target} |")
    checks = [r for r in rows if r.target]
    print("\nTargets:")
    for row in checks:
        shown = _figure(row.value, row.unit)
        if row.ratio is not None and "x" in row.target:
            shown += f" = {row.ratio:.2f}x {row.reference_name}"
        print(f"- {'PASS' if row.passed else 'FAIL'} {row.name}: {shown} (need {row.target})")
    failed = sum(not r.passed for r in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} targets met.")


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = options(__doc__.splitlines()[0] if __doc__ else None, "40 large files, a 3,000-instance walk store")
    args = parser.parse_args()
    command = dicomfs_command(parser, args)
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("needs /dev/fuse and fusermount3 (apt install fuse3)", file=sys.stderr)
        return 2
    workdir = work_folder(parser, args, "fuse")
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "pydicom": pydicom.__version__, "dicomfs": shlex.join(command), "workdir": str(workdir),
               "quick": args.quick}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    caches = Caches()
    rows: list[Row] = []
    started = time.perf_counter()
    status = 0
    try:
        rows += measure_reads(command, workdir, quick=args.quick)
        rows += measure_walks(command, workdir, caches, quick=args.quick)
        rows += measure_uploads(command, workdir)
    except (CannotRun, subprocess.SubprocessError, OSError) as error:
        print(f"cannot run: {error}", file=sys.stderr, flush=True)
        status = 2
    finally:
        release(workdir, keep=args.keep)
    machine["caches_dropped"] = caches.dropped
    return finish(args, machine, rows, status, started, print_report)


if __name__ == "__main__":
    sys.exit(main())
