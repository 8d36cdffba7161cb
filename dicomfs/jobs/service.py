"""The job runner a dicomfs process starts over its store, from the configuration."""

from __future__ import annotations

import time

from dicomfs.config import Config
from dicomfs.jobs.export import StowExporter
from dicomfs.jobs.model import EXPORT
from dicomfs.jobs.routes import Router
from dicomfs.jobs.runner import JobRunner, RetryPolicy
from dicomfs.jobs.storage import JobStore, open_jobs
from dicomfs.store import Store

__all__ = ["runner_for", "start_jobs"]


def runner_for(store: Store, jobs: JobStore, config: Config, *, only: str | None = None) -> JobRunner:
    """A runner with an executor for every kind of job this configuration can run."""
    c = config.jobs
    runner = JobRunner(jobs, {EXPORT: StowExporter(store, config.destinations)}, lease=c.lease, poll=c.poll_ms / 1000,
                       retry=RetryPolicy(c.retry_delay, c.retry_max_delay, c.max_attempts), only=only)
    if config.routes and only is None and not store.readonly:
        runner.router = Router(store, jobs, config.routes, owner=runner.owner, lease=c.lease, clock=time.time).step
    return runner


def start_jobs(store: Store, config: Config) -> JobRunner | None:
    """Run queued jobs in this process too (stop the runner at the end), unless ``jobs.run`` is off."""
    if not config.jobs.run:
        return None
    runner = runner_for(store, open_jobs(store), config)
    runner.start()
    return runner
