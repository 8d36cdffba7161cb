"""A background queue that ingests completed uploads in groups.

A client copying a CD sends hundreds of files one after the other and waits for each answer.
Ingesting inside each request would make it wait for a group commit (a sync) per file; instead
the front end answers at once and queues the file here, and one thread hands whatever has
queued up meanwhile (letting it gather for up to ``ingest.batch_delay_ms`` first) to the ingest
process (``upload_worker``), which stores it in a single group commit. The file stays visible in
``uploads/`` until it is stored, then vanishes; what is not DICOM stays with its reason (see
``uploads``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Collection, Sequence

from dicomfs.store import Store
from dicomfs.upload_worker import UploadIngester
from dicomfs.uploads import Stamp, UploadArea, UploadOutcome, stamp_of

__all__ = ["UploadQueue"]

_log = logging.getLogger(__name__)
_MOST_PER_GROUP = 256
_LEFTOVERS_AT_START_SECONDS = 2.0
"""At a front end's start, files in uploads/ untouched this long were left by a front end killed
before it ingested them (a file being written now, through a mount beside it, is touched often)."""
_ORPHANED_SECONDS = 300.0
"""Later, a complete-looking file untouched this long that nobody queued is adopted too: the front
end that took it in may have died while this one ran."""
_ORPHAN_CHECK_SECONDS = 60.0
"""How often to look for those: a look walks uploads/ (a stat and a getxattr per file)."""


class UploadQueue:
    """Completed uploads waiting to be ingested, and the thread that ingests them."""

    def __init__(self, store: Store, area: UploadArea, *, origin: str,
                 on_done: Callable[[list[tuple[tuple[str, ...], UploadOutcome]]], None] | None = None) -> None:
        self._ingester = UploadIngester(store, area)
        self._gathering = store.settings.batch_delay
        self._enough = min(store.settings.batch_files, _MOST_PER_GROUP)
        self._area = area
        self._origin = origin
        self._on_done = on_done
        # parts -> (remote user, the file as it was when submitted)
        self._waiting: OrderedDict[tuple[str, ...], tuple[str, Stamp | None]] = OrderedDict()
        self._in_progress: set[tuple[str, ...]] = set()
        self._condition = threading.Condition()
        self._closed = False
        self._next_adoption = 0.0  # 0: the first look, at start
        # Started by the first submit or adopt_leftovers, which front ends call once they serve: one
        # that cannot (its port taken) then spawns no ingest process only to exit around its start.
        self._thread = threading.Thread(target=self._run, name=f"{origin}-uploads", daemon=True)

    def submit(self, parts: Sequence[str], remote: str = "", info: os.stat_result | None = None) -> None:
        """Queue ``uploads/<parts>`` for ingest (once, however often it is submitted before then).

        The file goes with what it is now (``UploadArea.stamp``): written again before its turn,
        as Explorer does with the 0-byte file it puts first, it is left for its writer to submit
        again, rather than ingested half-written or while its client still holds a lock. ``info``:
        the file's stat, when the caller just made one (a stat less per upload)."""
        stamp = self._area.stamp(parts) if info is None else stamp_of(info)
        with self._condition:
            self._start()
            self._waiting[tuple(parts)] = (remote, stamp)
            # Woken only when this may end a wait: the first file (nothing was queued) or a full
            # group. A wake per file would cost the front end a thread switch per upload.
            if len(self._waiting) in (1, self._enough):
                self._condition.notify_all()

    def adopt_leftovers(self, busy: Collection[tuple[str, ...]] = ()) -> int:
        """Queue the files in uploads/ that a front end answered for but never ingested (it was
        killed first), not ``busy`` elsewhere (open for writing, held for an UNLOCK); how many.

        Front ends call it at start, when files untouched for a couple of seconds qualify, then
        from every janitor pass: it looks again once a minute, for files untouched for minutes."""
        with self._condition:
            self._start()
        now = time.monotonic()
        if now < self._next_adoption:
            return 0
        idle = _ORPHANED_SECONDS if self._next_adoption else _LEFTOVERS_AT_START_SECONDS
        self._next_adoption = now + _ORPHAN_CHECK_SECONDS
        taken = self.busy() | set(busy)
        found = self._area.leftovers(idle=idle, busy={self._area.path(parts) for parts in taken})
        for parts in found:
            self.submit(parts)
        if found:
            _log.info("%d uploads left in uploads/ without being ingested: queued now", len(found))
        return len(found)

    def busy(self) -> set[tuple[str, ...]]:
        """The uploads queued or being ingested (the janitor leaves them alone)."""
        with self._condition:
            return set(self._waiting) | self._in_progress

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or being ingested; False on timeout."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._waiting and not self._in_progress, timeout)

    def close(self) -> None:
        """Ingest what is queued, then stop the thread and the ingest process."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        if self._thread.ident is not None:
            self._thread.join()
        self._ingester.close()

    def _start(self) -> None:
        """Start the thread unless it was started (the condition held)."""
        if self._thread.ident is None and not self._closed:
            self._thread.start()

    def _keep_with_reason(self, parts: tuple[str, ...], reason: str) -> None:
        try:
            self._area.set_reason(self._area.path(parts), reason)
        except OSError:
            pass  # gone meanwhile: nothing left to explain

    def _run(self) -> None:
        try:
            self._ingester.start()  # now, not at the first upload: a spawn takes ~0.3 s of CPU
        except OSError:
            _log.exception("cannot start the upload ingest process; trying again at the first upload")
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                self._gather()
                group: list[tuple[tuple[str, ...], tuple[str, Stamp | None]]] = []
                while self._waiting and len(group) < _MOST_PER_GROUP:
                    group.append(self._waiting.popitem(last=False))
                self._in_progress = {parts for parts, _ in group}
            try:
                self._ingest(group)
            finally:
                with self._condition:
                    self._in_progress = set()
                    self._condition.notify_all()

    def _gather(self) -> None:
        """Let a group gather company for up to ``ingest.batch_delay_ms`` (the condition held).

        A group costs the ingest process ~1.5 ms besides ~0.22 ms a file (two index commits, a
        syncfs, the round trip), and the mount a refresh on its loop when the group is done.
        Taken as they came, a `cp -r` gave groups of ~15 files; gathered, ~100. `cp -r` of 2,400
        small files into a mount until ingested, 6 alternated pairs: 2.2-2.9 s before, 1.7-2.1 s
        after (one outlier at 4.0 s), the ingest's CPU down 20-40% and the mount's 20-35%. PUTs
        over WebDAV, which wait for the bridge rather than for the ingest, did not change."""
        deadline = time.monotonic() + self._gathering
        while len(self._waiting) < self._enough and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0 or not self._condition.wait(left):
                return

    def _ingest(self, group: list[tuple[tuple[str, ...], tuple[str, Stamp | None]]]) -> None:
        by_remote: dict[str, list[tuple[tuple[str, ...], Stamp | None]]] = {}
        for parts, (remote, stamp) in group:
            by_remote.setdefault(remote, []).append((parts, stamp))
        for remote, items in by_remote.items():
            batch = [parts for parts, _ in items]
            try:
                outcomes = self._ingester.ingest_many(batch, [stamp for _, stamp in items], origin=self._origin,
                                                      remote=remote)
            except Exception as error:  # a store error (a full disk) must not kill the thread
                _log.exception("ingest of %d uploaded files failed; they stay in uploads/", len(batch))
                for parts in batch:
                    self._keep_with_reason(parts, f"not stored: {error}")
                continue
            if self._on_done is not None:
                # One report per group, not per file: each front end refreshes its tree once for it.
                self._on_done(list(zip(batch, outcomes, strict=True)))
