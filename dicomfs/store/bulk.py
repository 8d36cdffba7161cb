"""Bulk ingest in worker processes: how a folder of small files goes in at disk speed.

Parsing, hashing and writing a blob cost ~0.4 ms of Python per small file. In one process the GIL
caps that near 2,500 files/s, and a committer thread waiting for the GIL after each syscall makes
it worse. So for many files, worker processes (one per CPU) each read a file, parse it, hash it,
and write its blob into a name the parent reserved beforehand as *pending* (so a kill at any
moment leaves nothing ``recover`` cannot clean). The parent only makes each batch durable with
one ``syncfs`` and indexes it in one transaction, while the workers go on with the next files.

Workers start with ``spawn``: a forked child would inherit the parent's open LMDB environment,
which LMDB forbids using across ``fork``. Each worker dies with its parent (``PR_SET_PDEATHSIG``),
so no orphaned worker writes a blob after recovery has run.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

from dicomfs.errors import NotDicomError, RejectedFileError, StoreFullError
from dicomfs.store.blobs import BlobStore, sync_filesystem
from dicomfs.store.committer import store_write_failure
from dicomfs.store.committer import (
    DICOMDIR_REASON,
    REJECTED,
    SKIPPED,
    Candidate,
    GroupCommitter,
    IngestResult,
    WriteSettings,
    settle_if_stored,
)
from dicomfs.store.dicomparse import parse_header
from dicomfs.store.index import Index
from dicomfs.store.records import Instance
from dicomfs.store.sources import Source, archive_members, is_archive

__all__ = ["ingest_in_workers"]

_TASKS_PER_CALL = 32
"""Files per call to a worker: one call costs ~0.1 ms of pickling and queueing in the parent."""
_BATCH_FACTOR = 4
"""Bulk batches are this many times ``ingest.batch_files``: each batch costs a syncfs and a
synced commit (~20 ms here), and nobody waits on the first result of a bulk ingest."""
_NAMES_RESERVED = 1024
"""Blob names reserved per commit."""
_PR_SET_PDEATHSIG = 1

@dataclass(frozen=True)
class _Archive:
    """A worker's answer for a zip archive: the parent lists its members and ingests those."""

    source: Source


Outcome = Union[Candidate, IngestResult, _Archive]


@dataclass(frozen=True)
class _Task:
    source: Source
    blob: str
    origin: str
    remote: str


class _Worker:
    """What one worker process keeps between calls: a read-only index and the blob store."""

    def __init__(self, folder: Path, settings: WriteSettings) -> None:
        self.index = Index(folder / "index", readonly=True)
        self.blobs = BlobStore(folder / "blobs")
        self.settings = settings

    def prepare(self, task: _Task) -> tuple[Outcome, bool]:
        """Parse the file and write its blob; returns the outcome and whether the name was used."""
        source = task.source
        try:
            with source.open() as (data, fd):
                try:
                    header = parse_header(data)
                except RejectedFileError as error:
                    if isinstance(error, NotDicomError) and is_archive(data, source):
                        return _Archive(source), False
                    return IngestResult(source.label, REJECTED, str(error)), False
                if header.is_dicomdir:
                    return IngestResult(source.label, SKIPPED, DICOMDIR_REASON), False
                candidate = Candidate.of(source.label, header, data, task.origin, task.remote)
                with self.index.read() as txn:
                    existing = self.index.get(txn, candidate.ids[3])
                stored_sha = existing.sha256 if isinstance(existing, Instance) else None
                if settle_if_stored(candidate, stored_sha, self.settings.overwrite):
                    return candidate, False
                s = self.settings
                try:
                    candidate.stored_size = self.blobs.write(
                        task.blob, data, codec=s.codec, level=s.level, block_size=s.block_size,
                        header_length=header.header_length, source_fd=fd,
                    )
                except OSError as error:  # the store's disk, not the source: say so
                    return IngestResult(source.label, REJECTED, store_write_failure(error, self.blobs.root)), False
                candidate.blob = task.blob
                return candidate, True
        except OSError as error:
            return IngestResult(source.label, REJECTED, f"unreadable: {error.strerror or error}"), False


_worker: _Worker | None = None


def _start_worker(parent: int, folder: str, settings: WriteSettings) -> None:
    global _worker
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Results travel through the pool's pipes; holding the parent's stdout would keep a reader of
    # the command's output (a script, a test) waiting after the command itself has ended.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    _worker = _Worker(Path(folder), settings)


def _prepare_all(tasks: list[_Task]) -> list[tuple[Outcome, bool]]:
    assert _worker is not None
    return [_worker.prepare(task) for task in tasks]


def ingest_in_workers(
    committer: GroupCommitter, folder: Path, settings: WriteSettings, sources: Iterable[Source],
    *, origin: str, remote: str, workers: int,
) -> Iterator[IngestResult]:
    """Ingest ``sources`` with ``workers`` processes; yield results in source order, each durable."""
    context = multiprocessing.get_context("spawn")
    names: list[str] = []
    in_flight: deque[tuple[Future[list[tuple[Outcome, bool]]], list[str]]] = deque()
    archives: deque[Source] = deque()  # members of archives found by the workers, offered first
    listed = iter(sources)

    def next_source() -> Source | None:
        return archives.popleft() if archives else next(listed, None)
    full: list[StoreFullError] = []
    batch_files = settings.batch_files * _BATCH_FACTOR
    # Two batches in flight: the workers keep parsing while the parent syncs and indexes one.
    window = max(2 * workers, 2 * batch_files // _TASKS_PER_CALL)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), str(folder), settings)) as pool:

        def refill() -> None:
            while len(in_flight) < window and not full:
                tasks: list[_Task] = []
                while len(tasks) < _TASKS_PER_CALL and (source := next_source()) is not None:
                    if not names:
                        try:
                            names.extend(committer.reserve_names(_NAMES_RESERVED))
                        except StoreFullError as error:  # not even names fit: the rest is refused
                            full.append(error)
                            archives.appendleft(source)
                            break
                    tasks.append(_Task(source, names.pop(), origin, remote))
                if not tasks:
                    return
                in_flight.append((pool.submit(_prepare_all, tasks), [t.blob for t in tasks]))

        refill()
        batch: list[Candidate | IngestResult] = []
        unused: list[str] = []
        batch_bytes = 0
        while in_flight:
            future, blob_names = in_flight.popleft()
            refill()
            for (outcome, used), name in zip(future.result(), blob_names):
                if isinstance(outcome, _Archive):
                    archives.extend(archive_members(outcome.source.path))
                    unused.append(name)
                    refill()
                    continue
                batch.append(outcome)
                if used:
                    batch_bytes += outcome.size
                else:
                    unused.append(name)
            if len(batch) >= batch_files or batch_bytes >= settings.batch_bytes or not in_flight:
                yield from _commit(committer, folder, batch, unused)
                batch, unused, batch_bytes = [], [], 0
    if names:
        committer.forget_names(names)
    if full:
        while (source := next_source()) is not None:
            yield IngestResult(source.label, REJECTED, str(full[0]))


def _commit(committer: GroupCommitter, folder: Path, batch: list[Candidate | IngestResult], unused: list[str]) -> Iterator[IngestResult]:
    candidates = [o for o in batch if isinstance(o, Candidate)]
    if any(c.blob for c in candidates):
        sync_filesystem(folder)
    committer.finish(committer.index_batch(candidates, unused_names=unused))
    for outcome in batch:
        yield outcome.result() if isinstance(outcome, Candidate) else outcome
