"""Jobs kept in the store folder, in an LMDB environment of their own (``<store>/jobs``).

Four tables: ``jobs`` (id -> the job as JSON), ``items`` (``<job id>\\0<item>`` -> its state,
size and failure reason), ``pending`` (the same keys, for the items still to do) and ``meta``
(the router's cursor). Every change is one write transaction, so a job and its items never disagree
and several processes (the mount, the bridge, ``dicomfs worker``, the CLI) can share them: the one
that *claims* a job takes a lease on it, renews it while working, and only the lease holder may
record progress. A runner that died loses its lease when it runs out and another takes the job
over, resuming with the items still pending: what a destination acknowledged is never sent again.

A separate environment, not the index: jobs come and go at a different pace from the DICOM
index, and the index's check and format stay about DICOM.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import lmdb

from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.jobs.model import FINAL, Job, JobState

if TYPE_CHECKING:
    from dicomfs.store import Store

__all__ = ["JobStateError", "JobStore", "LeaseLostError", "open_jobs"]

_MAP_SIZE = 4 << 30  # address space only
_PENDING, _DONE, _FAILED = b"P", b"D", b"F"
_SIZE = struct.Struct(">Q")


class JobStateError(DicomfsError):
    """The job is not in a state that allows this (e.g. resuming a finished job)."""

    http_status = 409


class LeaseLostError(DicomfsError):
    """Another runner holds the job now (this one's lease ran out): stop working on it."""


class JobStore:
    """The jobs of one store."""

    def __init__(self, folder: Path, *, clock: Callable[[], float] = time.time) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(folder), map_size=_MAP_SIZE, max_dbs=4, subdir=True)
        self._jobs = self._env.open_db(b"jobs")
        self._items = self._env.open_db(b"items")
        self._pending = self._env.open_db(b"pending")
        self._meta = self._env.open_db(b"meta")
        self._clock = clock

    def close(self) -> None:
        self._env.close()

    # -- reading ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._env.begin(db=self._jobs) as txn:
            return self._load(txn, job_id)

    def all(self) -> list[Job]:
        """Every job, oldest first."""
        with self._env.begin(db=self._jobs) as txn:
            return [Job.from_json(json.loads(bytes(value))) for _, value in txn.cursor()]

    def change_token(self) -> int:
        """Moves whenever any job changes (the views' jobs/ folder refreshes on it)."""
        return int(self._env.info()["last_txnid"])

    def pending_items(self, job_id: str, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` items still to do, as (item, size), in creation order.

        From an index of the pending items only: each step of a 20,000-item export would
        otherwise read past every item already done (67 ms a step, measured)."""
        prefix = job_id.encode() + b"\0"
        found: list[tuple[str, int]] = []
        with self._env.begin(db=self._pending) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix):
                return found
            for raw_key, raw_value in cursor:
                key = bytes(raw_key)
                if not key.startswith(prefix) or len(found) >= limit:
                    break
                found.append((key[len(prefix):].decode(), _SIZE.unpack(bytes(raw_value))[0]))
        return found

    def failures(self, job_id: str) -> list[tuple[str, str]]:
        """(item, reason) of every failed item."""
        return [(item, reason) for item, state, _, reason in self._scan(job_id) if state == _FAILED]

    def report(self, job: Job, *, most_failures: int | None = None) -> dict[str, Any]:
        """The job as people read it (``dicomfs jobs show``, ``jobs/<id>.json``): its JSON form and
        its failed items with their reasons, the first ``most_failures`` of them."""
        data = job.as_json()
        # Only a job with failures has items worth reading: a big export that went well has
        # thousands, and jobs/ makes the report of every job to show its size.
        failures = self.failures(job.id) if job.failed_items else []
        shown = failures if most_failures is None else failures[:most_failures]
        data["failures"] = [{"item": item, "reason": reason} for item, reason in shown]
        if len(shown) < len(failures):
            data["failures_not_shown"] = len(failures) - len(shown)
        return data

    def _scan(self, job_id: str) -> Iterator[tuple[str, bytes, int, str]]:
        prefix = job_id.encode() + b"\0"
        with self._env.begin(db=self._items) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix):
                return
            for raw_key, raw_value in cursor:
                key, value = bytes(raw_key), bytes(raw_value)
                if not key.startswith(prefix):
                    return
                yield (key[len(prefix):].decode(), value[:1], _SIZE.unpack_from(value, 1)[0],
                       value[1 + _SIZE.size:].decode("utf-8", "replace"))

    # -- creating and steering -------------------------------------------------------------------

    def create(self, kind: str, params: dict[str, object], items: Iterable[tuple[str, int]], description: str) -> Job:
        """A new pending job over ``items`` (item, size); an item listed twice counts once."""
        with self._env.begin(write=True) as txn:
            return self._create_in(txn, kind, params, items, description)

    def meta(self, name: str) -> Any:
        """A small JSON value kept with the jobs (the router's cursor), or None."""
        with self._env.begin(db=self._meta) as txn:
            value = txn.get(name.encode())
        return json.loads(bytes(value)) if value is not None else None

    def create_with_meta(self, jobs: Sequence[tuple[str, dict[str, object], list[tuple[str, int]], str]], name: str,
                         state: dict[str, Any], *, expected_cursor: int) -> list[Job]:
        """Create ``jobs`` and save ``state`` as meta ``name`` in one transaction, unless another
        process moved the meta's cursor since it was read (then nothing happens: it routed first)."""
        with self._env.begin(write=True) as txn:
            current = txn.get(name.encode(), db=self._meta)
            if current is not None and json.loads(bytes(current)).get("cursor") != expected_cursor:
                return []
            created = [self._create_in(txn, *job) for job in jobs]
            txn.put(name.encode(), json.dumps(state).encode(), db=self._meta)
            return created

    def _create_in(self, txn: lmdb.Transaction, kind: str, params: dict[str, object], items: Iterable[tuple[str, int]],
                   description: str) -> Job:
        now = self._clock()
        job = Job(id=_new_id(now), kind=kind, params=dict(params), description=description, created=now, updated=now)
        seen: set[str] = set()
        for item, size in items:
            if item in seen:
                continue
            seen.add(item)
            txn.put(_item_key(job.id, item), _PENDING + _SIZE.pack(size), db=self._items)
            txn.put(_item_key(job.id, item), _SIZE.pack(size), db=self._pending)
            job.total_items += 1
            job.total_bytes += size
        if not job.total_items:
            job.state, job.finished = JobState.SUCCESS, now  # nothing to do is done
        self._save(txn, job)
        return job

    def pause(self, job_id: str) -> Job:
        return self._steer(job_id, {JobState.PENDING, JobState.RUNNING}, JobState.PAUSED, "pause")

    def resume(self, job_id: str) -> Job:
        return self._steer(job_id, {JobState.PAUSED}, JobState.PENDING, "resume")

    def cancel(self, job_id: str) -> Job:
        return self._steer(job_id, {JobState.PENDING, JobState.RUNNING, JobState.PAUSED}, JobState.CANCELED, "cancel")

    def retry(self, job_id: str) -> Job:
        """Run a failed or canceled job again: its failed items become pending; done ones stay done."""
        with self._env.begin(write=True) as txn:
            job = self._load(txn, job_id)
            if job.state not in (JobState.FAILURE, JobState.CANCELED):
                raise JobStateError(f"job {job_id} is {job.state.value}: only failed or canceled jobs can be retried")
            prefix = job_id.encode() + b"\0"
            cursor = txn.cursor(db=self._items)
            if cursor.set_range(prefix):
                for raw_key, raw_value in list(cursor):
                    key, value = bytes(raw_key), bytes(raw_value)
                    if not key.startswith(prefix):
                        break
                    if value[:1] == _FAILED:
                        txn.put(key, _PENDING + value[1:1 + _SIZE.size], db=self._items)
                        txn.put(key, value[1:1 + _SIZE.size], db=self._pending)
            job.failed_items = 0
            job.extra.pop("first_failure", None)
            job.state, job.attempts, job.next_attempt, job.last_error, job.finished = JobState.PENDING, 0, 0.0, "", 0.0
            job.lease_owner, job.lease_until, job.waiting_for = "", 0.0, ""
            self._save(txn, job)
        return job

    def _steer(self, job_id: str, allowed: set[JobState], target: JobState, verb: str) -> Job:
        with self._env.begin(write=True) as txn:
            job = self._load(txn, job_id)
            if job.state not in allowed:
                raise JobStateError(f"job {job_id} is {job.state.value}: cannot {verb} it")
            job.state = target
            if target in FINAL:
                job.finished = self._clock()
            if target is JobState.PENDING:
                job.next_attempt, job.waiting_for = 0.0, ""
            # A running job's lease stays with its runner, which sees the new state at its next
            # renewal and stops between two requests.
            self._save(txn, job)
        return job

    # -- running ---------------------------------------------------------------------------------

    def claim(self, owner: str, lease: float, eligible: Callable[[Job], str | None] = lambda job: None,
              only: str | None = None) -> Job | None:
        """Take the oldest job a runner may start now, with a lease of ``lease`` seconds.

        ``eligible`` returns why a job must wait (its destination's schedule window), or None.
        Pending jobs due now qualify, and running ones whose runner's lease ran out; ``only``
        limits the choice to one job (``dicomfs export --wait`` runs just its own).
        """
        now = self._clock()
        # Look first in a read transaction: an idle runner polls every second, and a write
        # transaction (a commit, an fsync, a new change token for every jobs/ view) each time
        # would be paid for nothing.
        with self._env.begin(db=self._jobs) as txn:
            due = [job.id for job in (Job.from_json(json.loads(bytes(v))) for _, v in txn.cursor()) if _due(job, now, only)]
        if not due:
            return None
        with self._env.begin(write=True) as txn:
            for job_id in due:
                job = self._load(txn, job_id)
                if not _due(job, now, only):  # another runner took it meanwhile
                    continue
                waiting = eligible(job)
                if waiting is not None:
                    if job.waiting_for != waiting:
                        job.waiting_for = waiting
                        self._save(txn, job)
                    continue
                job.state, job.lease_owner, job.lease_until, job.waiting_for = JobState.RUNNING, owner, now + lease, ""
                job.started = job.started or now
                self._save(txn, job)
                return job
        return None

    def renew(self, job_id: str, owner: str, lease: float) -> Job:
        """Extend the lease; returns the job as it stands (paused or canceled meanwhile, perhaps)."""
        with self._env.begin(write=True) as txn:
            job = self._held(txn, job_id, owner)
            if job.state is JobState.RUNNING:
                job.lease_until = self._clock() + lease
                self._save(txn, job)
            return job

    def record(self, job_id: str, owner: str, done: Iterable[str] = (), failed: Iterable[tuple[str, str]] = (),
               counters: Mapping[str, int] | None = None) -> Job:
        """Items acknowledged by the destination, and items that failed for good (with why);
        ``counters`` are added to the job's ``extra`` (e.g. bytes on the wire), in the same transaction."""
        with self._env.begin(write=True) as txn:
            job = self._held(txn, job_id, owner)
            for name, amount in (counters or {}).items():
                job.extra[name] = int(job.extra.get(name, 0)) + amount
            progressed = False
            for item in done:
                size = self._mark(txn, job_id, item, _DONE, "")
                if size is not None:
                    job.done_items += 1
                    job.done_bytes += size
                    progressed = True
            for item, reason in failed:
                if self._mark(txn, job_id, item, _FAILED, reason) is not None:
                    job.failed_items += 1
                    job.extra.setdefault("first_failure", f"{item}: {reason}")
            if progressed:
                job.attempts, job.last_error = 0, ""  # backoff counts failures in a row, not since the job began
            self._save(txn, job)
            return job

    def finish(self, job_id: str, owner: str) -> Job:
        """The runner has nothing left to send: success, or failure when items failed."""
        with self._env.begin(write=True) as txn:
            job = self._held(txn, job_id, owner)
            if job.state is JobState.RUNNING:
                job.state = JobState.FAILURE if job.failed_items else JobState.SUCCESS
                if job.failed_items and not job.last_error:
                    job.last_error = (f"{job.failed_items} of {job.total_items} items failed, the first "
                                      f"{job.extra.get('first_failure', '')}")
                job.finished, job.lease_owner, job.lease_until = self._clock(), "", 0.0
                self._save(txn, job)
            return job

    def defer(self, job_id: str, owner: str, error: str, delay: float, *, give_up: bool) -> Job:
        """A transient error: try again after ``delay`` s, or fail the job when ``give_up``."""
        with self._env.begin(write=True) as txn:
            job = self._held(txn, job_id, owner)
            job.attempts += 1
            job.last_error = error
            job.lease_owner, job.lease_until = "", 0.0
            if job.state is JobState.RUNNING:
                if give_up:
                    job.state, job.finished = JobState.FAILURE, self._clock()
                else:
                    job.state, job.next_attempt = JobState.PENDING, self._clock() + delay
                    job.waiting_for = f"retry {job.attempts} after: {error}"
            self._save(txn, job)
            return job

    def release(self, job_id: str, owner: str) -> None:
        """Give a job back without finishing it (the runner is stopping, or the job was paused)."""
        with self._env.begin(write=True) as txn:
            job = self._held(txn, job_id, owner)
            if job.state is JobState.RUNNING:
                job.state = JobState.PENDING
            job.lease_owner, job.lease_until = "", 0.0
            self._save(txn, job)

    # -- internals -------------------------------------------------------------------------------

    def _held(self, txn: lmdb.Transaction, job_id: str, owner: str) -> Job:
        job = self._load(txn, job_id)
        if job.lease_owner != owner:
            raise LeaseLostError(f"job {job_id} is held by {job.lease_owner or 'no runner'} now, not {owner}")
        return job

    def _mark(self, txn: lmdb.Transaction, job_id: str, item: str, state: bytes, reason: str) -> int | None:
        """Set a pending item's state; its size, or None if it was not pending (counted already)."""
        key = _item_key(job_id, item)
        value = txn.get(key, db=self._items)
        if value is None or bytes(value[:1]) != _PENDING:
            return None
        size_bytes = bytes(value[1:1 + _SIZE.size])
        txn.put(key, state + size_bytes + reason.encode("utf-8"), db=self._items)
        txn.delete(key, db=self._pending)
        return int(_SIZE.unpack(size_bytes)[0])

    def _load(self, txn: lmdb.Transaction, job_id: str) -> Job:
        value = txn.get(job_id.encode(), db=self._jobs)
        if value is None:
            raise NotFoundError(f"no job {job_id}")
        return Job.from_json(json.loads(bytes(value)))

    def _save(self, txn: lmdb.Transaction, job: Job) -> None:
        job.updated = self._clock()
        txn.put(job.id.encode(), json.dumps(job.as_json(), sort_keys=True).encode(), db=self._jobs)


_OPEN: dict[Path, JobStore] = {}
_OPEN_LOCK = threading.Lock()


def open_jobs(store: Store) -> JobStore:
    """The jobs of ``store`` (kept in ``<store>/jobs``), one JobStore per process.

    LMDB must not open one environment twice in a process, and the mount's runner, the views'
    ``jobs/`` folder, a bridge and the command line may all need it in one process: they share
    this one, which stays open for the life of the process.
    """
    folder = (store.folder / "jobs").resolve()
    with _OPEN_LOCK:
        if folder not in _OPEN:
            _OPEN[folder] = JobStore(folder)
        return _OPEN[folder]


def _due(job: Job, now: float, only: str | None) -> bool:
    """Whether a runner may take ``job`` now: pending and due, or running on a lease that ran out."""
    if only is not None and job.id != only:
        return False
    if job.state is JobState.PENDING:
        return job.next_attempt <= now
    return job.state is JobState.RUNNING and job.lease_until <= now


def _item_key(job_id: str, item: str) -> bytes:
    return job_id.encode() + b"\0" + item.encode()


def _new_id(now: float) -> str:
    """Sortable by creation time (LMDB keeps them in order) and unique across processes."""
    return f"{int(now * 1000):012x}-{os.urandom(3).hex()}"
