"""The loop that runs jobs: claim one, hand it to the executor of its kind, record how it ended.

Any long-running dicomfs process may run one (``dicomfs worker``, the mount, the bridge): the
lease in ``storage`` makes sure two never run the same job. An executor works through the job's
pending items in steps, recording each step's acknowledged and failed items, and asks
``keep_going()`` between steps: that renews the lease and notices a pause, a cancel or a stop,
so a job stops between two requests, never in the middle of one.

A transient error (the destination is down, answers 5xx or times out) puts the job back to
pending with an exponential backoff, capped; after ``max_attempts`` failures in a row without
progress the job fails with the last error, and ``dicomfs jobs retry`` starts it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Protocol

from dicomfs.errors import DicomfsError
from dicomfs.jobs.model import Job, JobState
from dicomfs.jobs.storage import JobStore, LeaseLostError

__all__ = ["Executor", "JobRunner", "JobWork", "RetryPolicy", "TransientJobError"]

_log = logging.getLogger("dicomfs.jobs")


class TransientJobError(DicomfsError):
    """Worth trying again later: the job is deferred with backoff, not failed."""


class JobWork:
    """What an executor may do with the job it was given."""

    def __init__(self, jobs: JobStore, job: Job, owner: str, lease: float, stopping: threading.Event) -> None:
        self.jobs, self.job, self.owner, self.lease = jobs, job, owner, lease
        self._stopping = stopping
        self._renewed = time.monotonic()

    def pending(self, limit: int) -> list[tuple[str, int]]:
        return self.jobs.pending_items(self.job.id, limit)

    def record(self, done: Iterable[str] = (), failed: Iterable[tuple[str, str]] = (),
               counters: Mapping[str, int] | None = None) -> None:
        self.job = self.jobs.record(self.job.id, self.owner, done, failed, counters)

    def keep_going(self) -> bool:
        """False once the job was paused or canceled, or the runner is stopping; renews the lease."""
        if self._stopping.is_set():
            return False
        if time.monotonic() - self._renewed > self.lease / 3:
            self.job = self.jobs.renew(self.job.id, self.owner, self.lease)
            self._renewed = time.monotonic()
        return self.job.state is JobState.RUNNING


class Executor(Protocol):
    def run(self, job: Job, work: JobWork) -> None:
        """Work through ``work.pending(...)`` until none is left or ``work.keep_going()`` is False;
        raise TransientJobError when the destination cannot be reached."""

    def waiting_for(self, job: Job) -> str | None:
        """Why the job may not start now (a schedule window), or None."""


@dataclass(frozen=True)
class RetryPolicy:
    first_delay: float = 2.0
    max_delay: float = 300.0
    max_attempts: int = 10

    def delay(self, attempts: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2 ** max(attempts - 1, 0)))


class JobRunner:
    """A thread that runs jobs of the kinds it has executors for, one at a time."""

    def __init__(self, jobs: JobStore, executors: Mapping[str, Executor], *, lease: float = 30.0, poll: float = 1.0,
                 retry: RetryPolicy = RetryPolicy(), name: str | None = None, only: str | None = None,
                 router: Callable[[], int] | None = None) -> None:
        self.jobs, self.executors, self.lease, self.poll, self.retry = jobs, executors, lease, poll, retry
        self.only = only
        self.router = router
        """Called before each look for work: turns new instances into jobs (``jobs.routes``)."""
        self.after_run: Callable[[Job], None] | None = None
        """Called from the runner's thread with each job it ran, as the run left it (ended,
        deferred or released), so a waiter learns at once rather than at its next poll."""
        self.owner = name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dicomfs-jobs", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A job was just queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the current step; a running job is released for the next runner."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def run_once(self) -> Job | None:
        """Claim and run one job; the job as it ended, or None when none was due."""
        job = self.jobs.claim(self.owner, self.lease, self._eligibility, only=self.only)
        if job is None:
            return None
        executor = self.executors[job.kind]
        work = JobWork(self.jobs, job, self.owner, self.lease, self._stopping)
        _log.info("job %s (%s): running, %d of %d items pending", job.id, job.description,
                  job.pending_items, job.total_items)
        try:
            executor.run(job, work)
            current = self.jobs.get(job.id)
            if current.state is JobState.RUNNING and current.pending_items == 0:
                current = self.jobs.finish(job.id, self.owner)
                _log.info("job %s: %s (%d sent, %d failed)", job.id, current.state.value,
                          current.done_items, current.failed_items)
            elif current.lease_owner == self.owner:
                self.jobs.release(job.id, self.owner)  # paused, canceled or stopping: between two steps
            return self.jobs.get(job.id)
        except LeaseLostError as error:
            _log.warning("job %s: %s", job.id, error)
        except TransientJobError as error:
            attempts = self.jobs.get(job.id).attempts + 1
            give_up = attempts >= self.retry.max_attempts
            delay = self.retry.delay(attempts)
            self.jobs.defer(job.id, self.owner, str(error), delay, give_up=give_up)
            _log.warning("job %s: %s; %s", job.id, error, "giving up" if give_up else f"retry {attempts} in {delay:.0f} s")
        except DicomfsError as error:  # e.g. a secret that cannot be read: a person must act
            _log.error("job %s failed: %s", job.id, error)
            self.jobs.defer(job.id, self.owner, str(error), 0, give_up=True)
        except Exception as error:  # a bug or a broken store: fail the job with it, visibly
            _log.exception("job %s failed", job.id)
            self.jobs.defer(job.id, self.owner, f"internal error: {error}", 0, give_up=True)
        return self.jobs.get(job.id)

    def _eligibility(self, job: Job) -> str | None:
        executor = self.executors.get(job.kind)
        if executor is None:
            return f"no runner here knows {job.kind!r} jobs"
        return executor.waiting_for(job)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.router is not None:
                    self.router()
                ran = self.run_once()
                if ran is not None and self.after_run is not None:
                    self.after_run(ran)
            except Exception:  # the store went away for a moment: the loop must outlive it
                _log.exception("job runner step failed")
                ran = None
            if ran is None:
                self._wake.wait(self.poll)
                self._wake.clear()

