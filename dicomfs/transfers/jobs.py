"""The transfer jobs: ``send`` pushes instances to a peer, ``pull`` fetches them from one.

Both work in steps of ``lookup_batch`` pending instances: find out what the receiving side
already holds (whole, or some chunks of a large instance) and record that as done without
sending it, plan buckets of what is left, and move the buckets with ``workers`` threads, a new
one starting as soon as one ends. An instance is recorded done only when the receiving side has
said it is durable, so a restart of either side (or of this job's runner) sends again only what
was not acknowledged, and the lookup of the next attempt keeps even that to the missing chunks.

The job's ``extra`` counts ``content_bytes`` (instance bytes moved), ``wire_bytes`` (bytes on
the wire, after gzip) and ``skipped_items`` / ``skipped_bytes`` (already on the receiving side).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import Any

from dicomfs.config import Peer
from dicomfs.jobs.model import QUEUED_UNDER, Job
from dicomfs.jobs.runner import JobWork, TransientJobError
from dicomfs.jobs.schedule import target_waiting
from dicomfs.store import Instance, Store
from dicomfs.transfers.client import PeerClient, Sent
from dicomfs.transfers.protocol import Piece, Wanted, missing_ranges, plan_buckets
from dicomfs.transfers.receiving import Receiver
from dicomfs.transfers.sending import StaleSelectionError, read_bucket
from dicomfs.transfers.validation import MAX_PLAN_PIECES

__all__ = ["PullExecutor", "PushExecutor"]

_log = logging.getLogger("dicomfs.transfers")

Outcome = tuple[dict[str, Any], Sent]
"""A bucket's answer (stored, failed, damaged, partial) and what it cost on the wire."""
Task = Callable[[], Outcome]
"""Moves one bucket."""


class _PeerExecutor:
    def __init__(self, store: Store, peers: Mapping[str, Peer], clock: Callable[[], datetime] = datetime.now) -> None:
        self.store, self.peers, self._clock = store, peers, clock

    def waiting_for(self, job: Job) -> str | None:
        return target_waiting("peer", self.peers, job.params.get("peer"), self._clock(),
                              job.params.get(QUEUED_UNDER))

    def run(self, job: Job, work: JobWork) -> None:
        peer = self.peers[job.params["peer"]]
        client = PeerClient(peer)
        # The pool's threads are done with the client once the pool is shut down: close their
        # keep-alive connections then, rather than leave them to the peer's idle timeout.
        with contextlib.closing(client), ThreadPoolExecutor(peer.workers, thread_name_prefix=f"transfer-{peer.name}") as pool:
            while work.keep_going():
                batch = [item for item, _ in work.pending(peer.lookup_batch)]
                if not batch:
                    return
                before = (work.job.done_items, work.job.failed_items)
                tasks = self._prepare(client, batch, work)
                again = _move(pool, peer.workers, tasks, work)
                if again:
                    raise TransientJobError(f"transfer with peer {peer.name}: {again}")
                if (work.job.done_items, work.job.failed_items) == before and work.keep_going():
                    raise TransientJobError(f"peer {peer.name}: a whole step stored nothing; trying again later")

    def _prepare(self, client: PeerClient, batch: list[str], work: JobWork) -> list[Task]:
        """Record what needs no moving; a task for each bucket of the rest."""
        raise NotImplementedError


class PushExecutor(_PeerExecutor):
    """The executor of ``send`` jobs: items are instances of this store, pushed to the peer."""

    def _prepare(self, client: PeerClient, batch: list[str], work: JobWork) -> list[Task]:
        present: list[Wanted] = []
        gone: list[tuple[str, str]] = []
        for item, record in zip(batch, self.store.records(batch), strict=True):
            if isinstance(record, Instance):
                present.append(Wanted(record.id, record.sha256, record.size))
            else:
                gone.append((item, "deleted from the store after the transfer was queued"))
        have, partial = client.lookup(present) if present else (set(), {})
        buckets = _skip_held(present, gone, have, partial, client.peer.bucket_size, work)
        return [functools.partial(self._push, client, pieces) for pieces in buckets]

    def _push(self, client: PeerClient, pieces: list[Piece]) -> Outcome:
        try:
            bucket = read_bucket(self.store, pieces)
        except StaleSelectionError:  # deleted or replaced here meanwhile: the next step sees which
            return {"stored": [], "failed": {}, "damaged": [], "partial": {}}, Sent(0, 0)
        answer, sent = client.send_bucket(bucket, pieces, compress=client.peer.gzip)
        return answer, Sent(sum(p.length for p in pieces), sent.wire)


class PullExecutor(_PeerExecutor):
    """The executor of ``pull`` jobs: items are instances of the peer, fetched into this store."""

    def __init__(self, store: Store, peers: Mapping[str, Peer], clock: Callable[[], datetime] = datetime.now) -> None:
        super().__init__(store, peers, clock)
        self.receiver = Receiver(store)

    def _prepare(self, client: PeerClient, batch: list[str], work: JobWork) -> list[Task]:
        here, gone = client.manifest(batch)
        held = self.receiver.lookup(here)
        buckets = _within_a_plan(_skip_held(here, [(item, f"no longer on peer {client.peer.name}") for item in gone],
                                            set(held.have), held.partial, client.peer.bucket_size, work))
        if not buckets:
            return []
        plan = client.register_plan(buckets)
        return [functools.partial(self._fetch, client, plan, number, pieces) for number, pieces in enumerate(buckets)]

    def _fetch(self, client: PeerClient, plan: str, number: int, planned: list[Piece]) -> Outcome:
        pieces, sent = client.fetch_bucket(plan, number, planned, compress=client.peer.gzip)
        received = self.receiver.receive(pieces, remote=f"peer {client.peer.name}")
        return received.as_json(), sent


def _skip_held(present: Sequence[Wanted], gone: list[tuple[str, str]], have: set[str],
               partial: Mapping[str, Sequence[tuple[int, int]]], bucket_size: int, work: JobWork) -> list[list[Piece]]:
    """Record as done what the receiving side has, as failed what is gone; the buckets of the rest
    (for an instance partly received, its missing ranges only)."""
    held = [w for w in present if w.id in have]
    work.record(done=[w.id for w in held], failed=gone,
                counters={"skipped_items": len(held), "skipped_bytes": sum(w.size for w in held)})
    todo = []
    for w in present:
        if w.id in have:
            continue
        ranges = partial.get(w.id)
        missing = tuple(missing_ranges(ranges, w.size)) if ranges else None
        todo.append(Wanted(w.id, w.sha256, w.size, missing))
    return plan_buckets(todo, bucket_size)


def _within_a_plan(buckets: list[list[Piece]]) -> list[list[Piece]]:
    """The first buckets of a step, up to the pieces a peer keeps in one plan; the instances of
    the others stay pending for the next step (their chunks received meanwhile are not sent again)."""
    taken, count = 0, 0
    for bucket in buckets:
        if count + len(bucket) > MAX_PLAN_PIECES:
            break
        taken, count = taken + 1, count + len(bucket)
    return buckets[:taken]


def _move(pool: ThreadPoolExecutor, workers: int, tasks: Sequence[Task], work: JobWork) -> str:
    """Run the tasks, ``workers`` at a time, recording each answer as it comes; why some instances
    must be sent again later ("" when none must). Stops starting new ones once the job should
    stop; a transient error stops it too, and is raised once the buckets in flight have ended."""
    queue: Iterator[Task] = iter(tasks)
    in_flight: set[Future[Outcome]] = set()
    damaged, later = 0, dict[str, str]()
    failure: BaseException | None = None
    while True:
        while failure is None and len(in_flight) < workers and work.keep_going():
            task = next(queue, None)
            if task is None:
                break
            in_flight.add(pool.submit(task))
        if not in_flight:
            break
        finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            try:
                answer, sent = future.result()
            except Exception as error:  # recorded answers stay recorded; the rest goes again later
                failure = failure or error
                continue
            damaged += len(answer.get("damaged", []))
            later.update(answer.get("later", {}))
            work.record(done=answer.get("stored", []), failed=list(answer.get("failed", {}).items()),
                        counters={"content_bytes": sent.content, "wire_bytes": sent.wire})
    if failure is not None:
        raise failure
    again = [f"{damaged} instances arrived damaged (SHA-256 mismatch)"] if damaged else []
    if later:
        again.append(f"{len(later)} instances could not be stored now ({next(iter(later.values()))})")
    return "; ".join(again) + ("; sending them again" if again else "")
