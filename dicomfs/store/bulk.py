"""Bulk ingest in worker processes: how a folder of small files goes in at disk speed.

Parsing, hashing and writing a blob cost ~0.4 ms of Python per small file. In one process the GIL
caps that near 2,500 files/s, and a committer thread waiting for the GIL after each syscall makes
it worse. So for many files, worker processes (one per CPU) each read a file, parse it, hash it,
and write its blob into a name the parent reserved beforehand as *pending* (so a kill at any
moment leaves nothing ``recover`` cannot clean). The parent lists the files and feeds the workers;
a thread of its own makes each batch durable with one ``syncfs`` and indexes it in one
transaction, so neither the workers nor the listing wait for the disk.

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
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Union

from dicomfs.errors import StoreFullError
from dicomfs.store.blobs import BlobStore
from dicomfs.store.candidates import (
    REJECTED,
    Archive,
    Candidate,
    IngestResult,
    examine,
    settle_if_stored,
    store_write_failure,
    unreadable,
)
from dicomfs.store.committer import GroupCommitter, WriteSettings
from dicomfs.store.index import Index, Txn
from dicomfs.store.records import Instance
from dicomfs.store.sources import Source, archive_members

__all__ = ["ingest_in_workers"]

_TASKS_PER_CALL = 32
"""Files per call to a worker: one call costs ~0.1 ms of pickling and queueing in the parent."""
_BATCH_FACTOR = 4
"""Bulk batches are this many times ``ingest.batch_files``: each batch costs a syncfs and a
synced commit (~20 ms here), and nobody waits on the first result of a bulk ingest."""
_NAMES_RESERVED = 1024
"""Blob names reserved per commit."""
_PR_SET_PDEATHSIG = 1

Outcome = Union[Candidate, IngestResult, Archive]


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

    def prepare(self, task: _Task, txn: Txn) -> Candidate | IngestResult | Archive:
        """Examine the file and write its blob into the task's name when it is to be stored."""
        source = task.source
        try:
            with source.open() as (data, fd):
                found = examine(source, data, task.origin, task.remote)
                if not isinstance(found, Candidate):
                    return found
                existing = self.index.get(txn, found.ids[3])
                stored_sha = existing.sha256 if isinstance(existing, Instance) else None
                if settle_if_stored(found, stored_sha, self.settings.overwrite):
                    return found
                s = self.settings
                try:
                    found.stored_size = self.blobs.write(
                        task.blob, data, codec=s.codec, level=s.level, block_size=s.block_size,
                        header_length=found.header.header_length, source_fd=fd,
                    )
                except OSError as error:  # the store's disk, not the source: say so
                    return IngestResult(source.label, REJECTED, store_write_failure(error, self.blobs.root), retry=True)
                found.blob = task.blob
                return found
        except OSError as error:
            return unreadable(source, error)


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


def _prepare_all(tasks: list[_Task]) -> list[Outcome]:
    assert _worker is not None
    with _worker.index.read() as txn:  # one snapshot per call: a transaction per file cost ~10 us
        return [_worker.prepare(task, txn) for task in tasks]


def ingest_in_workers(
    committer: GroupCommitter, folder: Path, settings: WriteSettings, sources: Iterable[Source],
    *, origin: str, remote: str, workers: int,
) -> Iterator[IngestResult]:
    """Ingest ``sources`` with ``workers`` processes; yield results in source order, each durable."""
    context = multiprocessing.get_context("spawn")
    names: list[str] = []
    in_flight: deque[tuple[Future[list[Outcome]], list[str]]] = deque()
    archives: deque[Source] = deque()  # members of archives found by the workers, offered first
    listed = iter(sources)

    def next_source() -> Source | None:
        return archives.popleft() if archives else next(listed, None)
    full: list[StoreFullError] = []
    batch_files = settings.batch_files * _BATCH_FACTOR
    # Two batches in flight: the workers keep parsing while the parent syncs and indexes one.
    window = max(2 * workers, 2 * batch_files // _TASKS_PER_CALL)
    durable: deque[Future[list[IngestResult]]] = deque()  # batches being synced and indexed
    with ThreadPoolExecutor(1, thread_name_prefix="dicomfs-bulk-syncer") as syncer, \
            ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
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
        batch_bytes = 0
        while in_flight:
            future, blob_names = in_flight.popleft()
            refill()
            for outcome, name in zip(future.result(), blob_names):
                if isinstance(outcome, Candidate) and outcome.blob:
                    batch_bytes += outcome.size
                else:
                    committer.release_later([name])  # nothing was written under it
                if isinstance(outcome, Archive):
                    archives.extend(archive_members(outcome.source.path))
                    refill()
                else:
                    batch.append(outcome)
            while durable and durable[0].done():
                yield from durable.popleft().result()
            if len(batch) >= batch_files or batch_bytes >= settings.batch_bytes or not in_flight:
                while durable:  # one batch syncs while the next one is written
                    yield from durable.popleft().result()
                durable.append(syncer.submit(_index_durably, committer, batch))
                batch, batch_bytes = [], 0
        while durable:
            yield from durable.popleft().result()
    committer.release_later(names)
    if full:
        while (source := next_source()) is not None:
            yield IngestResult(source.label, REJECTED, str(full[0]))


def _index_durably(committer: GroupCommitter, batch: list[Candidate | IngestResult]) -> list[IngestResult]:
    """Make a batch's blobs durable, index them, and return the batch's results in order."""
    committer.commit_written([o for o in batch if isinstance(o, Candidate)])
    return [outcome.result() if isinstance(outcome, Candidate) else outcome for outcome in batch]
