"""The uploads queue and its ingest process, with a real store and real files in uploads/."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import pytest

from dicomfs.samples import Corpus
from dicomfs.store import Store
from dicomfs.upload_queue import UploadQueue
from dicomfs.uploads import UploadArea, UploadOutcome


class Reports:
    """What the queue said of each file, in order."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, ...], UploadOutcome] = {}
        self.groups: list[list[tuple[str, ...]]] = []  # one report per group commit
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, reports: list[tuple[tuple[str, ...], UploadOutcome]]) -> None:
        with self._lock:
            self.groups.append([parts for parts, _ in reports])
            for parts, outcome in reports:
                self.outcomes[parts] = outcome
            self.threads.add(threading.current_thread().name)


def _uploaded(area: UploadArea, corpus: Corpus, folder: str) -> list[tuple[str, ...]]:
    """The corpus's valid files copied into uploads/<folder>/, as queue parts."""
    parts = []
    for index, sample in enumerate(corpus.valid_files):
        target = area.path((folder, f"{index:03d}.dcm"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample.path, target)
        parts.append((folder, target.name))
    return parts


def _helper_pids() -> set[int]:
    """Processes of ours running the upload ingest (multiprocessing's spawned children)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f"PPid:\t{os.getpid()}\n" in status and b"spawn_main" in command:  # not the resource tracker
                found.add(int(entry))
    return found


def test_queue_ingests_in_a_process_of_its_own_and_logs_here(open_store: Callable[..., Store], small_corpus: Corpus,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    reports = Reports()
    queue = UploadQueue(store, area, origin="fuse", on_done=reports)
    try:
        with caplog.at_level(logging.INFO):
            for parts in _uploaded(area, small_corpus, "cd"):
                queue.submit(parts)
            assert queue.wait_idle(timeout=60)
            assert _helper_pids(), "no ingest process beside this one"
    finally:
        queue.close()
    assert len(reports.outcomes) == len(small_corpus.valid_files)
    assert all(outcome.removed and outcome.results for outcome in reports.outcomes.values())
    assert store.stats().instances == small_corpus.instances
    assert not list(area.root.rglob("*.dcm"))
    # the helper's own log lines, one per file, reach this process's logging
    assert sum("uploads/cd/" in record.getMessage() for record in caplog.records) == len(small_corpus.valid_files)
    assert not _helper_pids(), "close() left the ingest process running"


def test_a_group_gathers_for_the_batch_delay_unless_it_fills_first(open_store: Callable[..., Store],
                                                                    small_corpus: Corpus) -> None:
    """Files completed one after another go to the ingest together: a group waits up to
    ``batch_delay`` for company, and leaves at once when ``batch_files`` are waiting."""
    store = open_store(batch_files=3, batch_delay=30.0)
    area = UploadArea(store.folder / "uploads")
    reports = Reports()
    queue = UploadQueue(store, area, origin="fuse", on_done=reports)
    try:
        parts = _uploaded(area, small_corpus, "g")
        assert len(parts) >= 4
        for item in parts[:3]:  # a full group: no wait
            queue.submit(item)
        assert queue.wait_idle(timeout=20), "a full group waited for the delay"
        assert set(reports.outcomes) == set(parts[:3])
        assert reports.groups == [parts[:3]]  # reported together, as they were ingested
        queue.submit(parts[3])  # alone: it waits for company (30 s here)
        assert not queue.wait_idle(timeout=1.0)
        assert parts[3] not in reports.outcomes and area.path(parts[3]).exists()
    finally:
        queue.close()  # closing ends the wait: what waited is ingested, not dropped
    assert reports.outcomes[parts[3]].removed and not area.path(parts[3]).exists()


def test_queue_recovers_from_a_killed_ingest_process(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    reports = Reports()
    queue = UploadQueue(store, area, origin="webdav", on_done=reports)
    try:
        first, second = _uploaded(area, small_corpus, "a"), _uploaded(area, small_corpus, "b")
        queue.submit(first[0])
        assert queue.wait_idle(timeout=60)
        for pid in _helper_pids():
            os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        for parts in first[1:] + second:
            queue.submit(parts)
        assert queue.wait_idle(timeout=60)
    finally:
        queue.close()
    assert all(reports.outcomes[parts].removed for parts in first + second)
    assert store.stats().instances == small_corpus.instances  # "b" holds the same instances: stored once


def test_a_file_written_again_after_it_was_queued_is_left_for_its_writer(open_store: Callable[..., Store],
                                                                         small_corpus: Corpus) -> None:
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    parts = _uploaded(area, small_corpus, "x")[:2]
    stamps = [area.stamp(p) for p in parts]
    path = area.path(parts[0])
    data = path.read_bytes()
    path.write_bytes(b"")  # a client writing it anew (Explorer's PUT under a lock) ...
    path.write_bytes(data[: len(data) // 2])  # ... and not done yet
    outcomes = area.ingest_many(store, parts, origin="webdav", stamps=stamps)
    assert outcomes[0] == UploadOutcome([], removed=False)  # untouched, no reason: not complete yet
    assert path.exists() and area.reason(path) is None
    assert outcomes[1].removed and store.stats().instances == 1
