"""The job runner a dicomfs process starts over its store, from the configuration."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from dicomfs.config import Config
from dicomfs.jobs.export import StowExporter
from dicomfs.jobs.model import EXPORT
from dicomfs.jobs.routes import Router
from dicomfs.jobs.runner import JobRunner, RetryPolicy
from dicomfs.jobs.storage import JobStore
from dicomfs.store import Store

__all__ = ["RunningJobs", "open_jobs", "runner_for", "start_jobs"]


_OPEN: dict[Path, JobStore] = {}
_OPEN_LOCK = threading.Lock()


def open_jobs(store: Store) -> JobStore:
    """The jobs of ``store`` (kept in ``<store>/jobs``), one JobStore per process.

    LMDB must not open one environment twice in a process, and the mount's runner, the views'
    ``jobs/`` folder and a bridge in the same process all need it: they share this one, which
    stays open for the life of the process.
    """
    folder = (store.folder / "jobs").resolve()
    with _OPEN_LOCK:
        if folder not in _OPEN:
            _OPEN[folder] = JobStore(folder)
        return _OPEN[folder]


def runner_for(store: Store, jobs: JobStore, config: Config, *, only: str | None = None) -> JobRunner:
    """A runner with an executor for every kind of job this configuration can run."""
    c = config.jobs
    runner = JobRunner(jobs, {EXPORT: StowExporter(store, config.destinations)}, lease=c.lease, poll=c.poll_ms / 1000,
                       retry=RetryPolicy(c.retry_delay, c.retry_max_delay, c.max_attempts), only=only)
    if config.routes and only is None and not store.readonly:
        runner.router = Router(store, jobs, config.routes, owner=runner.owner, lease=c.lease, clock=time.time).step
    return runner


class RunningJobs:
    """A runner started by a front end (the mount, the bridge) and the job store it holds open."""

    def __init__(self, jobs: JobStore, runner: JobRunner) -> None:
        self.jobs, self.runner = jobs, runner

    def stop(self) -> None:
        self.runner.stop()


def start_jobs(store: Store, config: Config) -> RunningJobs | None:
    """Run queued jobs in this process too, unless ``jobs.run`` is off."""
    if not config.jobs.run:
        return None
    jobs = open_jobs(store)
    runner = runner_for(store, jobs, config)
    runner.start()
    return RunningJobs(jobs, runner)
