"""What a job is: its kind, parameters, state, progress and the outcome of each of its items.

Pure data: the jobs' LMDB storage is ``jobs.storage``, the loop that runs them ``jobs.runner``.
A job works through a fixed list of *items* (for an export, the instances to send), each pending,
done or failed with a reason; the counters below are kept in step with the items in the same
transaction, so ``dicomfs jobs show`` never disagrees with what was sent.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["EXPORT", "FINAL", "Job", "JobState", "PULL", "SEND", "XNAT_EXPORT"]

EXPORT = "export"
"""The kind of job that sends instances to a DICOMweb archive (``jobs.export``)."""
XNAT_EXPORT = "xnat-export"
"""Sends instances to an XNAT server in zip batches (``jobs.xnat``)."""
SEND = "send"
"""Pushes instances to a peer dicomfs (``transfers.push``)."""
PULL = "pull"
"""Fetches instances from a peer dicomfs into this store (``transfers.pull``)."""


QUEUED_UNDER = "config"
"""The job parameter naming the configuration file a job was queued with, so that a process
whose configuration lacks the job's target can say where it was defined."""


class JobState(str, enum.Enum):
    PENDING = "pending"
    """Waiting for a runner: new, deferred after a transient error, or outside its schedule window."""
    RUNNING = "running"
    PAUSED = "paused"
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELED = "canceled"


FINAL = frozenset({JobState.SUCCESS, JobState.FAILURE, JobState.CANCELED})


@dataclass
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    """What the kind needs, e.g. ``{"destination": "pacs2"}``; never a secret (jobs are shown as JSON)."""
    description: str
    state: JobState = JobState.PENDING
    created: float = 0.0
    updated: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    total_items: int = 0
    total_bytes: int = 0
    done_items: int = 0
    done_bytes: int = 0
    failed_items: int = 0
    attempts: int = 0
    """Runs that ended in a transient error since the job last made progress."""
    next_attempt: float = 0.0
    """Not to be claimed before this time (backoff after a transient error)."""
    waiting_for: str = ""
    """Why a pending job is not running now (its schedule window, a backoff), for people to read."""
    last_error: str = ""
    lease_owner: str = ""
    lease_until: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pending_items(self) -> int:
        return self.total_items - self.done_items - self.failed_items

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (``dicomfs jobs show --json``, the ``jobs/`` folder)."""
        data = asdict(self)
        data["state"] = self.state.value
        data["pending_items"] = self.pending_items
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        data = {k: v for k, v in data.items() if k != "pending_items"}
        data["state"] = JobState(data["state"])
        return cls(**data)
