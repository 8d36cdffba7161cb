"""Group commit: many instances per write transaction, every acknowledged instance durable.

Callers (the ingest command's reader loop, FUSE and WebDAV upload handlers) parse a file and
``submit`` it; the committer takes what is queued, up to ``batch_files`` files or ``batch_bytes``
bytes, waiting at most ``batch_delay_ms`` for company (not at all after a submission marked
``last``: its caller has nothing more to give, so waiting would only add latency), and for the
whole batch:

1. in one transaction, decides what each file is (new, already stored, a replacement) and records
   the blob names it is about to write as *pending* (see ``owners``);
2. writes the blobs, compressed or not, on a pool of threads, with no fsync;
3. makes them all durable with one ``syncfs``;
4. in a second transaction indexes them, recycles if limits require, clears their pending marks
   and records the blobs that became garbage as pending;
5. deletes the garbage blobs, and only then acknowledges every file of the batch.

Steps 1-2 run on the *writer* thread and steps 3-5 on the *syncer* thread, so the next batch is
written while the disk flushes this one. A batch planned before the previous one was indexed may
write an instance that batch also held; step 4 sees it stored and frees the second blob.

A kill between any two steps leaves blobs that are pending for a dead owner, and ``recover``
removes them; nothing acknowledged is ever lost, because acknowledgement comes after step 4.
"""

from __future__ import annotations

import contextlib
import mmap
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from dicomfs.errors import StoreError, StoreFullError
from dicomfs.store.blobs import BlobStore, sync_filesystem
from dicomfs.store.candidates import REJECTED, REPLACED, STORED, Candidate, IngestResult, settle_if_stored, store_write_failure
from dicomfs.store.index import CachedIndex, Index, Txn
from dicomfs.store.mutations import NewInstance, TxnChanges, add_instance, apply_growth, make_room
from dicomfs.store.owners import Owner
from dicomfs.store.records import Instance
from dicomfs.store.settings import WriteSettings

__all__ = ["GroupCommitter", "Submission", "WriteSettings"]


@dataclass
class Submission:
    """A candidate waiting for the committer thread; it owns the open source until resolved."""

    candidate: Candidate
    data: bytes | mmap.mmap
    source_fd: int | None
    closer: contextlib.ExitStack
    future: Future[IngestResult] = field(default_factory=Future)
    last: bool = False
    """The caller has nothing more to submit now: the batch need not wait for company after it."""
    handed_over: bool = False
    """``source_fd``'s file is the store's once stored (``Source.handed_over``): it may become the blob."""

    @property
    def size(self) -> int:
        return self.candidate.size


@dataclass
class _Batch:
    """Submissions committed together, and their bytes counted against the queue's room."""

    items: list[Submission]
    size: int


class GroupCommitter:
    """The writer and syncer threads of one open store."""

    def __init__(self, index: Index, blobs: BlobStore, owner: Owner, store_folder: Path, settings: WriteSettings) -> None:
        self.index, self.blobs, self.owner, self.settings = index, blobs, owner, settings
        self.store_folder = store_folder
        self._queue: queue.Queue[Submission | None] = queue.Queue()
        self._queued_bytes = 0
        self._room = threading.Condition()
        self._released: list[str] = []  # deleted blobs whose pending marks are still to clear
        self._released_lock = threading.Lock()  # appended from callers', pool, writer and syncer threads
        self._stopping = False
        self._pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="dicomfs-blob-writer")
        # One written batch waits for the syncer at most: that bounds what is written but not durable.
        self._written: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self._writer_thread = threading.Thread(target=self._run_writer, name="dicomfs-writer", daemon=True)
        self._syncer_thread = threading.Thread(target=self._run_syncer, name="dicomfs-syncer", daemon=True)
        self._writer_thread.start()
        self._syncer_thread.start()

    def submit(self, submission: Submission) -> Future[IngestResult]:
        """Queue a parsed file; blocks while twice a batch's bytes are already waiting."""
        with self._room:
            while self._queued_bytes > 2 * self.settings.batch_bytes:
                self._room.wait()
            self._queued_bytes += submission.size
        self._queue.put(submission)
        return submission.future

    def close(self) -> None:
        """Finish what is queued, then stop both threads and clear this owner's released marks."""
        self._queue.put(None)
        self._writer_thread.join()
        self._syncer_thread.join()
        self._pool.shutdown()
        if self._released:
            try:
                with self._writing():
                    pass
            except StoreFullError:
                pass  # the blobs are gone; recovery clears their marks once this owner has left

    def release_later(self, blobs: Sequence[str]) -> None:
        """Blobs that are gone (or were never written): their pending marks go with the next commit."""
        with self._released_lock:
            self._released.extend(blobs)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Txn]:
        """A write transaction that also clears the marks of released blobs.

        Every write of this committer goes through here, so the marks ride along with work that
        commits anyway; if the transaction aborts, they are kept for the next one.
        """
        with self._released_lock:
            released, self._released = self._released, []
        try:
            with self.index.write() as txn:
                for blob in released:
                    self.index.remove_pending(txn, self.owner.token, blob)
                yield txn
        except BaseException:
            self.release_later(released)
            raise

    # -- the threads -------------------------------------------------------------------------

    def _run_writer(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    needs_index = self._plan_and_write(batch.items)
                except BaseException as error:  # the batch fails as a whole; each caller hears why
                    self._fail(batch, error)
                    continue
                if needs_index:
                    self._written.put(batch)
                else:
                    self._done(batch)
        finally:
            self._written.put(None)

    def _next_batch(self) -> _Batch | None:
        """Wait for a first submission, then gather company; None once ``close`` was called."""
        if self._stopping:
            return None
        first = self._queue.get()
        if first is None:
            return None
        batch = _Batch([first], first.size)
        deadline = time.monotonic() + self.settings.batch_delay
        while (not batch.items[-1].last and len(batch.items) < self.settings.batch_files
               and batch.size < self.settings.batch_bytes):
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if item is None:
                self._stopping = True
                break
            batch.items.append(item)
            batch.size += item.size
        return batch

    def _run_syncer(self) -> None:
        while (batch := self._written.get()) is not None:
            try:
                self.commit_written([item.candidate for item in batch.items])
                for item in batch.items:
                    item.future.set_result(item.candidate.result())
            except BaseException as error:
                self._fail(batch, error)
                continue
            self._done(batch)

    def _fail(self, batch: _Batch, error: BaseException) -> None:
        for item in batch.items:
            if not item.future.done():
                item.future.set_exception(error)
        self._done(batch)

    def _done(self, batch: _Batch) -> None:
        """Close the batch's sources and make room for senders."""
        for item in batch.items:
            item.closer.close()
        with self._room:
            self._queued_bytes -= batch.size
            self._room.notify_all()

    def _plan_and_write(self, batch: list[Submission]) -> bool:
        """Steps 1-2; False when the whole batch was refused before anything was written."""
        try:
            to_write = self._plan(batch)
        except StoreFullError as error:  # not even the pending marks fit: nothing was written
            for item in batch:
                item.candidate.outcome, item.candidate.reason, item.candidate.retry = REJECTED, str(error), True
                item.future.set_result(item.candidate.result())
            return False
        self._write_blobs(to_write)
        return True

    def _plan(self, batch: list[Submission]) -> list[Submission]:
        """Step 1: decide each file's fate; mark the blobs about to be written as pending."""
        to_write: list[Submission] = []
        seen: dict[str, Candidate] = {}
        with self._writing() as txn:
            for item in batch:
                candidate = item.candidate
                earlier = seen.get(candidate.ids[3])
                existing = self.index.get(txn, candidate.ids[3])
                stored_sha = earlier.sha256 if earlier is not None else (existing.sha256 if isinstance(existing, Instance) else None)
                if settle_if_stored(candidate, stored_sha, self.settings.overwrite):
                    continue
                candidate.blob = self.blobs.new_name()
                self.index.add_pending(txn, self.owner.token, candidate.blob)
                seen[candidate.ids[3]] = candidate
                to_write.append(item)
        return to_write

    def _write_blobs(self, items: list[Submission]) -> None:
        """Step 2: write the blobs, on the pool (writes, zlib and zstd release the GIL), or link
        the handed-over files that need no change (quicker than a hand-over to the pool)."""
        s = self.settings

        def failed(c: Candidate, error: OSError) -> None:  # nothing was left behind; the name's pending mark goes later
            c.outcome, c.reason, c.retry = REJECTED, store_write_failure(error, self.blobs.root), True
            self.release_later([c.blob])
            c.blob = ""

        def write(item: Submission) -> None:
            c = item.candidate
            try:
                c.stored_size = self.blobs.write(
                    c.blob, item.data, codec=s.codec, level=s.level, block_size=s.block_size,
                    header_length=c.header.header_length, source_fd=item.source_fd,
                )
            except OSError as error:
                failed(c, error)

        to_write: list[Submission] = []
        for item in items:
            linked = None
            if item.handed_over and item.source_fd is not None and s.codec == "none":
                try:
                    linked = self.blobs.adopt(item.candidate.blob, item.source_fd, len(item.data))
                except OSError as error:
                    failed(item.candidate, error)
                    continue
            if linked is None:
                to_write.append(item)
            else:
                item.candidate.stored_size = linked
        list(self._pool.map(write, to_write))

    def reserve_names(self, count: int) -> list[str]:
        """Blob names marked pending in one commit, for workers to write into later."""
        names = self.blobs.new_names(count)
        with self._writing() as txn:
            for name in names:
                self.index.add_pending(txn, self.owner.token, name)
        return names

    def commit_written(self, candidates: list[Candidate], *, reserve: int = 0) -> list[str]:
        """Steps 3-5 for candidates whose blobs are written: sync, index, free the garbage.

        Used by the syncer thread and by bulk ingest, whose workers wrote the blobs themselves.
        With ``reserve``, the index commit also marks that many new blob names pending (as
        ``reserve_names`` does, without a commit of its own) and returns them; none when it failed.
        """
        if any(c.blob for c in candidates):
            sync_filesystem(self.store_folder)
        names = self.blobs.new_names(reserve)
        garbage, committed = self._index_batch(candidates, names)
        self._finish(garbage)
        return names if committed else []

    def _index_batch(self, candidates: list[Candidate], reserve: list[str]) -> tuple[list[str], bool]:
        """Step 4: index candidates whose blobs are durable, and mark the names ``reserve`` pending;
        returns the blobs that became garbage, and whether the commit succeeded.

        Candidates without a blob were settled before writing and are left as they are.
        """
        changes = TxnChanges()
        index = CachedIndex(self.index)
        try:
            with self._writing() as txn:
                self._index_candidates(index, txn, candidates, changes)
                for name in reserve:
                    index.add_pending(txn, self.owner.token, name)
        except StoreFullError as error:
            # Nothing of the batch reached the index: its files are rejected and their blobs freed
            # (their pending marks go with the next commit that succeeds).
            garbage = [c.blob for c in candidates if c.blob]
            for candidate in candidates:
                if candidate.blob:
                    candidate.outcome, candidate.reason, candidate.blob, candidate.retry = REJECTED, str(error), "", True
            return garbage, False
        except Exception as error:  # whatever one file did, the others must not pay for it
            return self._index_one_by_one(candidates, error), False
        return changes.garbage, True

    def _index_one_by_one(self, candidates: list[Candidate], error: Exception) -> list[str]:
        """After a group's index commit failed: index each of its files in a commit of its own, so
        only the file that broke the group (a value the index cannot take, which the parser's
        checks should have refused already) is rejected; returns the blobs that became garbage.
        The names the group was to reserve are not reserved (its callers reserve them again)."""
        written = [c for c in candidates if c.blob]
        if len(written) == 1:
            (candidate,) = written
            garbage = [candidate.blob]
            candidate.outcome, candidate.blob = REJECTED, ""
            candidate.reason = f"rejected: could not be indexed ({type(error).__name__}: {str(error)[:120]})"
            candidate.retry = isinstance(error, StoreError)  # the store failed, not the file
            return garbage
        garbage = []
        for candidate in written:
            candidate.outcome, candidate.reason, candidate.retry = "", "", False  # undo what the aborted commit decided
            garbage += self._index_batch([candidate], [])[0]
        return garbage

    def _index_candidates(self, index: CachedIndex, txn: Txn, candidates: list[Candidate], changes: TxnChanges) -> None:
        for item in candidates:
            if not item.blob:
                continue
            index.remove_pending(txn, self.owner.token, item.blob)
            existing = index.get(txn, item.ids[3])
            replacing = existing if isinstance(existing, Instance) else None
            if replacing is not None and settle_if_stored(item, replacing.sha256, self.settings.overwrite):
                changes.garbage.append(item.blob)  # another writer stored it meanwhile
                continue
            try:
                growth = item.size - (replacing.size if replacing else 0)
                make_room(index, txn, self.settings.limits, growth, item.ids[0], changes)
            except StoreFullError as error:
                item.outcome, item.reason, item.retry = REJECTED, str(error), True
                changes.garbage.append(item.blob)
                continue
            add_instance(index, txn, NewInstance(
                item.header, item.ids, item.sha256, item.size, item.stored_size, item.blob,
                self.settings.codec, item.origin, item.remote), changes, replacing)
            item.outcome = REPLACED if replacing else STORED
        apply_growth(index, txn, changes)
        for blob in changes.garbage:
            index.add_pending(txn, self.owner.token, blob)
        if changes.log:
            index.log_changes(txn, changes.log)
        index.flush(txn)

    def _finish(self, garbage: list[str]) -> None:
        """Step 5: delete the blobs a durable commit made garbage; their marks go next commit."""
        for blob in garbage:
            self.blobs.remove(blob)
        self.release_later(garbage)
