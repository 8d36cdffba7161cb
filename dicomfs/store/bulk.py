"""Bulk ingest in worker processes: how a folder of small files goes in at disk speed.

Parsing, hashing and writing a blob cost ~0.4 ms of Python per small file. In one process the GIL
caps that near 2,500 files/s, and a committer thread waiting for the GIL after each syscall makes
it worse. So for many files, worker processes (one per CPU) each read a file, parse it, hash it,
and write its blob into a name the parent reserved beforehand as *pending* (so a kill at any
moment leaves nothing ``recover`` cannot clean). The parent lists the files and feeds the workers;
a thread of its own makes each batch durable with one ``syncfs`` and indexes it in one
transaction, so neither the workers nor the listing wait for the disk. A batch is what the workers
wrote while the previous one was being synced: when the disk is slow to flush (other writers on
it), batches grow and each ``syncfs`` and commit serves more files, instead of the workers waiting.

Workers are forked by multiprocessing's fork server, a fresh process that imports this module and
the program's modules once for all of them (see ``_preloaded``): forking the parent itself would
copy its open LMDB environment (which LMDB forbids using across ``fork``) and its threads, and
``spawn`` would import the program again in every worker (~0.2 s of CPU each, a tenth of a
10,000-file ingest here).

A worker shares its parent's owner lock (see ``owners``): it inherits the lock's descriptor, and
``flock`` belongs to the open file, so the writer counts as alive until its last process is gone.
A worker still writing a blob after its parent was killed therefore never races ``recover``; it
exits as soon as it sees its parent gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import reduction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from dicomfs.childprocess import importing_as_the_parent, leave_the_terminal_to_the_parent
from dicomfs.errors import RejectedFileError, StoreFullError
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
from dicomfs.store.inflate import Expansion
from dicomfs.store.records import Instance
from dicomfs.store.sources import Source, archive_members

__all__ = ["ingest_in_workers"]

_TASKS_PER_CALL = 128
"""Files per call to a worker: each call wakes the pool's threads in the parent (its manager thread
used 0.23 s of CPU for 10,000 files at 32 a call, 0.14 s at 128)."""
_BATCH_FACTOR = 32
"""Bulk batches hold at least ``ingest.batch_files`` files and at most this many times more
(or ``ingest.batch_bytes``): each batch costs a syncfs and a synced commit (5-700 ms here, with
other writers on the disk), and nobody waits on the first result of a bulk ingest."""
_CALLS_IN_FLIGHT = 8
"""Calls queued to the workers (1,024 files): enough to keep them busy while the parent's main
thread waits for the GIL, or for the sync of a full batch."""
_NAMES_RESERVED = 4096
"""Blob names kept reserved: each batch's index commit tops the stock up, so the listing never
waits for a commit of its own (one took 10-40 ms here, queued behind the index's write lock)."""

Outcome = Union[Candidate, IngestResult, Archive]
_Task = tuple[str, str, str, Union[bytes, None], str]
"""A file for a worker: its source's label, path, member and content, and the blob name to write
it into. A tuple: pickling dataclasses per file cost ~9 us between the two processes, this ~0.5 us."""


class _OwnerLock:
    """The descriptor of the writer's lock file, as it travels to a worker process: the worker
    keeps it open, so the writer's ``flock`` holds until the worker is gone too."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], _OwnerLock], tuple[Any]]:
        # DupFd hands the descriptor itself to the child (SCM_RIGHTS through the fork server).
        return _inherit_lock, (reduction.DupFd(self.fd),)


def _inherit_lock(duplicate: Any) -> _OwnerLock:
    return _OwnerLock(duplicate.detach())


class _Worker:
    """What one worker process keeps between calls: a read-only index, the blob store, and the
    owner lock it holds open while it lives."""

    def __init__(self, folder: Path, settings: WriteSettings, lock: _OwnerLock) -> None:
        self.index = Index(folder / "index", readonly=True)
        self.blobs = BlobStore(folder / "blobs")
        self.settings = settings
        self.lock = lock
        self.expansion = Expansion(settings.max_expanded_size, str(folder / "tmp"))

    def prepare(self, source: Source, blob: str, txn: Txn, origin: str, remote: str) -> Outcome:
        """Examine the file and write it into blob ``blob`` when it is to be stored."""
        try:
            with source.open(self.expansion) as (data, fd):
                found = examine(source, data, origin, remote, self.expansion)
                if not isinstance(found, Candidate):
                    return found
                existing = self.index.get(txn, found.ids[3])
                stored_sha = existing.sha256 if isinstance(existing, Instance) else None
                if settle_if_stored(found, stored_sha, self.settings.overwrite):
                    return found
                s = self.settings
                try:
                    found.stored_size = self.blobs.write(
                        blob, data, codec=s.codec, level=s.level, block_size=s.block_size,
                        header_length=found.header.header_length, source_fd=fd,
                    )
                except OSError as error:  # the store's disk, not the source: say so
                    return IngestResult(source.label, REJECTED, store_write_failure(error, self.blobs.root), retry=True)
                found.blob = blob
                return found
        except (OSError, RejectedFileError) as error:
            return unreadable(source, error)


_worker: _Worker | None = None


def _start_worker(folder: str, settings: WriteSettings, lock: _OwnerLock) -> None:
    global _worker
    threading.Thread(target=_exit_with_parent, name="dicomfs-parent-watch", daemon=True).start()
    leave_the_terminal_to_the_parent()
    _worker = _Worker(Path(folder), settings, lock)


def _preloaded() -> list[str]:
    """What the fork server imports before it forks a worker: this module and the dicomfs modules
    this process has loaded.

    A worker runs the program's script again, as ``spawn`` would, and with those modules in the
    server that costs nothing. Asking for ``__main__`` does nothing in Python 3.11: the server is
    never told the script's path.
    """
    loaded = (name for name in sys.modules if name.startswith("dicomfs.") and not name.endswith("__main__"))
    return ["dicomfs.store.bulk", *sorted(loaded)]


def _exit_with_parent() -> None:
    """End this worker once its parent is gone, killed or not: its pipe to the parent closes.

    The fork server, not the parent, is the worker's parent process, so ``PR_SET_PDEATHSIG``
    would wait for the server; and a worker waiting for calls from a dead parent would keep the
    owner's lock, and its blobs' pending marks, forever.
    """
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by a pool: nothing to watch
        return
    multiprocessing.connection.wait([parent.sentinel])
    os._exit(1)


def _prepare_all(tasks: list[_Task], origin: str, remote: str) -> list[Outcome]:
    assert _worker is not None
    with _worker.index.read() as txn:  # one snapshot per call: a transaction per file cost ~10 us
        return [_worker.prepare(Source(label, path, member, content), blob, txn, origin, remote)
                for label, path, member, content, blob in tasks]


def ingest_in_workers(
    committer: GroupCommitter, folder: Path, settings: WriteSettings, sources: Iterable[Source],
    *, origin: str, remote: str, workers: int,
) -> Iterator[IngestResult]:
    """Ingest ``sources`` with ``workers`` processes; yield results in source order, each durable."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_preloaded())  # takes effect when the server starts, at the first ingest
    names: list[str] = []
    in_flight: deque[tuple[Future[list[Outcome]], list[str]]] = deque()
    archives: deque[Source] = deque()  # members of archives found by the workers, offered first
    listed = iter(sources)

    def next_source() -> Source | None:
        return archives.popleft() if archives else next(listed, None)
    full: list[StoreFullError] = []
    most_files = settings.batch_files * _BATCH_FACTOR
    window = max(2 * workers, _CALLS_IN_FLIGHT)
    syncing: Future[tuple[list[IngestResult], list[str]]] | None = None  # the batch being synced and indexed
    with ThreadPoolExecutor(1, thread_name_prefix="dicomfs-bulk-syncer") as syncer, \
            ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                initargs=(str(folder), settings, _OwnerLock(committer.owner.lock_fd))) as pool:

        def refill() -> None:
            while len(in_flight) < window and not full:
                tasks: list[_Task] = []
                while len(tasks) < _TASKS_PER_CALL and (source := next_source()) is not None:
                    if not names:  # the reservation riding on index commits fell behind
                        try:
                            names.extend(committer.reserve_names(_NAMES_RESERVED))
                        except StoreFullError as error:  # not even names fit: the rest is refused
                            full.append(error)
                            archives.appendleft(source)
                            break
                    tasks.append((source.label, source.path, source.member, source.content, names.pop()))
                if not tasks:
                    return
                in_flight.append((pool.submit(_prepare_all, tasks, origin, remote), [t[4] for t in tasks]))

        def synced() -> list[IngestResult]:
            """Wait for the batch being synced; its results, with the names its commit reserved."""
            nonlocal syncing
            assert syncing is not None
            results, reserved = syncing.result()
            names.extend(reserved)
            syncing = None
            return results

        with importing_as_the_parent():
            multiprocessing.forkserver.ensure_running()  # its imports (~0.2 s) overlap the first reservation
        refill()
        batch: list[Candidate | IngestResult] = []
        batch_bytes = 0
        while in_flight or batch:
            if in_flight:
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
            # A batch is what the workers wrote while the previous one was being synced: when
            # syncfs is slow (other writers on the disk), batches grow and each sync serves more.
            if syncing is not None and (syncing.done() or not in_flight or len(batch) >= most_files
                                        or batch_bytes >= settings.batch_bytes):
                yield from synced()
            if syncing is None and batch and (len(batch) >= settings.batch_files or not in_flight):
                reserve = max(_NAMES_RESERVED - len(names), 0)
                if not in_flight:  # the last batch: its commit also clears the marks of unused names
                    committer.release_later(names)
                    names.clear()
                    reserve = 0
                syncing = syncer.submit(_index_durably, committer, batch, reserve)
                batch, batch_bytes = [], 0
        if syncing is not None:
            yield from synced()
    committer.release_later(names)
    if full:
        while (source := next_source()) is not None:
            yield IngestResult(source.label, REJECTED, str(full[0]))


def _index_durably(committer: GroupCommitter, batch: list[Candidate | IngestResult],
                   reserve: int) -> tuple[list[IngestResult], list[str]]:
    """Make a batch's blobs durable and index them; return the batch's results in order, and the
    ``reserve`` blob names the same commit marked pending (none if it failed)."""
    reserved = committer.commit_written([o for o in batch if isinstance(o, Candidate)], reserve=reserve)
    return [outcome.result() if isinstance(outcome, Candidate) else outcome for outcome in batch], reserved
