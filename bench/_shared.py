"""What the benchmarks share: their common options, the work folder, the ratio rows and their
report, and the JSON they write. Imported as ``_shared`` (a benchmark runs as a script, so its
own folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["CannotRun", "Cli", "Row", "children_cpu", "dicomfs_command", "finish", "options", "print_report",
           "process_cpu", "progress", "py_spy", "settle_the_disk", "update_doc", "work_folder", "write_json"]


class CannotRun(Exception):
    """The benchmark cannot go on (exit status 2)."""


_PROBE_FILES = 100
_CLEAN_CREATE_US = 60.0
"""A file creation slower than this (it takes 25-45 us on these machines) means recent deletes."""


def _creation_us(folder: Path) -> float:
    """Microseconds one new empty file takes (the median of ``_PROBE_FILES``) in ``folder``/.create-probe.

    The files stay (the work folder goes at the end of the run): deleting them would slow the
    next probe, and the benchmark, the way it is meant to detect."""
    probe = folder / ".create-probe"
    probe.mkdir(exist_ok=True)
    first = len(os.listdir(probe))
    times: list[float] = []
    for number in range(first, first + _PROBE_FILES):
        started = time.perf_counter()
        os.close(os.open(probe / str(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e6


def _journal(folder: Path) -> str | None:
    """"with a journal", "without a journal", or None when the folder is not on ext4 (or unknown)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        source = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(folder)], capture_output=True,
                                text=True, timeout=10).stdout.split()
        if len(source) == 2 and source[0] == "ext4":
            task = Path(f"/sys/fs/ext4/{Path(source[1]).name}/journal_task").read_text().strip()
            return "without a journal" if task == "<none>" else "with a journal"
    return None


def settle_the_disk(folder: Path, *, most_seconds: float = 40.0) -> str:
    """Wait (up to ``most_seconds``) until creating a file in the work ``folder`` takes its usual
    time; a line saying what was found, for the report.

    On ext4 without a journal (these VMs' disks) a new inode skips every inode freed in the last
    ~30 s whose table block is still cached (``recently_deleted`` in the kernel's
    ``find_inode_bit``): measured here, after 5,000 deletes a file creation took 400 us of system
    time instead of 33, after 20,000 1.3 ms. A benchmark started right after the test suite or an
    earlier run's clean-up would measure that, not dicomfs: PUTs into the bridge used 3.5x the
    CPU. Journaled ext4 does not check, so a production disk is not affected. The window is
    30-35 s, so a longer wait would not help: a creation still slow after ``most_seconds`` has
    another cause, and the line says so.
    """
    journal = _journal(folder)
    if journal != "without a journal":
        return f"ext4 {journal}" if journal else "not ext4: no wait for recent deletes"
    waited = 0.0
    while (cost := _creation_us(folder)) > _CLEAN_CREATE_US and waited < most_seconds:
        progress(f"creating a file takes {cost:.0f} us (recent deletes on ext4 without a journal): waiting")
        time.sleep(5.0)
        waited += 5.0
    settled = "" if cost <= _CLEAN_CREATE_US else f", still above {_CLEAN_CREATE_US:.0f} us"
    return f"ext4 without a journal: creating a file took {cost:.0f} us after waiting {waited:.0f} s for recent deletes{settled}"


def progress(text: str) -> None:
    print(text, flush=True)


def options(description: str | None, quick: str, *, profile: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark takes; ``profile`` is the help of --profile where there is one."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--workdir", type=Path, help="empty or absent folder on the disk to measure "
                        "(default: a new folder under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument("--dicomfs", metavar="CMD", help="the dicomfs command (default: this Python's `-m dicomfs`)")
    parser.add_argument("--doc", type=Path, metavar="FILE",
                        help="also write the report into FILE (docs/benchmarks.md) between this benchmark's "
                             "markers for the run kind (full or quick), the rest of the file untouched")
    if profile is not None:
        parser.add_argument("--profile", type=Path, metavar="DIR", help=profile)
    return parser


def dicomfs_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    command = shlex.split(args.dicomfs) if args.dicomfs else [sys.executable, "-m", "dicomfs"]
    if not command or not shutil.which(command[0]):
        parser.error(f"no such command: {args.dicomfs}")
    return command


class Cli:
    """The dicomfs command line for one store and configuration file."""

    def __init__(self, command: list[str], store: Path, config: Path) -> None:
        self.command, self.store, self.config = command, store, config
        self.env = {**os.environ, "DICOMFS_CONFIG": str(config)}

    def argv(self, *args: str, config: Path | None = None) -> list[str]:
        return [*self.command, "--store", str(self.store), "--config", str(config or self.config), *args]

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``dicomfs ARGS`` to its end; CannotRun when it fails (with ``check``)."""
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and done.returncode != 0:
            raise CannotRun(f"dicomfs {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return done

    def instances(self) -> int:
        return int(json.loads(self.run("stats", "--json").stdout)["instances"])


def children_cpu() -> float:
    """User + system seconds of this process's children that have ended."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int | None) -> float:
    """User + system seconds of a live process (0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def py_spy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The py-spy to record with when --profile is given (its folder made), else None."""
    if not args.profile:
        return None
    found = shutil.which("py-spy") or next((p for p in ("/work/perf/tools/bin/py-spy",) if os.access(p, os.X_OK)), None)
    if found is None:
        parser.error("--profile needs py-spy (on PATH or /work/perf/tools/bin/py-spy)")
    args.profile = args.profile.resolve()
    args.profile.mkdir(parents=True, exist_ok=True)
    return found


def work_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Path:
    """--workdir (which must be empty), or a new folder under /var/tmp: on disk, not tmpfs.

    Its disk is settled first (``settle_the_disk``); what was found is printed and kept in
    ``args.disk_settled`` for the report."""
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"{args.workdir} is not empty")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix=f"dicomfs-{name}-bench-", dir="/var/tmp"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    args.disk_settled = settle_the_disk(workdir)
    progress(args.disk_settled)
    return workdir


def write_json(path: Path | None, machine: dict[str, object], rows: list[Any], *, complete: bool) -> None:
    """The figures as JSON, when --json asked for them (a row's derived figures included)."""
    if path is None:
        return
    plain = []
    for row in rows:
        data = asdict(row)
        for derived in ("ratio", "target", "passed"):
            if hasattr(row, derived):
                data[derived] = getattr(row, derived)
        plain.append(data)
    path.write_text(json.dumps({"machine": machine, "rows": plain, "complete": complete}, indent=2, default=str) + "\n")


class _Tee(io.StringIO):
    """Standard output that is also kept (the report, for ``--doc``)."""

    def __init__(self, shown: Any) -> None:
        super().__init__()
        self.shown = shown

    def write(self, text: str) -> int:
        self.shown.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.shown.flush()


def finish(args: argparse.Namespace, machine: dict[str, object], rows: Sequence[Any], status: int, started: float,
           report: Callable[[Any], None]) -> int:
    """The end of every benchmark: the report, the total time, the JSON and ``--doc``; returns the
    exit status."""
    total = time.perf_counter() - started
    machine["seconds"] = round(total, 1)
    kept = _Tee(sys.stdout)
    if rows:
        with contextlib.redirect_stdout(kept):
            report(rows)
    print(f"\n{total:.0f} s in all.", flush=True)
    write_json(args.json, machine, list(rows), complete=status == 0)
    if getattr(args, "doc", None) and rows:
        script = f"bench/{Path(sys.argv[0]).name}"
        kind = "quick" if args.quick else "full"
        heading = f"### {script} {'`--quick` run' if args.quick else 'full run'}, {time.strftime('%Y-%m-%d')}"
        command = shlex.join([script, *sys.argv[1:]])
        update_doc(args.doc, f"{script} {kind}", f"{heading}\n\n`{command}`, {total:.0f} s in all"
                   + (" (incomplete: the run stopped early)" if status == 2 else "") + f"\n{kept.getvalue()}")
    return status


def update_doc(path: Path, marker: str, text: str) -> None:
    """Put ``text`` between the markers ``<!-- MARKER: begin -->`` and ``<!-- MARKER: end -->`` in
    ``path`` (added at the end the first time), the rest of the file untouched."""
    begin, end = f"<!-- {marker}: begin -->", f"<!-- {marker}: end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)


@dataclass
class Row:
    """One line of a ratio report: a dicomfs figure and the reference it is compared with."""

    section: str
    name: str
    value: float
    unit: str  # "MB/s", "inst/s", "files/s", "ms"
    reference: float | None = None
    higher_is_better: bool = True
    limit: float | None = None  # the target ratio; None: no target
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """dicomfs / reference (rates) or dicomfs time / reference time (times)."""
        if self.reference is None or self.reference <= 0 or self.value != self.value:
            return None
        return self.value / self.reference

    @property
    def target(self) -> str:
        if self.limit is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.limit:g}x"

    @property
    def passed(self) -> bool | None:
        if self.limit is None:
            return None
        ratio = self.ratio
        if ratio is None:
            return False
        return ratio >= self.limit if self.higher_is_better else ratio <= self.limit


def _figure(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.1f} {unit}" if unit in ("ms", "MB/s") else f"{value:,.0f} {unit}"


def print_report(rows: list[Row]) -> None:
    print("\n| measure | dicomfs | reference | ratio | target | met? |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        ratio = row.ratio
        shown = "-" if ratio is None else f"{ratio:.2f}" + ("" if row.higher_is_better else " (time)")
        met = "-" if row.passed is None else ("PASS" if row.passed else "FAIL")
        print(f"| {row.name} | {_figure(row.value, row.unit)} | {_figure(row.reference, row.unit)} | {shown} "
              f"| {row.target} | {met} |")
    checks = [r for r in rows if r.limit is not None]
    failed = sum(not r.passed for r in checks)
    print(f"\n{len(checks) - failed} of {len(checks)} targets met.")
