"""The job runner a dicomfs process starts over its store, from the configuration, and the job a
target name calls for."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from dicomfs.config import Config, Destination, XnatDestination
from dicomfs.errors import ConfigError
from dicomfs.jobs.model import EXPORT, PULL, SEND, XNAT_EXPORT
from dicomfs.jobs.runner import Executor, JobRunner, RetryPolicy
from dicomfs.jobs.storage import JobStore, open_jobs
from dicomfs.store import Store

__all__ = ["job_for_target", "reconfigure", "runner_for", "start_jobs"]


def job_for_target(config: Config, name: str) -> tuple[str, dict[str, object]]:
    """The kind and parameters of a job sending instances to ``name``: a STOW-RS or XNAT
    destination, or a peer; ConfigError listing the known names otherwise."""
    destination = config.destinations.get(name)
    if isinstance(destination, XnatDestination):
        return XNAT_EXPORT, {"destination": name}
    if destination is not None:
        return EXPORT, {"destination": name}
    if name in config.peers:
        return SEND, {"peer": name}
    known = ", ".join([*config.destinations, *config.peers]) or "none configured"
    raise ConfigError(f"no destination or peer {name!r} in the configuration (known: {known})")


_EVERY_KIND = (EXPORT, XNAT_EXPORT, SEND, PULL)


def executors_for(store: Store, config: Config, kinds: Collection[str] = _EVERY_KIND) -> dict[str, Executor]:
    """An executor for each of ``kinds`` (by default every kind this configuration can run).

    Each kind's module is imported only when its kind is asked for: ``dicomfs export --wait``
    runs one job of one kind, and the others' imports (HTTP clients, zip, the peer protocol)
    would add to every such command's start.
    """
    executors: dict[str, Executor] = {}
    if EXPORT in kinds:
        from dicomfs.jobs.export import StowExporter

        executors[EXPORT] = StowExporter(store, {n: d for n, d in config.destinations.items() if isinstance(d, Destination)})
    if XNAT_EXPORT in kinds:
        from dicomfs.jobs.xnat import XnatExporter

        executors[XNAT_EXPORT] = XnatExporter(store, {n: d for n, d in config.destinations.items()
                                                      if isinstance(d, XnatDestination)})
    if SEND in kinds or PULL in kinds:
        from dicomfs.transfers.jobs import PullExecutor, PushExecutor

        if SEND in kinds:
            executors[SEND] = PushExecutor(store, config.peers)
        if PULL in kinds:
            executors[PULL] = PullExecutor(store, config.peers)
    return executors


def runner_for(store: Store, jobs: JobStore, config: Config, *, only: str | None = None,
               kinds: Collection[str] = _EVERY_KIND) -> JobRunner:
    """A runner with an executor for every kind of job this configuration can run, or only for
    ``kinds`` (the kind of the ``only`` job it is to run)."""
    c = config.jobs
    runner = JobRunner(jobs, executors_for(store, config, kinds), lease=c.lease, poll=c.poll_ms / 1000,
                       retry=RetryPolicy(c.retry_delay, c.retry_max_delay, c.max_attempts), only=only)
    runner.router = _router(store, jobs, config, runner) if only is None else None
    return runner


def reconfigure(runner: JobRunner, store: Store, config: Config) -> None:
    """Give a running runner the destinations, peers and routes of a reloaded ``config`` (SIGHUP):
    the jobs it starts from now on use them; a job already running keeps the executor it began with.
    The router's progress lives in the job store, so a new router carries on where the old one was."""
    runner.executors = executors_for(store, config, runner.executors.keys())
    runner.router = _router(store, runner.jobs, config, runner)


def _router(store: Store, jobs: JobStore, config: Config, runner: JobRunner) -> Callable[[], int] | None:
    if not config.routes or store.readonly:
        return None
    from dicomfs.jobs.routes import Router  # imported here: it reads the views' tags, which most runners never need

    c = config.jobs
    return Router(store, jobs, config.routes, lambda name: job_for_target(config, name),
                  owner=runner.owner, lease=c.lease, clock=time.time).step


def start_jobs(store: Store, config: Config) -> JobRunner | None:
    """Run queued jobs in this process too (stop the runner at the end), unless ``jobs.run`` is off."""
    if not config.jobs.run:
        return None
    runner = runner_for(store, open_jobs(store), config)
    runner.start()
    return runner
