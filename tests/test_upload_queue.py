"""The uploads queue and its ingest process, with a real store and real files in uploads/."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import pytest

from dicomfs.samples import Corpus
from dicomfs.store import Store
from dicomfs.store.candidates import IngestResult
from dicomfs.store.check import check_store
from dicomfs.store.sources import Source
from dicomfs.upload_queue import UploadQueue
from dicomfs.uploads import UploadArea, UploadOutcome
from tests.conftest import write_own_instance


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
    # the helper's own log lines reach this process's logging: one for each file that needs a look
    # (here: a second copy of an instance, kept out); the groups' lines are DEBUG (the copy's one
    # total is test_upload_summary's)
    lines = [record.getMessage() for record in caplog.records]
    assert not [line for line in lines if re.match(r"uploads/cd/: \d+ files?: ", line)]
    remarks = [line for line in lines if re.match(r"uploads/cd/\d+\.dcm: ", line)]
    assert remarks and all("other bytes" in line for line in remarks)
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


def _own_instances(folder: Path, count: int, *, size: int = 16) -> list[Path]:
    """``count`` valid instances with UIDs of their own, written into ``folder``."""
    return [write_own_instance(folder / f"i{index:03d}.dcm", index, patient="ADOPT", series="1.2.826.0.1.3680043.10.9.1",
                               pixels=size) for index in range(1, count + 1)]


def _blob_inode(store: Store, result: IngestResult) -> tuple[int, bytes]:
    with store.open_instance(result.ids[3]) as reader:
        return os.fstat(reader.fd).st_ino, b"".join(reader.iter_chunks())


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_an_ingested_upload_becomes_its_blob_and_a_file_from_elsewhere_is_copied(open_store: Callable[..., Store],
                                                                                 tmp_path: Path, codec: str) -> None:
    """What uploads/ holds is the store's once complete (the front ends never change it in place
    after that): an instance stored from there is linked into blobs/ rather than copied. A file
    ingested from anywhere else is the user's own, and is always copied: changing it later must
    never change the store. A compressed store writes its own blocks either way."""
    store = open_store(codec=codec)
    area = UploadArea(store.folder / "uploads")
    uploaded = _own_instances(area.path(("x",)), 3, size=300)  # 180 kB: past the kernel-copy threshold too
    inodes = [path.stat().st_ino for path in uploaded]
    originals = [path.read_bytes() for path in uploaded]
    outcomes = area.ingest_many(store, [("x", path.name) for path in uploaded], origin="webdav")
    for outcome, inode, original in zip(outcomes, inodes, originals, strict=True):
        assert outcome.removed and [r.status for r in outcome.results] == ["stored"]
        blob_inode, content = _blob_inode(store, outcome.results[0])
        assert content == original
        assert (blob_inode == inode) == (codec == "none")
    [own] = _own_instances(tmp_path / "mine", 4)[3:]
    [result] = store.ingest([own])
    assert result.status == "stored"
    blob_inode, content = _blob_inode(store, result)
    assert blob_inode != own.stat().st_ino and content == own.read_bytes()
    assert check_store(store).clean


def test_an_upload_that_cannot_be_linked_is_copied(open_store: Callable[..., Store]) -> None:
    """Handed over from another file system (no hard link can cross one), the file is copied."""
    shm = Path("/dev/shm")
    store = open_store()
    if not shm.is_dir() or shm.stat().st_dev == store.folder.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    folder = shm / f"dicomfs-test-{os.getpid()}"
    try:
        [path] = _own_instances(folder, 1)
        [result] = store.ingest_sources([Source(str(path), str(path), handed_over=True)], in_process=True)
        assert result.status == "stored"
        blob_inode, content = _blob_inode(store, result)
        assert content == path.read_bytes() and blob_inode != path.stat().st_ino
        assert check_store(store).clean
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_upload_line_says_rejected_once(open_store: Callable[..., Store], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A reason that already says "rejected: ..." is not wrapped in "rejected (...)" again; one that
    says something else (not DICOM, truncated) keeps the status in front of it."""
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    bad_uid = area.root / "bad-uid.dcm"
    write_own_instance(bad_uid, 0, patient="UPLOAD", series="1.2.826.0.1.3680043.10.96.1.1")
    bad_uid.write_bytes(bad_uid.read_bytes().replace(b"1.2.826.0.1.3680043.10.96.1.1", b"1.2.826.0.1.3680043.10.96.1.x"))
    (area.root / "text.dcm").write_bytes(b"not an image\n")
    with caplog.at_level(logging.INFO):
        area.ingest_many(store, [("bad-uid.dcm",), ("text.dcm",)], origin="fuse")
    lines = {line.split(": ", 1)[0]: line for line in (record.getMessage() for record in caplog.records)}
    assert lines["uploads/bad-uid.dcm"].startswith("uploads/bad-uid.dcm: rejected: SOPInstanceUID is not a UID"), lines
    assert lines["uploads/text.dcm"].startswith("uploads/text.dcm: rejected (not DICOM"), lines
