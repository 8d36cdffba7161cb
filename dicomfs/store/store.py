"""The store: one folder holding an LMDB index and the blob files, behind one synchronous API.

Layout of a store folder::

    dicomfs-store.json   marks the folder as a store (format version, creation time)
    index/               LMDB environment (see ``index``)
    blobs/ab/<name>      instance and attachment bytes (see ``blobs``)
    owners/              one lock file per process writing now (see ``owners``)
    quarantine/          what ``check --repair`` set aside: never deleted by dicomfs
    tmp/                 nameless files: zip members and deflated datasets too large for memory
                         while ingest reads them (see ``inflate``); they vanish when closed

Several processes (the mount, the WebDAV bridge, the CLI) may open one store at once: LMDB
serialises writers and gives readers snapshots. All methods block; async front ends call them
from worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from dicomfs.errors import (
    AmbiguousError,
    NotFoundError,
    ReadOnlyError,
    RejectedFileError,
    StoreError,
    StoreFullError,
    StoreNotFoundError,
)
from dicomfs.store import numbering
from dicomfs.store.blobs import BlobReader, BlobStore, sync_filesystem
from dicomfs.store.ids import Level, ResourceId, looks_like_id, patient_resource_id
from dicomfs.store.index import COUNTER_NAMES, AttachmentEntry, Index, Txn
from dicomfs.store.metadata import core_metadata, user_key
from dicomfs.store.mutations import TxnChanges, remove_resource, set_protected
from dicomfs.store.owners import Owner, recover
from dicomfs.store.records import Instance, Patient, Record
from dicomfs.store.settings import WriteSettings

if TYPE_CHECKING:
    from concurrent.futures import Future

    from dicomfs.store.candidates import IngestResult
    from dicomfs.store.committer import GroupCommitter
    from dicomfs.store.inflate import Expansion
    from dicomfs.store.sources import Source

# What only writing needs (the parser, the committer, sources and archives) is imported where it
# is used: commands that only read (``export``, ``ls``, ``jobs``) start ~15 ms sooner.

__all__ = ["Attachment", "Store", "StoreStats"]

_MARKER = "dicomfs-store.json"
_BULK_MIN_FILES = 64
"""Below this many files, starting worker processes (~0.3 s) costs more than it saves."""
_BULK_MAX_MEAN_SIZE = 256 << 10
"""Above this mean size, hashing and copying (which release the GIL) dominate, and one process
with its committer thread is faster than paying for worker start-up (200 files of 512 KiB:
0.85-0.96 s against 1.04-1.10 s measured)."""


def _mean_size(sources: list[Source]) -> float:
    """Mean size of the files among ``sources`` (zip members count as their archive's share)."""
    sizes = []
    for source in sources:
        try:
            sizes.append(os.stat(source.path).st_size if not source.member else 0)
        except OSError:
            sizes.append(0)
    return sum(sizes) / len(sizes) if sizes else 0.0
_FORMAT = 1


@dataclass(frozen=True)
class StoreStats:
    """Counts and bytes of the whole store."""

    patients: int
    studies: int
    series: int
    instances: int
    size: int
    stored_size: int
    attachment_bytes: int
    change: int

    @property
    def compression_ratio(self) -> float:
        """Original bytes per byte on disk (1.0 for an uncompressed or empty store)."""
        return self.size / self.stored_size if self.stored_size else 1.0

    def as_json(self) -> dict[str, object]:
        return {"patients": self.patients, "studies": self.studies, "series": self.series,
                "instances": self.instances, "bytes": self.size, "stored_bytes": self.stored_size,
                "attachment_bytes": self.attachment_bytes, "compression_ratio": round(self.compression_ratio, 4),
                "change": self.change}


@dataclass(frozen=True)
class Attachment:
    """A user attachment of a resource."""

    name: str
    key: int
    mime: str
    size: int
    stored_size: int
    sha256: str
    blob: str
    codec: str


class Store:
    """An open store. Use ``Store.open`` (or ``Store.create``) in a ``with`` block."""

    def __init__(
        self,
        folder: Path,
        *,
        readonly: bool = False,
        settings: WriteSettings = WriteSettings(),
        metadata_names: Mapping[str, int] | None = None,
        attachment_types: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        if not (folder / _MARKER).exists():
            raise StoreNotFoundError(f"no dicomfs store at {folder} (create one with `dicomfs init`)")
        self.folder = folder
        self.readonly = readonly
        self.settings = settings
        self.metadata_names = dict(metadata_names or {})
        self.attachment_types = dict(attachment_types or {})
        self.index = Index(folder / "index", readonly=readonly)
        self.blobs = BlobStore(folder / "blobs")
        self._owner: Owner | None = None
        self._committer: GroupCommitter | None = None
        if not readonly:
            from dicomfs.store.committer import GroupCommitter

            self._owner = Owner(folder / "owners")
            (folder / "tmp").mkdir(exist_ok=True)  # stores made before tmp/ existed
            recover(self.index, self.blobs, folder / "owners")
            self._committer = GroupCommitter(self.index, self.blobs, self._owner, folder, settings)

    @classmethod
    def create(cls, folder: Path, **options: object) -> "Store":
        """Create a store in ``folder`` (which may exist, empty or already a store) and open it."""
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / _MARKER
        if not marker.exists():
            if any(p.name != "lost+found" for p in folder.iterdir()):
                raise StoreError(f"{folder} is not empty and is not a dicomfs store: refusing to use it")
            for sub in ("index", "blobs", "owners", "quarantine", "tmp"):
                (folder / sub).mkdir(exist_ok=True)
            BlobStore(folder / "blobs").create_folders()
            temporary = folder / (_MARKER + ".tmp")
            temporary.write_text(json.dumps({"format": _FORMAT, "created": time.time()}) + "\n")
            temporary.rename(marker)
            sync_filesystem(folder)
        return cls(folder, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        try:
            if self._committer is not None:
                self._committer.close()
                self._committer = None
        finally:
            if self._owner is not None:
                self._owner.release()
                self._owner = None
            self.index.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def find(self, resource_id: str) -> Record | None:
        """The record of ``resource_id``, or None."""
        with self.index.read() as txn:
            return self.index.get(txn, resource_id)

    def get(self, resource_id: str) -> Record:
        """The record of ``resource_id``; NotFoundError when there is none."""
        record = self.find(resource_id)
        if record is None:
            raise NotFoundError(f"no resource with id {resource_id}")
        return record

    def records(self, resource_ids: Iterable[str]) -> list[Record | None]:
        """The records of several resources, read in one snapshot (None where there is none)."""
        with self.index.read() as txn:
            return [self.index.get(txn, rid) for rid in resource_ids]

    def studies_by_date(self, prefix: str = "") -> list[tuple[str, ResourceId]]:
        """(StudyDate, study id) in date order for dates starting with ``prefix``; studies without
        a valid eight-digit date come first, with a blank date."""
        with self.index.read() as txn:
            return list(self.index.studies_by_date(txn, prefix))

    def child_ids(self, resource_id: str | None = None) -> list[ResourceId]:
        """The ids of the children of a resource (``None``: all patients), in index order."""
        with self.index.read() as txn:
            return list(self.index.child_ids(txn, resource_id))

    def release_pages(self) -> None:
        """Let go of the index pages read so far (``Index.release_pages``): after a large read."""
        self.index.release_pages()

    def children(self, resource_id: str | None = None) -> list[Record]:
        """The children of a resource (``None``: all patients), in index order."""
        with self.index.read() as txn:
            return list(self.index.children(txn, resource_id))

    def ancestors(self, record: Record) -> list[Record]:
        """The parents of ``record``, patient first."""
        chain: list[Record] = []
        with self.index.read() as txn:
            parent = record.parent
            while parent is not None:
                found = self.index.get(txn, parent)
                if found is None:
                    break
                chain.insert(0, found)
                parent = found.parent
        return chain

    def walk(self, level: Level, parent: str | None = None) -> list[Record]:
        """Every resource of ``level``, under ``parent`` when given, depth first.

        A list, not a generator: the read transaction must not stay open while a caller loops
        (a long-lived snapshot keeps LMDB from reusing pages).
        """
        found: list[Record] = []
        with self.index.read() as txn:
            starts = [self.index.get(txn, parent)] if parent else list(self.index.children(txn, None))
            stack = [r for r in starts if r is not None]
            stack.reverse()
            while stack:
                record = stack.pop()
                if record.level == level:
                    found.append(record)
                elif record.level < level:
                    stack.extend(reversed(list(self.index.children(txn, record.id))))
        return found

    def with_uid(self, uid: str, level: Level, *, padding: str = "", longest: int = 0) -> list[Record] | None:
        """The resources of ``level`` whose DICOM UID is exactly ``uid``, read in one snapshot.

        With ``padding``: None instead when some resource's UID is ``uid`` padded with those
        characters (``Index.has_padded_uid``), so that a name made from the UID may be shared."""
        with self.index.read() as txn:
            if padding and self.index.has_padded_uid(txn, uid, padding, longest):
                return None
            found = [self.index.get(txn, rid) for found_level, rid in self.index.find_uid(txn, uid) if found_level == level]
        return [r for r in found if r is not None]

    def resolve(self, selector: str) -> list[Record]:
        """Resources named by a selector: a resource id, a DICOM UID, or a PatientID."""
        selector = selector.strip()
        with self.index.read() as txn:
            if looks_like_id(selector):
                record = self.index.get(txn, selector)
                if record is not None:
                    return [record]
            found = [self.index.get(txn, rid) for _, rid in self.index.find_uid(txn, selector)]
            if not found:
                found = [self.index.get(txn, patient_resource_id(selector))]
        records = [r for r in found if r is not None]
        if not records:
            raise NotFoundError(f"nothing in the store matches {selector!r} (not an id, a UID or a PatientID)")
        return records

    def instances_of(self, selectors: Iterable[str]) -> list[Instance]:
        """Every instance the selectors name (see ``resolve``) or holds below, each once, in
        selector order: what an export or a transfer of those selectors sends."""
        found: dict[str, Instance] = {}
        for selector in selectors:
            for record in self.resolve(selector):
                below = [record] if isinstance(record, Instance) else self.walk(Level.INSTANCE, record.id)
                found.update((r.id, r) for r in below if isinstance(r, Instance))
        return list(found.values())

    def resolve_one(self, selector: str) -> Record:
        """The single resource a selector names; AmbiguousError if it names several."""
        records = self.resolve(selector)
        if len(records) > 1:
            ids = ", ".join(f"{r.level.label} {r.id}" for r in records)
            raise AmbiguousError(f"{selector!r} matches {len(records)} resources ({ids}): use an id")
        return records[0]

    def stats(self) -> StoreStats:
        with self.index.read() as txn:
            values = {name: self.index.counter(txn, name) for name in (*COUNTER_NAMES, "change")}
        return StoreStats(**values)

    def change_number(self) -> int:
        """Goes up with every commit that changes resources (other processes' too)."""
        with self.index.read() as txn:
            return self.index.counter(txn, "change")

    def changes_since(self, number: int) -> list[tuple[str, int, str]]:
        """What commits after change ``number`` did, as (op, level, resource id): op is ``+``
        (created), ``-`` (removed) or ``~`` (changed). Front ends use it to invalidate caches."""
        with self.index.read() as txn:
            return [change for _, changes in self.index.changes_since(txn, number) for change in changes]

    def changes_after(self, number: int, most: int) -> tuple[int, list[tuple[str, int, str]]] | None:
        """The store's change number and what the commits after change ``number`` did (as
        ``changes_since``), read in one snapshot; None when there were more than ``most`` of them
        or the change log no longer reaches back to them (it keeps the last commits only)."""
        with self.index.read() as txn:
            current = self.index.counter(txn, "change")
            if not number <= current <= number + most:
                return None
            commits = list(self.index.changes_since(txn, number))
        if current > number and (not commits or commits[0][0] != number + 1):
            return None
        return current, [change for _, changes in commits for change in changes]

    # -- numbers kept for the views' names (see numbering) ---------------------------------------

    def name_numbers(self, context: str) -> dict[ResourceId, int]:
        """The numbers kept in ``context``, by resource id."""
        with self.index.read() as txn:
            return numbering.numbers(self.index, txn, context)

    def keep_name_numbers(self, context: str, decide: Callable[[Mapping[ResourceId, int]], Mapping[ResourceId, int]]
                          ) -> dict[ResourceId, int]:
        """Keep the numbers ``decide`` returns, given those kept in ``context``; returns them all.

        ``decide`` runs in the write transaction: two processes deciding at once take turns, and
        the second sees what the first kept. A number for a resource that no longer exists is not
        kept (nothing would delete it). A store that cannot write (opened read-only, or its disk
        full) keeps nothing and returns what ``decide`` says for this once."""
        if not self.readonly:
            try:
                with self.index.write() as txn:
                    kept = numbering.numbers(self.index, txn, context)
                    for resource_id, number in decide(kept).items():
                        if kept.get(resource_id) != number and self.index.get(txn, resource_id) is not None:
                            numbering.keep(self.index, txn, context, resource_id, number)
                            kept[resource_id] = number
                return kept
            except StoreFullError:
                pass
        kept = self.name_numbers(context)
        return {**kept, **decide(kept)}

    def open_instance(self, resource_id: str) -> BlobReader:
        """A reader of an instance's original bytes."""
        record = self.get(resource_id)
        if not isinstance(record, Instance):
            raise NotFoundError(f"{resource_id} is a {record.level.label}, not an instance")
        return self.blobs.open(record.blob, record.codec, record.size)

    # -- ingest --------------------------------------------------------------------------------

    def ingest(self, paths: Iterable[Path], *, origin: str = "cli", remote: str = "") -> Iterator[IngestResult]:
        """Ingest files, folders, zips and DICOMDIRs; yield one result per file, in order.

        A result is yielded only once the instance is durable (or was judged not to need storing).
        """
        from dicomfs.store.sources import iter_sources

        return self.ingest_sources(iter_sources(list(paths)), origin=origin, remote=remote)

    def ingest_sources(self, sources: Iterable[Source], *, origin: str = "cli", remote: str = "",
                       in_process: bool = False) -> Iterator[IngestResult]:
        """Ingest sources already listed (see ``sources.iter_sources``); results as for ``ingest``.

        Many files go through worker processes (see ``bulk``); a few, or all when ``in_process``,
        through the committer thread. A front end ingesting what clients uploaded meanwhile passes
        ``in_process``: its groups are small and frequent, and starting workers costs ~1 s each time.
        """
        from dicomfs.store.candidates import IngestResult

        committer = self._writer()
        remaining = iter(sources)
        first = list(itertools.islice(remaining, _BULK_MIN_FILES))
        sources = itertools.chain(first, remaining)  # listing goes on while the first files go in
        workers = self.settings.workers or os.cpu_count() or 1
        if not in_process and workers > 1 and len(first) >= _BULK_MIN_FILES and _mean_size(first) < _BULK_MAX_MEAN_SIZE:
            from dicomfs.store.bulk import ingest_in_workers  # multiprocessing: ~10 ms at every start otherwise

            yield from ingest_in_workers(committer, self.folder, self.settings, sources,
                                         origin=origin, remote=remote, workers=workers)
            return
        waiting: deque[Future[IngestResult] | IngestResult] = deque()
        sources = iter(sources)
        source = next(sources, None)
        while source is not None:
            following = next(sources, None)  # the last source's batch commits without waiting for more
            waiting.extend(self._offer(committer, source, origin, remote, last=following is None))
            source = following
            while waiting and (isinstance(waiting[0], IngestResult) or waiting[0].done()):
                head = waiting.popleft()
                yield head if isinstance(head, IngestResult) else head.result()
        for head in waiting:
            yield head if isinstance(head, IngestResult) else head.result()

    def ingest_file(self, path: Path, *, label: str | None = None, origin: str = "cli", remote: str = "") -> list[IngestResult]:
        """Ingest one file and wait until it is durable; one result per DICOM file it holds (a zip
        archive holds several). Front ends ingest uploads in groups (``ingest_sources``)."""
        from dicomfs.store.candidates import IngestResult
        from dicomfs.store.sources import Source

        pending = self._offer(self._writer(), Source(label or str(path), str(path)), origin, remote, last=True)
        return [p if isinstance(p, IngestResult) else p.result() for p in pending]

    @functools.cached_property
    def _expansion(self) -> Expansion:
        """How far ingest lets a file expand, and where to: made once (the path join per file was
        a tenth of the ingest's added cost in a profile)."""
        from dicomfs.store.inflate import Expansion

        return Expansion(self.settings.max_expanded_size, str(self.folder / "tmp"))

    def _offer(self, committer: GroupCommitter, source: Source, origin: str, remote: str,
               last: bool = False) -> "list[Future[IngestResult] | IngestResult]":
        """Examine one source and hand a candidate to the committer; verdicts come back at once.
        ``last``: nothing follows it, so its batch need not wait for company."""
        from dicomfs.store.candidates import Archive, Candidate, examine, unreadable
        from dicomfs.store.committer import Submission
        from dicomfs.store.sources import archive_members

        closer = contextlib.ExitStack()
        expansion = self._expansion
        try:
            data, fd = closer.enter_context(source.open(expansion))
            found = examine(source, data, origin, remote, expansion)
        except (OSError, RejectedFileError) as error:
            closer.close()
            return [unreadable(source, error)]
        except BaseException:
            closer.close()
            raise
        if isinstance(found, Candidate):
            return [committer.submit(Submission(found, data, fd, closer, last=last,  # the committer closes it
                                                handed_over=source.handed_over))]
        closer.close()
        if isinstance(found, Archive):
            members = archive_members(source.path)
            return [p for number, member in enumerate(members, 1)
                    for p in self._offer(committer, member, origin, remote, last and number == len(members))]
        return [found]

    def _writer(self) -> GroupCommitter:
        if self._committer is None:
            raise ReadOnlyError(f"the store at {self.folder} is open read-only")
        return self._committer

    # -- changes -------------------------------------------------------------------------------

    def delete(self, resource_id: str) -> int:
        """Delete a resource and everything below it; returns the number of instances removed."""
        self.get(resource_id)
        with self._changing() as (txn, changes):
            return remove_resource(self.index, txn, resource_id, changes)

    def set_protected(self, resource_id: str, protected: bool) -> Patient:
        """Protect a patient from recycling (or lift the protection)."""
        with self._changing() as (txn, changes):
            record = self.index.get(txn, resource_id)
            if not isinstance(record, Patient):
                raise NotFoundError(f"{resource_id} is not a patient: only patients can be protected")
            return set_protected(self.index, txn, record, protected, changes)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[tuple[Txn, TxnChanges]]:
        """A write transaction whose garbage blobs are deleted once it is durable."""
        committer = self._writer()
        changes = TxnChanges()
        with self.index.write() as txn:
            yield txn, changes
            assert self._owner is not None
            for blob in changes.garbage:
                self.index.add_pending(txn, self._owner.token, blob)
            if changes.log:
                self.index.log_changes(txn, changes.log)
        for blob in changes.garbage:
            self.blobs.remove(blob)
        committer.release_later(changes.garbage)

    # -- metadata ------------------------------------------------------------------------------

    def metadata(self, resource_id: str) -> dict[str, str]:
        """Core metadata, then user metadata by configured name (or key number when unnamed)."""
        record = self.get(resource_id)
        names = {key: name for name, key in self.metadata_names.items()}
        with self.index.read() as txn:
            user = self.index.metadata(txn, resource_id)
        values = core_metadata(record)
        values.update({names.get(key, str(key)): value for key, value in sorted(user.items())})
        return values

    def set_metadata(self, resource_id: str, name: str, value: str) -> None:
        key = user_key(self.metadata_names, name)
        if len(value.encode()) > 4096:
            raise StoreError("metadata values are limited to 4 KiB: store larger data as an attachment")
        with self._changing() as (txn, changes):
            record = self._existing(txn, resource_id)
            self.index.put_metadata(txn, resource_id, key, value)
            changes.note("~", record)

    def delete_metadata(self, resource_id: str, name: str) -> None:
        key = user_key(self.metadata_names, name)
        with self._changing() as (txn, changes):
            record = self._existing(txn, resource_id)
            if not self.index.delete_metadata(txn, resource_id, key):
                raise NotFoundError(f"{resource_id} has no metadata {name!r}")
            changes.note("~", record)

    # -- attachments ---------------------------------------------------------------------------

    def attachments(self, resource_id: str) -> list[Attachment]:
        self.get(resource_id)
        names = {key: name for name, (key, _) in self.attachment_types.items()}
        with self.index.read() as txn:
            entries = self.index.attachments(txn, resource_id)
        return [Attachment(names.get(key, str(key)), key, e.mime, e.size, e.stored_size, e.sha256, e.blob, e.codec)
                for key, e in sorted(entries.items())]

    def attachment(self, resource_id: str, name: str) -> Attachment:
        key = self._attachment_key(name)
        for attachment in self.attachments(resource_id):
            if attachment.key == key:
                return attachment
        raise NotFoundError(f"{resource_id} has no attachment {name!r}")

    def open_attachment(self, resource_id: str, name: str) -> BlobReader:
        attachment = self.attachment(resource_id, name)
        return self.blobs.open(attachment.blob, attachment.codec, attachment.size)

    def put_attachment(self, resource_id: str, name: str, source: Path, mime: str | None = None) -> Attachment:
        """Store the file ``source`` as attachment ``name``, replacing any previous one."""
        from dicomfs.store.sources import Source

        key = self._attachment_key(name)
        configured_mime = next((m for k, m in self.attachment_types.values() if k == key), "application/octet-stream")
        self._writer()  # refuses when read-only
        assert self._owner is not None
        blob = self.blobs.new_name()
        with self.index.write() as txn:
            self._existing(txn, resource_id)
            self.index.add_pending(txn, self._owner.token, blob)
        try:
            with Source(str(source), str(source)).open() as (data, fd):
                digest = hashlib.sha256(data).hexdigest()
                codec = self.settings.codec
                stored = self.blobs.write(blob, data, codec=codec, level=self.settings.level,
                                          block_size=self.settings.block_size, source_fd=fd)
                size = len(data)
            sync_filesystem(self.folder)
            entry = AttachmentEntry(blob, codec, size, stored, digest, mime or configured_mime)
            with self._changing() as (txn, changes):
                record = self._existing(txn, resource_id)
                previous = self.index.attachments(txn, resource_id).get(key)
                if previous is not None:
                    changes.garbage.append(previous.blob)
                    self.index.add_to_counter(txn, "attachment_bytes", -previous.stored_size)
                self.index.put_attachment(txn, resource_id, key, entry)
                self.index.add_to_counter(txn, "attachment_bytes", stored)
                self.index.remove_pending(txn, self._owner.token, blob)
                changes.note("~", record)
        except BaseException:
            # the resource went meanwhile, the disk is full, ...: the new blob is not kept
            self.blobs.remove(blob)
            self._writer().release_later([blob])
            raise
        return self.attachment(resource_id, name)

    def delete_attachment(self, resource_id: str, name: str) -> None:
        key = self._attachment_key(name)
        with self._changing() as (txn, changes):
            record = self._existing(txn, resource_id)
            entry = self.index.attachments(txn, resource_id).get(key)
            if entry is None:
                raise NotFoundError(f"{resource_id} has no attachment {name!r}")
            self.index.delete_attachment(txn, resource_id, key)
            self.index.add_to_counter(txn, "attachment_bytes", -entry.stored_size)
            changes.garbage.append(entry.blob)
            changes.note("~", record)

    def _attachment_key(self, name: str) -> int:
        return user_key({n: k for n, (k, _) in self.attachment_types.items()}, name, what="attachment")

    def _existing(self, txn: Txn, resource_id: str) -> Record:
        record = self.index.get(txn, resource_id)
        if record is None:
            raise NotFoundError(f"no resource with id {resource_id}")
        return record
