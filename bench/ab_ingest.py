"""Upload ingest of two checkouts in alternated pairs: is a change faster, on a machine whose
figures swing by a third between runs?

Run from the repository, as root (one path mounts with FUSE)::

    .venv/bin/python bench/ab_ingest.py --base REV [--pairs N] [--paths fuse,webdav1,webdav4]
                                        [--workdir DIR] [--keep]

The *base* is ``REV`` checked out in a temporary ``git worktree``; the *head* is this working
tree, uncommitted changes included. Both run with this Python and its packages, each importing
its own ``dicomfs`` (``python -P -m dicomfs`` with ``PYTHONPATH`` set to the tree). The corpus is
made once by :func:`dicomfs.samples.write_corpus` (24 patients x 2 studies x 2 series x 25
instances of 64x64, ~2,400 files, as ``bench/compare.py``'s small part) and read once so it is in
the page cache. Each run is on a fresh store:

- ``fuse``: ``cp -r`` of the corpus into ``MOUNT/uploads/`` of a fresh ``dicomfs mount``;
- ``webdav1`` / ``webdav4``: PUT of every file (from memory) into ``uploads/`` of a fresh
  ``dicomfs webdav`` on 127.0.0.1, over 1 or 4 keep-alive connections;

each timed from the first write until ``STORE/uploads/`` holds no file and ``dicomfs stats``
counts every instance. Also read from ``/proc``: the CPU (user + system) of the mount or bridge
process and of its ingest helper over the run. Pairs alternate which side goes first, so a drift
of the machine falls on both. Printed: every run, then per path the median files/s and CPU of
each side and the ratio head / base. No target: this is for judging a change, not the product.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from _shared import CannotRun, Cli, process_cpu
from fuse import Dicomfs, daemon_pids, files_in

from dicomfs.samples import write_corpus

REPO = Path(__file__).resolve().parents[1]
PATHS = ("fuse", "webdav1", "webdav4")
LONG = 600  # seconds any one run may take


@dataclass
class Run:
    side: str
    path: str
    files_per_second: float
    server_cpu: float
    helper_cpu: float


def tree_cli(tree: Path, store: Path, config: Path) -> Dicomfs:
    """The command line of the checkout at ``tree``, for one store."""
    cli = Dicomfs([sys.executable, "-P", "-m", "dicomfs"], store, config)
    cli.env["PYTHONPATH"] = str(tree)
    return cli


def helpers_of(pid: int) -> list[int]:
    """The ingest helpers of a front end: its children that multiprocessing spawned."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat_file:
                parent = int(stat_file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as command:
                spawned = b"spawn_main" in command.read()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid and spawned:
            found.append(int(entry))
    return found


def wait_ingested(cli: Cli, expected: int) -> None:
    deadline = time.monotonic() + LONG
    while files_in(cli.store / "uploads") or cli.instances() < expected:
        if time.monotonic() > deadline:
            raise CannotRun(f"{files_in(cli.store / 'uploads')} files still in uploads/ after {LONG} s")
        time.sleep(0.005)


def run_fuse(cli: Dicomfs, corpus: Path, expected: int) -> tuple[float, float, float]:
    mountpoint = cli.store.with_name(cli.store.name + "-mnt")
    with cli.mounted(mountpoint):
        daemons = daemon_pids(mountpoint)
        if len(daemons) != 1:
            raise CannotRun(f"{len(daemons)} mount daemons serve {mountpoint}")
        daemon = daemons[0]
        time.sleep(0.5)  # the helper starts with the mount: let it be ready, as in use
        cpu = process_cpu(daemon), {pid: process_cpu(pid) for pid in helpers_of(daemon)}
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(corpus), str(mountpoint / "uploads")], check=True, timeout=LONG)
        wait_ingested(cli, expected)
        seconds = time.perf_counter() - started
        helper = sum(process_cpu(pid) - cpu[1].get(pid, 0.0) for pid in helpers_of(daemon))
        return seconds, process_cpu(daemon) - cpu[0], helper


@contextlib.contextmanager
def bridge(cli: Cli) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(cli.argv("webdav", "--bind", "127.0.0.1:0"), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=cli.env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("serving "):
            raise CannotRun(f"dicomfs webdav did not start: {line!r}")
        yield process, line.rsplit(" at ", 1)[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=60)
        if process.stdout is not None:
            process.stdout.close()


def put_all(url: str, bodies: list[tuple[str, bytes]], connections: int) -> None:
    where = urlsplit(url)
    failures: list[str] = []

    def send(share: list[tuple[str, bytes]]) -> None:
        connection = http.client.HTTPConnection(where.hostname or "127.0.0.1", where.port or 80, timeout=60)
        try:
            for name, body in share:
                connection.request("PUT", f"/uploads/{name}", body=body)
                answer = connection.getresponse()
                answer.read()
                if answer.status not in (201, 204):
                    failures.append(f"{name}: HTTP {answer.status}")
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(bodies[n::connections],)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise CannotRun(f"{len(failures)} PUTs failed, first: {failures[0]}")


def run_webdav(cli: Cli, bodies: list[tuple[str, bytes]], connections: int) -> tuple[float, float, float]:
    with bridge(cli) as (process, url):
        warm_up = [("warm-up.dcm", bodies[0][1])]  # starts the ingest helper, as a bridge in use has
        put_all(url, warm_up, 1)
        wait_ingested(cli, 1)
        cpu = process_cpu(process.pid), {pid: process_cpu(pid) for pid in helpers_of(process.pid)}
        started = time.perf_counter()
        put_all(url, bodies, connections)
        wait_ingested(cli, len(bodies))  # the warm-up is one of them: stored once
        seconds = time.perf_counter() - started
        helper = sum(process_cpu(pid) - cpu[1].get(pid, 0.0) for pid in helpers_of(process.pid))
        return seconds, process_cpu(process.pid) - cpu[0], helper


def measure(side: str, tree: Path, path: str, workdir: Path, corpus: Path, bodies: list[tuple[str, bytes]],
            number: int) -> Run:
    store = workdir / f"{path}-{side}-{number}"
    config = workdir / "dicomfs.toml"
    cli = tree_cli(tree, store, config)
    cli.run("init")
    os.sync()
    if path == "fuse":
        seconds, server, helper = run_fuse(cli, corpus, len(bodies))
    else:
        seconds, server, helper = run_webdav(cli, bodies, int(path.removeprefix("webdav")))
    run = Run(side, path, len(bodies) / seconds, server, helper)
    print(f"  {path:8} {side:4} {run.files_per_second:7,.0f} files/s  {'mount' if path == 'fuse' else 'bridge'} CPU "
          f"{server:.2f} s, helper CPU {helper:.2f} s", flush=True)
    return run


@contextlib.contextmanager
def base_tree(revision: str, workdir: Path) -> Iterator[Path]:
    tree = workdir / "base"
    done = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise CannotRun(f"git worktree add {revision}: {done.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def summary(runs: list[Run], paths: list[str]) -> None:
    print("\n| path | base files/s | head files/s | head / base | base CPU (front end + helper) | head CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in paths:
        figures = {}
        for side in ("base", "head"):
            mine = [r for r in runs if r.path == path and r.side == side]
            figures[side] = (statistics.median(r.files_per_second for r in mine),
                             statistics.median(r.server_cpu for r in mine), statistics.median(r.helper_cpu for r in mine))
        (base, base_server, base_helper), (head, head_server, head_helper) = figures["base"], figures["head"]
        print(f"| {path} | {base:,.0f} | {head:,.0f} | {head / base:.2f} | {base_server:.2f} + {base_helper:.2f} s | "
              f"{head_server:.2f} + {head_helper:.2f} s |")
    print("\nMedians of the pairs; CPU in seconds per run.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the revision to compare this working tree with")
    parser.add_argument("--pairs", type=int, default=3, help="alternated pairs per path (default 3)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--workdir", type=Path, help="folder on the disk to measure (default: new, under /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if any(p not in PATHS for p in paths) or args.pairs < 1:
        parser.error(f"--paths takes {', '.join(PATHS)}; --pairs at least 1")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomfs-ab-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "dicomfs.toml").write_text("")
    try:
        corpus = write_corpus(workdir / "corpus", patients=24, studies_per_patient=2, series_per_study=2,
                              instances_per_series=25, seed=1)
        files = sorted(p for p in corpus.root.rglob("*") if p.is_file())
        bodies = [(f"f{n:05d}.dcm", p.read_bytes()) for n, p in enumerate(files)]  # and in the page cache
        print(f"corpus: {len(files)} files, {sum(len(b) for _, b in bodies) / 1e6:.1f} MB; base {args.base}, "
              f"head {REPO} (working tree)", flush=True)
        runs: list[Run] = []
        with base_tree(args.base, workdir) as base:
            for number in range(args.pairs):
                for path in paths:
                    order = [("base", base), ("head", REPO)]
                    for side, tree in order if number % 2 == 0 else order[::-1]:
                        runs.append(measure(side, tree, path, workdir, corpus.root, bodies, number))
        summary(runs, paths)
    except (CannotRun, subprocess.SubprocessError, OSError) as error:
        print(f"cannot run: {error}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
