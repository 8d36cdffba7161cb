"""``dicomfs mount``: check the mountpoint, open the store, serve FUSE until told to stop.

The daemon runs pyfuse3 on trio with three companions in one nursery: a signal watcher (SIGTERM
and SIGINT end the loop, and the file system is unmounted cleanly), a refresher (changes made by
other processes reach the mount within ``mount.refresh_ms``) and a janitor for ``uploads/``. It
tells systemd it is ready (``Type=notify``) once the mount answers.

By default it goes to the background only after the mount is up, so ``dicomfs mount`` returns 0
exactly when the mount works, or prints why not and returns 1.
"""

from __future__ import annotations

import contextlib
import grp
import functools
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import lmdb
import pyfuse3
import trio

from dicomfs.config import Config
from dicomfs.errors import DicomfsError
from dicomfs.jobs.service import reconfigure, start_jobs
from dicomfs.jobs.storage import JobStore, open_jobs
from dicomfs.mount.diskpressure import DiskPressure, io_pressure
from dicomfs.mount.operations import DicomOperations, MountSettings
from dicomfs.mount.readahead import set_read_ahead
from dicomfs.servermemory import limit_malloc_arenas, tune_for_a_server
from dicomfs.store import Store
from dicomfs.systemd import notify_systemd
from dicomfs.uploads import UploadArea
from dicomfs.views import Tree

if TYPE_CHECKING:
    from bridge.server import Bridge

__all__ = ["MountError", "MountOptions", "mount", "unmount"]

_log = logging.getLogger(__name__)
_JANITOR_SECONDS = 5.0


class MountError(DicomfsError):
    """The mountpoint cannot be used (missing, not a folder, busy, already mounted)."""


@dataclass(frozen=True)
class MountOptions:
    mountpoint: Path
    foreground: bool = False
    read_only: bool = False
    allow_other: bool = False
    auto_unmount: bool = False
    """Let fusermount3 unmount if the daemon dies (tests; production leaves a dead mount visible,
    since an empty folder in its place could make a mirroring job delete its copy)."""
    webdav: str | None = None
    """Also serve the WebDAV bridge from this process, at this address ("" for webdav.bind)."""
    allow_anonymous: bool = False


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is already a mountpoint (unmount it first: dicomfs umount {mountpoint})")
    if not mountpoint.is_dir():
        raise MountError(f"mountpoint {mountpoint} is not a folder")
    if any(mountpoint.iterdir()):
        raise MountError(f"mountpoint {mountpoint} is not empty: mounting over files would hide them")


Reloader = Callable[[Callable[[Config], None]], Callable[[], None]]
"""Given what applies a reloaded configuration, what SIGHUP calls (``dicomfs.cli``'s ``_reloader``)."""


def mount(open_store: Callable[[], Store], config: Config, options: MountOptions,
          reloader: Reloader | None = None) -> int:
    """Mount and serve until unmounted or signalled; returns the exit status.

    ``open_store`` opens the configured store (read-only when ``options.read_only``): the daemon
    opens it only after forking, since an LMDB environment must not cross a fork.
    """
    mountpoint = options.mountpoint.resolve()
    check_mountpoint(mountpoint)
    if options.allow_other:
        _shared_group(config)  # a group that does not exist is said here, not by a daemon without a terminal
    if options.foreground:
        return _serve(open_store, config, options, mountpoint, ready_fd=None, reloader=reloader)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the daemon: a new session, no terminal; reports readiness through the pipe
        os.close(read_end)
        os.setsid()
        _detach_stdio()
        status = 1
        try:
            status = _serve(open_store, config, options, mountpoint, ready_fd=write_end,
                            reloader=reloader)
        except BaseException as error:  # the parent prints it while it waits; the log keeps it
            _log.critical("the mount daemon stopped: %s", error, exc_info=not isinstance(error, DicomfsError))
            _report(write_end, f"error: {error}")
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode("utf-8", "replace").strip()
    if message == "ready":
        return 0
    raise MountError(message.removeprefix("error: ") or "the mount daemon stopped before the mount was ready")


def _shared_group(config: Config) -> int:
    """The gid of ``mount.group`` (the owner's own group when empty)."""
    group = config.mount.group.strip()
    if not group:
        return os.getgid()
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise MountError(f"mount.group: no group named {group!r} on this machine (a name from /etc/group, or a number)") from None


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    if not os.environ.get("DICOMFS_LOG_STDERR"):
        os.dup2(null, 2)
    os.close(null)


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode("utf-8"))
        os.close(fd)
    except OSError:
        pass


def _serve(open_store: Callable[[], Store], config: Config, options: MountOptions, mountpoint: Path,
           ready_fd: int | None, reloader: Reloader | None) -> int:
    # SIGHUP reloads once the loop watches for it; until then (opening the store, mounting) it
    # would kill the daemon, which is the default action, so it is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    limit_malloc_arenas()  # before the store, the bridge and trio start threads
    store = open_store()
    store_folder = store.folder
    try:
        tree = Tree(store, uploads=not options.read_only, jobs=_jobs_of(store))
        uploads = None if options.read_only else UploadArea(store_folder / "uploads")
        mount_settings = MountSettings(read_only=options.read_only, delete_allowed=config.mount.delete_allowed,
                                       gid=_shared_group(config) if options.allow_other else os.getgid(),
                                       shared=options.allow_other)
        operations = DicomOperations(store, tree, uploads, mount_settings)
        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {"fsname=dicomfs", "subtype=dicomfs"}
        fuse_options.discard("default_permissions")
        if options.read_only:
            fuse_options.add("ro")
        if options.allow_other:  # other users: the kernel enforces the modes the mount shows
            fuse_options |= {"allow_other", "default_permissions"}
        if options.auto_unmount:
            fuse_options.add("auto_unmount")
        with contextlib.ExitStack() as companions:  # stopped after the unmount, whatever happens
            bridge = _start_bridge(store, config, options)
            if bridge is not None:
                companions.callback(bridge.stop)
            jobs = start_jobs(store, config) if not options.read_only else None
            if jobs is not None:
                companions.callback(jobs.stop)

            def apply(reloaded: Config) -> None:
                if bridge is not None:
                    bridge.credentials.replace_users(reloaded.users)
                if jobs is not None:
                    reconfigure(jobs, store, reloaded)

            reload = reloader(apply) if reloader is not None else None
            try:
                pyfuse3.init(operations, str(mountpoint), fuse_options)
            except RuntimeError as error:
                raise MountError(f"cannot mount {mountpoint}: {error} (is /dev/fuse there, and fuse3 installed?)") from None
            _log.info("mounted %s at %s (%s; deletes %s)", store_folder, mountpoint,
                      "read-only" if options.read_only else "read-write",
                      "allowed" if config.mount.delete_allowed and not options.read_only else "refused")
            clean = False
            tune_for_a_server()
            try:
                trio.run(_main, operations, config, uploads, mountpoint, ready_fd, reload, instruments=[_SlowStepWarning()])
                clean = True
            finally:
                pyfuse3.close(unmount=clean)
                operations.detach()
        return 0
    finally:
        store.close()


def _jobs_of(store: Store) -> JobStore | None:
    """The store's jobs for the ``jobs/`` folder; None where they cannot be opened (a read-only
    mount of a store this user may not write)."""
    try:
        return open_jobs(store)
    except (OSError, lmdb.Error) as error:
        _log.warning("no jobs/ folder: cannot open %s: %s", store.folder / "jobs", error)
        return None


def _start_bridge(store: Store, config: Config, options: MountOptions) -> Bridge | None:
    """The WebDAV bridge over the mount's store (one LMDB environment for both), if asked for."""
    if options.webdav is None:
        return None
    from bridge.server import Bridge  # wsgidav and cheroot: only a mount that serves WebDAV needs them

    bridge = Bridge(store, config, bind=options.webdav or None, allow_anonymous=options.allow_anonymous)
    bridge.start()
    return bridge


async def _main(operations: DicomOperations, config: Config, uploads: UploadArea | None, mountpoint: Path,
                ready_fd: int | None, reload: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        operations.attach(nursery)
        nursery.start_soon(_watch_signals, reload)
        nursery.start_soon(_refresh, operations, config.mount.refresh_ms / 1000)
        if uploads is not None:  # the pressure decides only where uploads/ calls run
            nursery.start_soon(_watch_disk, operations.disk)
            nursery.start_soon(_sweep, operations, uploads, config)
        if config.mount.read_ahead_kb:
            nursery.start_soon(_read_ahead, mountpoint, config.mount.read_ahead_kb)
        notify_systemd("READY=1")
        _report(ready_fd, "ready")
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _read_ahead(mountpoint: Path, kib: int) -> None:
    await trio.to_thread.run_sync(set_read_ahead, mountpoint, kib)  # its stat is a request to this loop


async def _watch_signals(reload: Callable[[], None] | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for received in signals:
            if received == signal.SIGHUP:
                if reload is not None:  # in a thread: reading the file must not stall the mount's requests
                    notify_systemd("RELOADING=1")
                    await trio.to_thread.run_sync(reload)
                    notify_systemd("READY=1")
                continue
            _log.info("%s: unmounting", signal.Signals(received).name)
            notify_systemd("STOPPING=1")
            pyfuse3.terminate()
            return


async def _refresh(operations: DicomOperations, seconds: float) -> None:
    while True:
        await trio.sleep(seconds)
        try:
            await operations.apply_changes()
        except Exception:  # a failed refresh is retried next time; the mount keeps serving
            _log.exception("refreshing the tree failed")


async def _watch_disk(disk: DiskPressure) -> None:
    """Keep ``disk`` told of the I/O pressure, once a second (a /proc read: it never waits on I/O)."""
    while True:
        disk.measured(io_pressure())
        await trio.sleep(1)


async def _sweep(operations: DicomOperations, uploads: UploadArea, config: Config) -> None:
    while True:
        open_now = {n.path[1:] for n in operations.open_uploads()}
        try:  # what a front end killed before ingesting left behind (the queue says when to look)
            await trio.to_thread.run_sync(operations.adopt_leftovers, open_now)
        except Exception:
            _log.exception("looking for uploads left uningested failed")
        await trio.sleep(_JANITOR_SECONDS)
        busy = {uploads.path(n.path[1:]) for n in operations.open_uploads()}
        busy |= {uploads.path(parts) for parts in operations.queued_uploads()}
        sweep = functools.partial(uploads.sweep, rejected_ttl=config.uploads.rejected_ttl,
                                  empty_folder_idle=config.uploads.empty_folder_idle, busy=busy)
        try:
            removed = await trio.to_thread.run_sync(sweep)
        except Exception:
            _log.exception("cleaning uploads/ failed")
            continue
        if removed:
            operations.forget_uploads(removed)


class _SlowStepWarning(trio.abc.Instrument):
    """Logs a warning when one task step holds the loop too long: every FUSE request waits meanwhile."""

    def __init__(self, limit: float = 0.05) -> None:
        self.limit = limit
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        elapsed = time.perf_counter() - self._started
        if elapsed > self.limit:
            _log.warning("task %s held the event loop for %.0f ms", task.name, elapsed * 1000)


def unmount(mountpoint: Path) -> None:
    """Unmount a dicomfs mount (the daemon then exits)."""
    mountpoint = mountpoint.resolve()
    if not os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    command = shutil.which("fusermount3") or shutil.which("fusermount")
    args = [command, "-u", str(mountpoint)] if command else ["umount", str(mountpoint)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        detail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        if "busy" in detail.lower():
            raise MountError(f"{mountpoint} is busy (a process has a file or folder open in it): {detail}")
        raise MountError(f"cannot unmount {mountpoint}: {detail}")
