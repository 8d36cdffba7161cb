"""A background queue that ingests completed uploads in groups.

A client copying a CD sends hundreds of files one after the other and waits for each answer.
Ingesting inside each request would make it wait for a group commit (a sync) per file; instead
the front end answers at once and queues the file here, and one thread hands whatever has
queued up meanwhile (letting it gather for up to ``ingest.batch_delay_ms`` first) to the ingest
process (``upload_worker``), which stores it in a single group commit. The file stays visible in
``uploads/`` until it is stored, then vanishes; what is not DICOM stays with its reason (see
``uploads``). A copy's many groups make one log line, its total, once it is over (``_Copies``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence

from dicomfs.store import Store
from dicomfs.upload_worker import UploadIngester
from dicomfs.store.candidates import REJECTED
from dicomfs.uploads import EMPTY, EMPTY_REASON, Stamp, UploadArea, UploadOutcome, said_counts, stamp_of

__all__ = ["QUIET_SECONDS", "UploadQueue"]

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
QUIET_SECONDS = 2.0
"""A copy is over once nothing came for its folder this long: cp, rclone and Explorer send the next
file as soon as the last is answered (well under a second); a copy that stalls longer gets a total
for each part, which says what happened."""
_MOST_COPIES = 256
"""Copies counted at once (top-level names in uploads/): past that the longest quiet is logged early."""


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
        self._copies = _Copies(area)  # the queue thread's only
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
                self._condition.wait_for(lambda: self._waiting or self._closed, self._copies.next_due())
                over = self._closed and not self._waiting
                group: list[tuple[tuple[str, ...], tuple[str, Stamp | None]]] = []
                if self._waiting:
                    self._gather()
                    while self._waiting and len(group) < _MOST_PER_GROUP:
                        group.append(self._waiting.popitem(last=False))
                    self._in_progress = {parts for parts, _ in group}
                # a copy with files still to come is not over, however long its last group took
                coming = _copies_of(self._waiting.keys() | self._in_progress) if self._copies.due() else set()
            self._copies.log_quiet(besides=coming, everything=over)
            if over:
                return
            if not group:
                continue
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
        started = time.monotonic()
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
                reason = f"not stored: {error}"
                for parts in batch:
                    self._keep_with_reason(parts, reason)
                self._copies.count([(parts, UploadOutcome([], removed=False, reason=reason)) for parts in batch], started)
                continue
            reports = list(zip(batch, outcomes, strict=True))
            self._copies.count(reports, started)
            if self._on_done is not None:
                # One report per group, not per file: each front end refreshes its tree once for it.
                self._on_done(reports)


@dataclass
class _Copy:
    """What became of the files of one copy so far."""

    started: float
    last: float
    counts: Counter[str] = field(default_factory=Counter)


class _Copies:
    """The totals of the copies under way, one per top-level name in uploads/ (a folder, a zip),
    and one for files straight into uploads/; each logged once quiet for ``QUIET_SECONDS``, then
    dropped."""

    def __init__(self, area: UploadArea) -> None:
        self._area = area
        self._copies: OrderedDict[str, _Copy] = OrderedDict()  # by label, the longest quiet first

    def count(self, outcomes: list[tuple[tuple[str, ...], UploadOutcome]], started: float) -> None:
        """Add a group's outcomes (its ingest began at ``started``, monotonic)."""
        now = time.monotonic()
        for parts, outcome in outcomes:
            if outcome.results:
                statuses = [result.status for result in outcome.results]
            elif outcome.removed or not outcome.reason:
                continue  # clutter, gone, or written again: nothing to count (yet)
            else:
                statuses = [EMPTY if outcome.reason == EMPTY_REASON else REJECTED]
            label = self._label(parts, outcome)
            copy = self._copies.pop(label, None) or _Copy(started, now)
            copy.last = now
            copy.counts.update(statuses)
            self._copies[label] = copy
            if len(self._copies) > _MOST_COPIES:
                self._log(*self._copies.popitem(last=False))

    def next_due(self) -> float | None:
        """Seconds until the longest quiet copy is over; None when none is under way."""
        if not self._copies:
            return None
        return max(0.0, next(iter(self._copies.values())).last + QUIET_SECONDS - time.monotonic())

    def due(self) -> bool:
        return self.next_due() == 0.0

    def log_quiet(self, *, besides: set[str], everything: bool = False) -> None:
        """Log and drop the copies quiet for long enough (all of them when ``everything``) but those in ``besides``."""
        limit = time.monotonic() - QUIET_SECONDS
        for label, copy in list(self._copies.items()):
            if not everything and (copy.last > limit or label in besides):
                continue
            del self._copies[label]
            self._log(label, copy)

    def _label(self, parts: tuple[str, ...], outcome: UploadOutcome) -> str:
        if len(parts) > 1:
            return f"uploads/{parts[0]}/"
        if outcome.results and outcome.results[0].path != str(self._area.path(parts)):
            return f"uploads/{parts[0]}"  # a zip's members: the zip is the copy
        return "uploads/"

    @staticmethod
    def _log(label: str, copy: _Copy) -> None:
        total = sum(copy.counts.values())
        unit = "file" if label.endswith("/") else "member"
        look = " (see the lines above)" if copy.counts[REJECTED] or copy.counts[EMPTY] else ""
        _log.info("%s: %d %s%s in %.1f s: %s%s", label, total, unit, "" if total == 1 else "s",
                  copy.last - copy.started, said_counts(copy.counts), look)


def _copies_of(uploads: Iterable[tuple[str, ...]]) -> set[str]:
    """The labels of the copies ``uploads`` may belong to."""
    labels = set()
    for parts in uploads:
        labels.update((f"uploads/{parts[0]}/",) if len(parts) > 1 else ("uploads/", f"uploads/{parts[0]}"))
    return labels
