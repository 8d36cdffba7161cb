"""The LMDB index: its tables, key layouts and the small operations everything else builds on.

Tables (LMDB named databases) and their keys::

    resources  id(20)                          -> record row (see records)
    children   parent id(20) + child id(20)    -> b"", or an instance's record row (below)
    dates      StudyDate(8, blank = unknown) + study id(20) -> b""   by-date browsing
    uids       UID + NUL + level(1) + id(20)   -> b""     find resources by a DICOM UID
    recycling  seq(8 BE) + patient id(20)      -> b""     oldest unprotected patient first
    metadata   id(20) + key(2 BE)              -> UTF-8 value            (user metadata)
    attachments id(20) + key(2 BE)             -> msgpack [blob, codec, size, stored, sha256, mime]
    counters   name                            -> u64 (patients, studies, series, instances,
                                                  size, stored_size, attachment_bytes, change, seq)
    pending    owner(16) + blob name           -> b""     blobs an operation may leave behind
    changes    change number(8 BE)             -> msgpack [[op, level, id], ...]
    numbers    (see numbering)                          numbers the views keep for names

The link of an instance to its series holds a copy of the instance's record, written in the same
transaction as the record (``link(..., listed=)``, again after a replacing put), so that the records of a series come
with one range scan of ``children``. Read one by one, they cost a random index page each once the
caches are cold: instance ids are hashes, so a series' records are spread over ``resources``, and
listing 1,000 of them took 80 ms of 4 KiB reads. Other links, and instance links written before
this copy existed, are b"": their records are read from ``resources``. Records above the instances
change with every instance added, so they are not copied.

Every write goes through one LMDB write transaction, so counts and links never disagree even with
several processes writing (LMDB serialises writers across processes). The ``change`` counter goes
up with every commit that changes resources: other processes poll it to notice new data.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, TypeAlias

import lmdb
import msgpack

from dicomfs.errors import StoreError, StoreFullError
from dicomfs.store import numbering
from dicomfs.store.ids import ROOT_KEY, Level, ResourceId, id_from_key, key_from_id
from dicomfs.store.libc import MADV_DONTNEED, madvise
from dicomfs.store.records import Instance, Record, decode_record, encode_record

__all__ = ["COUNTER_NAMES", "AttachmentEntry", "CachedIndex", "Index", "Txn"]

if TYPE_CHECKING:
    # Every transaction here is opened with buffers=False, so keys and values are bytes. py-lmdb's
    # stubs make Transaction generic over that; the runtime class cannot be subscripted.
    Txn: TypeAlias = lmdb.Transaction[bytes]
else:
    Txn = lmdb.Transaction
_U64 = struct.Struct(">Q")
_TABLES = ("resources", "children", "dates", "uids", "recycling", "metadata", "attachments", "counters",
           "pending", "changes", "properties", "jobs")
COUNTER_NAMES = ("patients", "studies", "series", "instances", "size", "stored_size", "attachment_bytes")
_LEVEL_COUNTER = {Level.PATIENT: "patients", Level.STUDY: "studies", Level.SERIES: "series",
                  Level.INSTANCE: "instances"}
_CHANGES_KEPT = 100_000
"""Change-log entries kept: enough for a mount that was busy for a while to catch up exactly."""
_NEARLY_FULL = 4 << 20
"""Free bytes under which a failed commit is taken for a full disk (a commit writes a few MiB)."""
_MAP_SIZE = 1 << 40
"""Address space, not disk: 1 TiB lets the index grow without ever resizing (a resize forces
every other process to reopen)."""


@dataclass(frozen=True)
class AttachmentEntry:
    """Where an attachment's bytes are; stored as the msgpack row ``[blob, codec, size, stored_size,
    sha256, mime]``."""

    blob: str
    codec: str
    size: int
    stored_size: int
    sha256: str
    mime: str

    def to_row(self) -> list[object]:
        return [self.blob, self.codec, self.size, self.stored_size, self.sha256, self.mime]

    @classmethod
    def from_row(cls, row: list[Any]) -> AttachmentEntry:
        return cls(str(row[0]), str(row[1]), int(row[2]), int(row[3]), str(row[4]), str(row[5]))


class Index:
    """An open LMDB environment with its tables."""

    def __init__(self, folder: Path, *, readonly: bool = False) -> None:
        if not readonly:
            folder.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(folder),
            map_size=_MAP_SIZE,
            max_dbs=len(_TABLES) + 4,
            max_readers=1024,
            readonly=readonly,
            readahead=False,  # random access over a large index: readahead only evicts useful pages
            meminit=False,
            lock=True,
        )
        self.readonly = readonly
        self.folder = folder
        self._mapped: list[tuple[int, int]] | None = None  # see release_pages
        # Opened without an explicit transaction: py-lmdb then commits the one it makes, which keeps
        # the handles valid in a read-only environment too (an aborted read txn would void them).
        self.db = {name: self.env.open_db(name.encode(), create=not readonly) for name in _TABLES}
        self.numbers_db = self._open_numbers()

    def _open_numbers(self) -> lmdb._Database | None:
        """The ``numbers`` table (see ``numbering``); None in an index written before it existed
        and opened read-only, which then has no numbers to read."""
        try:
            return self.env.open_db(b"numbers", create=not self.readonly)
        except lmdb.NotFoundError:
            return None

    def close(self) -> None:
        self.env.close()

    def release_pages(self) -> None:
        """Unmap the index pages this process has read; they stay in the page cache.

        Reading a record maps its page and, by the kernel's fault-around (MDB_NORDAHEAD's
        madvise(MADV_RANDOM) does not stop it), up to 15 neighbours: 64 KiB of RSS per record read
        at random, so a listing of every study of a million instances left ~300 MB of clean page
        cache counted in a daemon's RSS. The map is read-only (no MDB_WRITEMAP), so dropping it
        loses nothing and is safe while other threads read: their next access maps the page again
        from the cache. Where /proc/self/maps is missing (not Linux) this does nothing.

        The map's address is looked up once: the environment maps its fixed ``_MAP_SIZE`` at open
        and never moves it (nothing here resizes it; code that ever does must reset ``_mapped``),
        and reading /proc/self/maps each time cost 0.4 ms a call, 12% of a check that calls this
        every 64 records."""
        if self._mapped is None:
            self._mapped = self._find_map()
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        for start, end in self._mapped:
            madvise(start, min(end - start, used), MADV_DONTNEED)  # failing, it leaves them mapped: harmless

    def _find_map(self) -> list[tuple[int, int]]:
        """Where data.mdb is mapped in this process (none found: an empty list)."""
        target = os.path.realpath(self.folder / "data.mdb")
        try:
            with open("/proc/self/maps") as maps:
                regions = [line.split(maxsplit=5) for line in maps if target in line]
        except OSError:
            return []
        found = []
        for region in regions:
            if len(region) == 6 and region[5].rstrip("\n") == target:
                start, end = (int(address, 16) for address in region[0].split("-"))
                found.append((start, end))
        return found

    def read(self) -> Txn:
        """A read transaction (a consistent snapshot); use it in a ``with`` block and keep it short."""
        return self.env.begin(buffers=False)

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        """The write transaction; LMDB lets one writer at a time in, across processes.

        Committed when the block ends normally, aborted on an exception. A commit that fails
        because the disk is full raises StoreFullError, any other failure StoreError.
        """
        txn = self.env.begin(write=True)
        try:
            yield txn
        except BaseException:
            txn.abort()
            raise
        try:
            txn.commit()
        except lmdb.Error as error:
            if isinstance(error, lmdb.MapFullError) or "No space left" in str(error) or self._disk_nearly_full():
                raise StoreFullError(f"storage full: no space left for the index in {self.folder}") from None
            raise StoreError(f"the index in {self.folder} could not be written: {error}") from None

    def _disk_nearly_full(self) -> bool:
        """LMDB reports a short write on a full disk as EIO; free space tells the two apart."""
        stats = os.statvfs(self.folder)
        return stats.f_bavail * stats.f_frsize < _NEARLY_FULL

    # -- resources -------------------------------------------------------------------------------

    def get(self, txn: Txn, resource_id: str) -> Record | None:
        key = key_from_id(resource_id)
        row = txn.get(key, db=self.db["resources"])
        return None if row is None else decode_record(key, row)

    def put(self, txn: Txn, record: Record) -> None:
        txn.put(key_from_id(record.id), encode_record(record), db=self.db["resources"])

    def delete_record(self, txn: Txn, record: Record) -> None:
        txn.delete(key_from_id(record.id), db=self.db["resources"])
        numbering.forget(self, txn, record.id)

    def link(self, txn: Txn, parent: str | None, child: str, listed: Instance | None = None) -> None:
        """Link ``child`` under ``parent``; an instance's link with its record, ``listed``."""
        row = b"" if listed is None else encode_record(listed)
        txn.put(_parent_key(parent) + key_from_id(child), row, db=self.db["children"])

    def unlink(self, txn: Txn, parent: str | None, child: str) -> None:
        txn.delete(_parent_key(parent) + key_from_id(child), db=self.db["children"])

    def _links(self, txn: Txn, parent: str | None, *, values: bool = True) -> Iterator[tuple[bytes, bytes]]:
        """(child key, what the link holds; b"" without ``values``) for each child of ``parent``, in key order."""
        prefix = _parent_key(parent)
        cursor = txn.cursor(db=self.db["children"])
        if not cursor.set_range(prefix):
            return
        links = cursor.iternext(keys=True, values=True) if values else ((key, b"") for key in cursor.iternext(keys=True, values=False))
        for key, row in links:
            if not key.startswith(prefix):
                return
            yield key[20:], row

    def child_ids(self, txn: Txn, parent: str | None) -> Iterator[ResourceId]:
        """Ids of the children of ``parent`` (``None``: every patient), in key order."""
        for key, _ in self._links(txn, parent, values=False):  # the copies are not read for ids
            yield id_from_key(key)

    def children(self, txn: Txn, parent: str | None) -> Iterator[Record]:
        """The records of the children of ``parent``: an instance's from its link when it holds one."""
        for key, row in self._links(txn, parent):
            if row:
                yield decode_record(key, row)
                continue
            record = self.get(txn, id_from_key(key))
            if record is not None:
                yield record

    def link_row(self, txn: Txn, parent: str | None, child: str) -> bytes | None:
        """What the link of ``child`` under ``parent`` holds (None: not linked), for ``check``."""
        row = txn.get(_parent_key(parent) + key_from_id(child), db=self.db["children"])
        return None if row is None else bytes(row)

    def link_counts(self, txn: Txn) -> dict[ResourceId | None, int]:
        """How many children are linked under each parent (``None``: the patients), for ``check``:
        one pass over the links, converting only each distinct parent's key."""
        counts: dict[bytes, int] = {}
        for number, key in enumerate(txn.cursor(db=self.db["children"]).iternext(keys=True, values=False), 1):
            parent = key[:20]
            counts[parent] = counts.get(parent, 0) + 1
            if number % 4096 == 0:  # ~3 MB of links, each holding a copy of its record: let them go
                self.release_pages()
        return {None if parent == ROOT_KEY else id_from_key(parent): count for parent, count in counts.items()}

    def all_records(self, txn: Txn) -> Iterator[Record]:
        """Every record in the index (for ``check``)."""
        for key, row in txn.cursor(db=self.db["resources"]):
            yield decode_record(key, row)

    # -- secondary indexes -----------------------------------------------------------------------

    def add_uid(self, txn: Txn, uid: str, level: Level, resource_id: str) -> None:
        txn.put(_uid_key(uid, level, resource_id), b"", db=self.db["uids"])

    def remove_uid(self, txn: Txn, uid: str, level: Level, resource_id: str) -> None:
        txn.delete(_uid_key(uid, level, resource_id), db=self.db["uids"])

    def find_uid(self, txn: Txn, uid: str) -> list[tuple[Level, ResourceId]]:
        """Resources whose DICOM UID (study, series or SOP instance) is ``uid``."""
        prefix = uid.encode("ascii", "replace") + b"\0"
        cursor = txn.cursor(db=self.db["uids"])
        found: list[tuple[Level, ResourceId]] = []
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                found.append((Level(key[len(prefix)]), id_from_key(key[len(prefix) + 1 :])))
        return found

    def has_padded_uid(self, txn: Txn, uid: str, padding: str, longest: int) -> bool:
        """Whether some resource's UID is ``uid`` with characters of ``padding`` added before or
        after it (at least one), or starts with such a padded ``uid`` of ``longest`` bytes.

        A non-ASCII character counts as ``?`` (the keys store UIDs so). A few cursor moves, however
        many UIDs merely extend ``uid`` (``uid.1``, ``uid.1.1``, ...): only keys made of padding
        and ``uid`` are visited."""
        cursor = txn.cursor(db=self.db["uids"])
        core, pads = uid.encode("ascii", "replace"), padding.encode("ascii", "replace")

        def begins(prefix: bytes) -> bool:
            """Whether some key starts with ``prefix`` (``uid + NUL``: a resource has that UID)."""
            return bool(cursor.set_range(prefix)) and cursor.key().startswith(prefix)

        def padded_after(prefix: bytes, padded: bool) -> bool:
            if len(prefix) >= longest:
                return padded and begins(prefix)
            if padded and begins(prefix + b"\0"):
                return True
            return any(begins(prefix + bytes([pad])) and padded_after(prefix + bytes([pad]), True) for pad in pads)

        def padded_before(prefix: bytes) -> bool:
            if len(prefix) >= longest:
                return begins(prefix)
            if padded_after(prefix + core, bool(prefix)):
                return True
            return any(begins(prefix + bytes([pad])) and padded_before(prefix + bytes([pad])) for pad in pads)

        return padded_before(b"")

    def add_date(self, txn: Txn, date: str, study_id: str) -> None:
        txn.put(_date_key(date) + key_from_id(study_id), b"", db=self.db["dates"])

    def remove_date(self, txn: Txn, date: str, study_id: str) -> None:
        txn.delete(_date_key(date) + key_from_id(study_id), db=self.db["dates"])

    def studies_by_date(self, txn: Txn, prefix: str = "") -> Iterator[tuple[str, ResourceId]]:
        """(StudyDate, study id) in date order, for dates starting with ``prefix``; unknown dates
        (not eight digits) come first, as a blank date."""
        encoded = prefix.encode("ascii", "replace")
        cursor = txn.cursor(db=self.db["dates"])
        if not cursor.set_range(encoded):
            return
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(encoded):
                return
            yield key[:8].decode("ascii").strip(), id_from_key(key[8:])

    def add_recycling(self, txn: Txn, seq: int, patient_id: str) -> None:
        txn.put(_U64.pack(seq) + key_from_id(patient_id), b"", db=self.db["recycling"])

    def remove_recycling(self, txn: Txn, seq: int, patient_id: str) -> None:
        txn.delete(_U64.pack(seq) + key_from_id(patient_id), db=self.db["recycling"])

    def recycling_order(self, txn: Txn) -> Iterator[ResourceId]:
        """Unprotected patients, the one stored longest ago first."""
        for key in txn.cursor(db=self.db["recycling"]).iternext(keys=True, values=False):
            yield id_from_key(key[8:])

    # -- counters and the change log -------------------------------------------------------------

    def counter(self, txn: Txn, name: str) -> int:
        value = txn.get(name.encode(), db=self.db["counters"])
        return 0 if value is None else int(_U64.unpack(value)[0])

    def add_to_counter(self, txn: Txn, name: str, delta: int) -> int:
        value = self.counter(txn, name) + delta
        txn.put(name.encode(), _U64.pack(max(value, 0)), db=self.db["counters"])
        return value

    def set_counter(self, txn: Txn, name: str, value: int) -> None:
        txn.put(name.encode(), _U64.pack(value), db=self.db["counters"])

    def count_level(self, txn: Txn, level: Level, delta: int) -> None:
        self.add_to_counter(txn, _LEVEL_COUNTER[level], delta)

    def log_changes(self, txn: Txn, changes: list[tuple[str, int, str]]) -> int:
        """Record one commit's changes (``op`` is ``+``, ``-`` or ``~``); returns its number."""
        number = self.add_to_counter(txn, "change", 1)
        txn.put(_U64.pack(number), msgpack.packb(_condense(changes)), db=self.db["changes"])
        if number > _CHANGES_KEPT:
            txn.delete(_U64.pack(number - _CHANGES_KEPT), db=self.db["changes"])
        return number

    def changes_since(self, txn: Txn, number: int) -> Iterator[tuple[int, list[tuple[str, int, str]]]]:
        """Commits after ``number``, oldest first, as (change number, changes)."""
        cursor = txn.cursor(db=self.db["changes"])
        if cursor.set_range(_U64.pack(number + 1)):
            for key, value in cursor:
                yield _U64.unpack(key)[0], [tuple(c) for c in msgpack.unpackb(value)]

    # -- pending blobs ---------------------------------------------------------------------------

    def add_pending(self, txn: Txn, owner: bytes, blob: str) -> None:
        txn.put(owner + blob.encode(), b"", db=self.db["pending"])

    def remove_pending(self, txn: Txn, owner: bytes, blob: str) -> None:
        txn.delete(owner + blob.encode(), db=self.db["pending"])

    def pending(self, txn: Txn) -> Iterator[tuple[bytes, str]]:
        """Every (owner, blob) an operation announced and has not finished with."""
        for key in txn.cursor(db=self.db["pending"]).iternext(keys=True, values=False):
            yield key[:16], key[16:].decode()

    # -- metadata and attachments ----------------------------------------------------------------

    def metadata(self, txn: Txn, resource_id: str) -> dict[int, str]:
        return {k: v.decode() for k, v in self._items(txn, "metadata", resource_id)}

    def put_metadata(self, txn: Txn, resource_id: str, key: int, value: str) -> None:
        txn.put(key_from_id(resource_id) + key.to_bytes(2, "big"), value.encode(), db=self.db["metadata"])

    def delete_metadata(self, txn: Txn, resource_id: str, key: int) -> bool:
        return bool(txn.delete(key_from_id(resource_id) + key.to_bytes(2, "big"), db=self.db["metadata"]))

    def attachments(self, txn: Txn, resource_id: str) -> dict[int, AttachmentEntry]:
        return {k: AttachmentEntry.from_row(msgpack.unpackb(v)) for k, v in self._items(txn, "attachments", resource_id)}

    def put_attachment(self, txn: Txn, resource_id: str, key: int, entry: AttachmentEntry) -> None:
        txn.put(key_from_id(resource_id) + key.to_bytes(2, "big"), msgpack.packb(entry.to_row()), db=self.db["attachments"])

    def delete_attachment(self, txn: Txn, resource_id: str, key: int) -> None:
        txn.delete(key_from_id(resource_id) + key.to_bytes(2, "big"), db=self.db["attachments"])

    def _items(self, txn: Txn, table: str, resource_id: str) -> Iterator[tuple[int, bytes]]:
        prefix = key_from_id(resource_id)
        cursor = txn.cursor(db=self.db[table])
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not key.startswith(prefix):
                    return
                yield int.from_bytes(key[20:22], "big"), value

    def all_attachment_blobs(self, txn: Txn) -> Iterator[tuple[ResourceId, int, AttachmentEntry]]:
        """Every attachment (for ``check``): (resource id, key, entry)."""
        for key, value in txn.cursor(db=self.db["attachments"]):
            yield id_from_key(key[:20]), int.from_bytes(key[20:22], "big"), AttachmentEntry.from_row(msgpack.unpackb(value))


def _parent_key(parent: str | None) -> bytes:
    return ROOT_KEY if parent is None else key_from_id(parent)


def _uid_key(uid: str, level: Level, resource_id: str) -> bytes:
    return uid.encode("ascii", "replace") + b"\0" + bytes([int(level)]) + key_from_id(resource_id)


def _date_key(date: str) -> bytes:
    """Eight ASCII digits, or eight blanks for a missing or malformed date (sorted first)."""
    return date.encode("ascii") if len(date) == 8 and date.isdigit() else b" " * 8


class CachedIndex(Index):
    """The Index seen through one write transaction, with records and counters kept in memory.

    A batch of instances of one series would otherwise read, decode, encode and write the same
    patient, study and series records once per instance; here they are written once, at
    ``flush``. It shares the environment and tables of the index it caches; everything that is
    not a record or a counter goes straight to them.
    """

    def __init__(self, index: Index) -> None:  # shares index's handles: no second environment
        self.env, self.db, self.readonly, self.folder = index.env, index.db, index.readonly, index.folder
        self.numbers_db = index.numbers_db
        self._records: dict[str, Record | None] = {}
        self._dirty: set[str] = set()
        self._counters: dict[str, int] = {}

    def get(self, txn: Txn, resource_id: str) -> Record | None:
        if resource_id not in self._records:
            self._records[resource_id] = super().get(txn, resource_id)
        return self._records[resource_id]

    def put(self, txn: Txn, record: Record) -> None:
        self._records[record.id] = record
        self._dirty.add(record.id)

    def delete_record(self, txn: Txn, record: Record) -> None:
        self._records[record.id] = None
        self._dirty.add(record.id)
        numbering.forget(self, txn, record.id)  # not cached: straight into the transaction

    def counter(self, txn: Txn, name: str) -> int:
        if name not in self._counters:
            self._counters[name] = super().counter(txn, name)
        return self._counters[name]

    def add_to_counter(self, txn: Txn, name: str, delta: int) -> int:
        value = max(self.counter(txn, name) + delta, 0)
        self._counters[name] = value
        return value

    def set_counter(self, txn: Txn, name: str, value: int) -> None:
        self._counters[name] = value

    def children(self, txn: Txn, parent: str | None) -> Iterator[Record]:
        """The records of the children of ``parent``, through the cache: a record changed in this
        batch is newer here than anything in the transaction."""
        for child in self.child_ids(txn, parent):
            record = self.get(txn, child)
            if record is not None:
                yield record

    def flush(self, txn: Txn) -> None:
        """Write the changed records and counters into the transaction (call before commit)."""
        for resource_id in self._dirty:
            record = self._records[resource_id]
            if record is None:
                txn.delete(key_from_id(resource_id), db=self.db["resources"])
            else:
                super().put(txn, record)
        for name, value in self._counters.items():
            super().set_counter(txn, name, value)
        self._dirty.clear()


def _condense(changes: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """One entry per resource: creation or removal wins over an update."""
    kept: dict[str, tuple[str, int, str]] = {}
    for op, level, resource_id in changes:
        previous = kept.get(resource_id)
        if previous is None or previous[0] == "~":
            kept[resource_id] = (op, level, resource_id)
        elif previous[0] == "+" and op == "-":
            kept[resource_id] = (op, level, resource_id)
    return list(kept.values())
