"""The receiving side of a transfer: say what is already here, and commit what arrives.

Used by the bridge's ``/transfers/`` endpoints (push: a peer sends buckets here) and by the pull
job (this process fetches buckets from a peer); both hand decoded buckets to :meth:`Receiver.receive`.

- A whole instance is checked against its SHA-256, then ingested with the others of its bucket
  in one group commit; the answer names it stored only once that commit is durable.
- A chunk of a large instance is written at its offset into ``<store>/transfers/partial/`` and
  its range recorded beside it, both fsynced, so a receiver killed half-way keeps what it had:
  :meth:`Receiver.lookup` reports the ranges held and the sender sends only the others. The
  instance is checked and ingested when its last range arrives.
- A SHA-256 mismatch is *damaged*: nothing is kept, and the sender sends the instance again.
- An instance the store cannot take now (its disk full, its limits reached) is *later*: the
  sender backs off and sends it again; it is never failed for good for the receiver's state.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomfs.store import Instance, Store
from dicomfs.store.candidates import ALREADY_STORED, REPLACED, STORED
from dicomfs.store.sources import Source
from dicomfs.transfers.protocol import Piece, Wanted, merge_ranges, missing_ranges
from dicomfs.transfers.validation import ManifestError, is_instance_id, is_sha256

__all__ = ["Lookup", "Received", "Receiver"]

_log = logging.getLogger("dicomfs.transfers")
_HASH_BLOCK = 1 << 20
_KEPT = frozenset({STORED, ALREADY_STORED, REPLACED})


@dataclass
class Lookup:
    """What a receiver holds of the instances it was asked about."""

    have: list[str] = field(default_factory=list)
    """Stored here with the same SHA-256: not to be sent."""
    partial: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Chunks already received of instances not yet complete: (start, end) ranges."""

    def as_json(self) -> dict[str, object]:
        return {"have": self.have, "partial": {k: [list(r) for r in v] for k, v in self.partial.items()}}


@dataclass
class Received:
    """What became of the pieces of one bucket."""

    stored: list[str] = field(default_factory=list)
    """Instances now durable here (or already here), by the id the sender gave."""
    failed: dict[str, str] = field(default_factory=dict)
    """Instances refused for good, with the reason (e.g. not DICOM)."""
    damaged: list[str] = field(default_factory=list)
    """Instances whose SHA-256 did not match: to be sent again."""
    later: dict[str, str] = field(default_factory=dict)
    """Instances the store could not take now (its disk full, its limits), with why: to be sent again later."""
    partial: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Instances still incomplete after this bucket, with the ranges held."""

    def as_json(self) -> dict[str, object]:
        return {"stored": self.stored, "failed": self.failed, "damaged": self.damaged, "later": self.later,
                "partial": {k: [list(r) for r in v] for k, v in self.partial.items()}}


class Receiver:
    """Commits transferred instances into ``store``; keeps its work files under ``folder``."""

    def __init__(self, store: Store, folder: Path | None = None) -> None:
        self.store = store
        folder = folder or store.folder / "transfers"
        self.partial = folder / "partial"

    def lookup(self, wanted: Sequence[Wanted]) -> Lookup:
        found = Lookup()
        for item, record in zip(wanted, self.store.records([w.id for w in wanted]), strict=True):
            if isinstance(record, Instance) and record.sha256 == item.sha256:
                found.have.append(item.id)
                continue
            held = self._held(item.id, item.sha256, item.size)
            if held and not missing_ranges(held, item.size):
                if self._finish_held(item):
                    found.have.append(item.id)
            elif held:
                found.partial[item.id] = held
        return found

    def receive(self, pieces: Iterable[tuple[Piece, memoryview | bytes]], *, origin: str = "transfer",
                remote: str = "") -> Received:
        """Check and commit the pieces of one bucket; returns once what it names stored is durable."""
        outcome = Received()
        ready: list[tuple[str, Source]] = []
        try:
            for piece, data in pieces:
                if piece.whole:
                    if hashlib.sha256(data).hexdigest() != piece.sha256:
                        outcome.damaged.append(piece.id)
                    else:
                        ready.append((piece.id, Source(f"transfer:{piece.id}", "", content=bytes(data))))
                    continue
                complete = self._add_chunk(piece, data)
                if complete is None:
                    outcome.damaged.append(piece.id)
                elif isinstance(complete, Path):
                    ready.append((piece.id, Source(f"transfer:{piece.id}", str(complete))))
                else:
                    outcome.partial[piece.id] = complete
            self._commit(ready, outcome, origin=origin, remote=remote)
        finally:
            _remove_finished(ready)
        for item in outcome.stored:  # an instance done in this bucket is no longer partial
            outcome.partial.pop(item, None)
        return outcome

    def _commit(self, ready: list[tuple[str, Source]], outcome: Received, *, origin: str, remote: str) -> None:
        """Ingest checked instances in one group commit and sort them into ``outcome``."""
        if not ready:
            return
        # By label, not by position: a zip sent as an instance would yield a result per member.
        results = {r.path: r for r in self.store.ingest_sources([source for _, source in ready], origin=origin,
                                                                 remote=remote, in_process=True)}
        for item, source in ready:
            result = results.get(source.label)
            if result is None:
                outcome.failed[item] = "not a single DICOM instance"
            elif result.status in _KEPT:
                outcome.stored.append(item)
            elif result.retry:
                outcome.later[item] = result.reason
            else:
                outcome.failed[item] = result.reason or result.status

    def _finish_held(self, item: Wanted) -> bool:
        """An instance whose every chunk is here but which was never committed (the receiver was
        killed in between): check and commit it now; whether it is stored. Else its chunks are
        dropped and it is sent again whole."""
        part = self._part(item.id, item.sha256)
        try:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            whole = _file_sha256(fd, item.size) == item.sha256
        finally:
            os.close(fd)
        ready = [(item.id, Source(f"transfer:{item.id}", str(part)))]
        outcome = Received()
        try:
            if whole:
                self._commit(ready, outcome, origin="transfer", remote="")
        finally:
            _remove_finished(ready)
        return item.id in outcome.stored

    def sweep(self, max_age: float) -> int:
        """Remove work files older than ``max_age`` seconds (transfers abandoned); how many went."""
        removed, cutoff = 0, time.time() - max_age
        for entry in os.scandir(self.partial) if self.partial.is_dir() else ():
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- chunks of large instances ----------------------------------------------------------------

    def _part(self, item: str, sha256: str) -> Path:
        """The chunk file of an instance. Its name is made of a peer's strings: they are checked
        here, where they become a path, whatever checked them before (``validation``)."""
        if not (is_instance_id(item) and is_sha256(sha256)):
            raise ManifestError(f"no chunk file for instance {item[:48]!r}: not a dicomfs id and a SHA-256")
        return self.partial / f"{item}.{sha256[:32]}.part"

    def _held(self, item: str, sha256: str, size: int) -> list[tuple[int, int]]:
        part = self._part(item, sha256)
        try:
            length = part.stat().st_size
        except FileNotFoundError:
            return []
        # A range whose bytes are not in the file (a crash between the two fsyncs) is not held.
        return [(s, e) for s, e in _read_ranges(part.with_suffix(".ranges")) if e <= length and e <= size]

    def _add_chunk(self, piece: Piece, data: memoryview | bytes) -> list[tuple[int, int]] | Path | None:
        """Write a chunk in place; the ranges now held, or the finished file once the instance is
        whole and its SHA-256 matches, or None when it does not (everything is dropped)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        part = self._part(piece.id, piece.sha256)
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # chunks of one instance may arrive on several threads
            os.pwrite(fd, data, piece.offset)
            os.fsync(fd)
            ranges_path = part.with_suffix(".ranges")
            with open(ranges_path, "a", encoding="ascii") as ranges:
                ranges.write(f"{piece.offset} {piece.offset + piece.length}\n")
                ranges.flush()
                os.fsync(ranges.fileno())
            held = merge_ranges(_read_ranges(ranges_path))
            if missing_ranges(held, piece.size):
                return held
            if _file_sha256(fd, piece.size) == piece.sha256:
                return part
            _log.warning("instance %s: SHA-256 mismatch once all its chunks arrived; dropped for resending", piece.id)
            part.unlink(missing_ok=True)
            ranges_path.unlink(missing_ok=True)
            return None
        finally:
            os.close(fd)


def _remove_finished(ready: list[tuple[str, Source]]) -> None:
    """The work files of finished large instances, committed (or refused): chunks and ranges."""
    for _, source in ready:
        if source.path:
            Path(source.path).unlink(missing_ok=True)
            Path(source.path).with_suffix(".ranges").unlink(missing_ok=True)


def _read_ranges(path: Path) -> list[tuple[int, int]]:
    """The ranges recorded in a ``.ranges`` file; a line torn by a crash is ignored."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and all(f.isdigit() for f in fields):
            ranges.append((int(fields[0]), int(fields[1])))
    return merge_ranges(ranges)


def _file_sha256(fd: int, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, _HASH_BLOCK):
        digest.update(os.pread(fd, min(_HASH_BLOCK, size - offset), offset))
    return digest.hexdigest()
