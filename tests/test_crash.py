"""Kill an ingest with SIGKILL at random moments: nothing acknowledged is lost, check stays clean.

A file counts as acknowledged when the child has printed its JSON result line: the command prints
it only after the instance is durable. After every kill, ``dicomfs check`` must be clean and every
acknowledged instance present with its exact bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dicomfs.samples import Corpus, write_corpus
from dicomfs.store.index import Index
from dicomfs.store.store import Store
from tests.conftest import dicomfs_command, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    corpus = write_corpus(tmp_path_factory.mktemp("crash") / "c", patients=10, studies_per_patient=2,
                          series_per_study=4, instances_per_series=25, pixels=32, seed=11)
    assert corpus.instances == 2000
    return corpus


def _ingest_until_killed(store: Path, corpus: Path, delay: float, config: Path) -> list[dict[str, object]]:
    """Run an ingest; kill it ``delay`` seconds after its first acknowledgement; return what it acked."""
    env = {**os.environ, "DICOMFS_CONFIG": str(config)}
    child = subprocess.Popen([*dicomfs_command(), "--store", str(store), "ingest", "--json", str(corpus)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    acknowledged: list[dict[str, object]] = []
    first = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            acknowledged.append(json.loads(line))
            first.set()
        first.set()

    reader = threading.Thread(target=read)
    reader.start()
    first.wait(timeout=60)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(timeout=30)
    assert not reader.is_alive(), "something the killed ingest started still holds its stdout"
    assert child.stdout is not None
    child.stdout.close()
    return acknowledged


@pytest.mark.parametrize("workers", [0, 1])  # worker processes, and the committer thread uploads use
def test_crash_sigkill_loses_nothing_acknowledged(tmp_path: Path, crash_corpus: Corpus, workers: int) -> None:
    store = tmp_path / "store"
    config = tmp_path / "dicomfs.toml"
    config.write_text(f"[ingest]\nworkers = {workers}\nbatch_files = 32\n")
    assert run_cli("init", store=store, config=config).returncode == 0
    chooser = random.Random(2026 + workers)
    acknowledged: dict[str, str] = {}
    per_round: list[int] = []
    for _ in range(5):
        acked = _ingest_until_killed(store, crash_corpus.root, chooser.uniform(0.0, 0.4), config)
        per_round.append(len(acked))
        for result in acked:
            if result["status"] in ("stored", "already_stored"):
                acknowledged[str(result["instance"])] = str(result["path"])
        checked = run_cli("check", store=store, config=config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        _assert_present_and_intact(store, acknowledged)
    assert acknowledged, "no kill came after an acknowledgement: the test proved nothing"
    assert min(per_round) < 2000, f"no kill interrupted an ingest (acknowledged per round: {per_round})"
    finished = run_cli("ingest", "--quiet", str(crash_corpus.root), store=store, config=config)
    assert finished.returncode == 0, finished.stderr
    stats = json.loads(run_cli("stats", "--json", store=store, config=config).stdout)
    assert stats["instances"] == 2000
    assert run_cli("check", store=store, config=config).returncode == 0


def _assert_present_and_intact(store: Path, acknowledged: dict[str, str]) -> None:
    with Store(store, readonly=True) as opened:
        for instance, source in acknowledged.items():
            with opened.open_instance(instance) as reader:
                stored = hashlib.sha256(b"".join(reader.iter_chunks())).hexdigest()
            assert stored == hashlib.sha256(Path(source).read_bytes()).hexdigest(), source


def test_crash_workers_keep_a_killed_writer_alive_until_they_are_gone(tmp_path: Path, crash_corpus: Corpus) -> None:
    """Bulk workers hold their parent's owner lock: with the parent killed and its workers not yet
    gone (stopped here, so the moment lasts), recovery keeps the blobs they may still write;
    once they are gone, it removes what was left and check is clean."""
    store = tmp_path / "store"
    config = tmp_path / "dicomfs.toml"
    config.write_text("[ingest]\nworkers = 2\n")  # worker processes even on a machine with one CPU
    assert run_cli("init", store=store, config=config).returncode == 0
    env = {**os.environ, "DICOMFS_CONFIG": str(config)}
    child = subprocess.Popen([*dicomfs_command(), "--store", str(store), "ingest", "--json", str(crash_corpus.root)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert child.stdout is not None
    acknowledged = [json.loads(child.stdout.readline())]  # the first batch is durable: workers are busy
    helpers = _descendants(child.pid)  # the fork server, the workers, multiprocessing's resource tracker
    assert len(helpers) >= 3, helpers
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    child.send_signal(signal.SIGKILL)
    child.wait()
    try:
        before = _pending(store)
        assert before, "the killed ingest left no pending blob: the test proved nothing"
        Store(store).close()  # a writable open recovers
        assert _pending(store) == before
    finally:
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):  # one that was already ending, reaped once orphaned
                os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in helpers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.05)
    child.stdout.close()
    checked = run_cli("check", store=store, config=config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not _pending(store)
    _assert_present_and_intact(store, {str(r["instance"]): str(r["path"]) for r in acknowledged})


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(_stat(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found: list[int] = []
    frontier = [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _state(pid: int) -> str:
    try:
        return _stat(pid)[0]
    except (OSError, IndexError):
        return "Z"


def _pending(store: Path) -> set[tuple[bytes, str]]:
    index = Index(store / "index", readonly=True)
    try:
        with index.read() as txn:
            return set(index.pending(txn))
    finally:
        index.close()
