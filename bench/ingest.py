"""Ingest benchmark: ``dicomfs ingest`` against a plain copy with fsync on the same disk.

Run from the repository::

    .venv/bin/python bench/ingest.py [--quick] [--workdir DIR] [--keep] [--json FILE] [--dicomfs CMD]

It writes a synthetic corpus with :func:`dicomfs.samples.write_corpus` (10,000 instances of
64x64 and 200 of 512x512; ``--quick``: 2,000 and 40, under two minutes), then for each storage
compression (none, zlib, zstd) and each set (small, large) ingests the set into a fresh store
with the real command line, ``dicomfs --store S --config C.toml ingest DIR --quiet``. The
reference is the same files copied by one Python process with open/read/write/fsync/close per
file into a fresh folder on the same disk. The page cache is warmed with the sources before
every measurement, so both sides read from memory and the difference is what each does with
the bytes. Nothing is deleted until the end: for a minute or more after a folder of 10,000 files
is removed, ext4 makes every new file skip the freed inodes (``recently_deleted`` in a kernel
profile), which would tax whichever run came after a clean-up. Peak RSS is the summed RSS of the ingest process and its worker processes, sampled
every 50 ms (or the parent's ``ru_maxrss`` if larger); store bytes are
allocated blocks (like ``du``). MB means 10^6 bytes.

The targets (small files: >= 1.5x the files/s of copy+fsync and >= 1,000 files/s; large files:
>= 0.5x the MB/s of copy+fsync; peak RSS < 300 MB) are printed as PASS/FAIL; the exit status
is 0 whatever they say, since this is a measurement, and 2 only when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom

from dicomfs.samples import Corpus, write_corpus

COMPRESSIONS = ("none", "zlib", "zstd")
SMALL_FILES_PER_COPY = 1.5
SMALL_FILES_PER_SECOND = 1_000
LARGE_MB_PER_COPY = 0.5
PEAK_RSS_MB = 300


@dataclass(frozen=True)
class Run:
    """One timed pass over a set of files: an ingest or the copy reference."""

    name: str
    set: str
    files: int
    source_bytes: int
    seconds: float
    peak_rss_mb: float = 0.0
    store_bytes: int = 0
    exit_status: int = 0

    @property
    def files_per_second(self) -> float:
        """Files per second of wall time."""
        return self.files / self.seconds

    @property
    def mb_per_second(self) -> float:
        """Source megabytes (10^6 bytes) per second of wall time."""
        return self.source_bytes / 1e6 / self.seconds


def main() -> int:
    """Parse the options, run every measurement, print the report; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2,000 small + 40 large files")
    parser.add_argument("--workdir", type=Path, help="empty or absent folder on the disk to measure "
                        "(default: a new folder under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument("--dicomfs", metavar="CMD", help="the dicomfs command (default: next to "
                        "this Python, else on PATH)")
    args = parser.parse_args()
    command = find_dicomfs(args.dicomfs)
    if command is None:
        parser.error("no dicomfs command (--dicomfs, next to this Python or on PATH)")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"{args.workdir} is not empty")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomfs-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
               "pydicom": pydicom.__version__, "dicomfs": shlex.join(command), "workdir": str(workdir)}
    print(" | ".join(f"{key} {value}" for key, value in machine.items()), flush=True)
    try:
        runs = measure(command, workdir, quick=args.quick)
    finally:
        if not args.keep:
            for child in workdir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            if not args.workdir:
                workdir.rmdir()
    checks = check_targets(runs)
    print_report(runs, checks)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "runs": [asdict(r) for r in runs],
                                         "checks": checks}, indent=2) + "\n")
    return 0


def find_dicomfs(given: str | None) -> list[str] | None:
    """The dicomfs command line: `given`, else the script beside ``sys.executable``, else PATH."""
    if given:
        words = shlex.split(given)
        return words if words and shutil.which(words[0]) else None
    beside = Path(sys.executable).parent / "dicomfs"
    found = str(beside) if beside.is_file() else shutil.which("dicomfs")
    return [found] if found else None


def measure(command: list[str], workdir: Path, *, quick: bool) -> list[Run]:
    """Write the corpus, then time the copy reference and every (compression, set) ingest."""
    started = time.perf_counter()
    small = write_corpus(workdir / "small", patients=10 if quick else 50, studies_per_patient=2,
                         series_per_study=4, instances_per_series=25, seed=1)
    large = write_corpus(workdir / "large", patients=0, large=40 if quick else 200, seed=1)
    sets = {"small": small, "large": large}
    print(f"corpus: {len(small.files)} small + {len(large.files)} large files "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    runs = [copy_with_fsync(name, corpus, workdir / f"copy-{name}") for name, corpus in sets.items()]
    for compression in COMPRESSIONS:
        config = workdir / f"{compression}.toml"
        config.write_text(f'[storage]\ncompression = "{compression}"\n')
        for name, corpus in sets.items():
            runs.append(ingest(command, config, name, corpus, workdir / f"store-{compression}-{name}"))
    return runs


def warm(corpus: Corpus) -> int:
    """Read every file once so the measurement reads from the page cache; return the bytes.

    Also flush dirty pages left by the previous step (corpus, copies, deleted stores), so their
    writeback does not land inside the next measurement.
    """
    total = 0
    for sample in corpus.files:
        with open(sample.path, "rb") as f:
            total += len(f.read())
    os.sync()
    return total


def copy_with_fsync(set_name: str, corpus: Corpus, target: Path) -> Run:
    """The reference: copy each file with open/read/write/fsync/close, keeping relative paths."""
    source_bytes = warm(corpus)
    started = time.perf_counter()
    for path in (sample.path for sample in corpus.files):
        destination = target / path.relative_to(corpus.root)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as f:
            data = f.read()
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    seconds = time.perf_counter() - started
    run = Run("copy+fsync", set_name, len(corpus.files), source_bytes, seconds, store_bytes=disk_usage(target))
    report_progress(run)
    return run


class TreeRssSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled every 50 ms.

    Bulk ingest runs worker processes; the figure that matters to a machine is their sum.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._done.wait(0.05):
            total = 0
            for pid in _descendants(self.pid):
                try:
                    with open(f"/proc/{pid}/statm") as statm:
                        total += int(statm.read().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    pass  # the process ended between the listing and the read
            self.peak = max(self.peak, total)


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def ingest(command: list[str], config: Path, set_name: str, corpus: Corpus, store: Path) -> Run:
    """Time ``dicomfs ingest`` of one set into a fresh store and measure its peak RSS."""
    compression = config.stem
    base = [*command, "--store", str(store), "--config", str(config)]
    subprocess.run([*base, "init"], check=True, stdout=subprocess.DEVNULL)
    source_bytes = warm(corpus)
    log = store.with_suffix(".stderr")
    with open(log, "wb") as stderr:
        started = time.perf_counter()
        child = subprocess.Popen([*base, "ingest", str(corpus.root), "--quiet"], stdout=subprocess.DEVNULL, stderr=stderr)
        sampler = TreeRssSampler(child.pid)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        tree_peak = sampler.stop()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so
    if child.returncode:
        print(f"ingest {compression}/{set_name} exited {child.returncode}:\n"
              + log.read_text(errors="replace")[-2000:], file=sys.stderr)
    run = Run(compression, set_name, len(corpus.files), source_bytes, seconds,
              # ru_maxrss (KiB on Linux) is one process's peak; ingest workers add their own
              peak_rss_mb=max(usage.ru_maxrss * 1024, tree_peak) / 1e6,
              store_bytes=disk_usage(store), exit_status=child.returncode)
    report_progress(run)
    return run


def disk_usage(folder: Path) -> int:
    """Allocated bytes of every file under `folder`, each inode counted once, like ``du``."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, _, names in os.walk(folder):
        for name in names:
            info = os.lstat(os.path.join(parent, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def report_progress(run: Run) -> None:
    print(f"  {run.name:<10} {run.set:<5} {run.files:>6} files {run.seconds:7.2f} s", flush=True)


def copy_seconds(runs: list[Run], set_name: str) -> float:
    (copy,) = [r for r in runs if r.name == "copy+fsync" and r.set == set_name]
    return copy.seconds


def check_targets(runs: list[Run]) -> list[dict[str, object]]:
    """Every target against every ingest run; a failed ingest fails all its targets."""
    checks: list[dict[str, object]] = []

    def check(run: Run, what: str, value: float, need: float, unit: str, at_most: bool = False) -> None:
        passed = run.exit_status == 0 and (value < need if at_most else value >= need)
        checks.append({"run": f"{run.name}/{run.set}", "target": what, "value": value, "unit": unit,
                       "need": f"{'<' if at_most else '>='} {need:,g}{unit}", "pass": passed})

    for run in runs:
        if run.name == "copy+fsync":
            continue
        ratio = copy_seconds(runs, run.set) / run.seconds
        if run.set == "small":
            check(run, "files/s vs copy+fsync", ratio, SMALL_FILES_PER_COPY, "x")
            check(run, "files/s", run.files_per_second, SMALL_FILES_PER_SECOND, "")
        else:
            check(run, "MB/s vs copy+fsync", ratio, LARGE_MB_PER_COPY, "x")
        check(run, "peak RSS", run.peak_rss_mb, PEAK_RSS_MB, " MB", at_most=True)
    return checks


def print_report(runs: list[Run], checks: list[dict[str, object]]) -> None:
    print("\n| run | set | files | files/s | MB/s | vs copy+fsync | peak RSS MB | store / source |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        is_copy = run.name == "copy+fsync"
        ratio = "1.00x" if is_copy else f"{copy_seconds(runs, run.set) / run.seconds:.2f}x"
        name = run.name if run.exit_status == 0 else f"{run.name} (exit {run.exit_status})"
        print(f"| {name} | {run.set} | {run.files:,} | {run.files_per_second:,.0f} | {run.mb_per_second:,.1f} "
              f"| {ratio} | {'-' if is_copy else f'{run.peak_rss_mb:.0f}'} "
              f"| {run.store_bytes / run.source_bytes:.2f} |")
    print("\nTargets:")
    for c in checks:
        value = f"{c['value']:,.2f}" if c["unit"] == "x" else f"{c['value']:,.0f}"
        print(f"- {'PASS' if c['pass'] else 'FAIL'} {c['run']}: {c['target']} {value}{c['unit']} (need {c['need']})")
    failed = sum(not c["pass"] for c in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} targets met.")


if __name__ == "__main__":
    sys.exit(main())
