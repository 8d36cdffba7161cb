"""``dicomfs check``: prove the index and the blobs agree, and repair what can be repaired.

Checked: every record's parent exists and links to it; every link joins two records; the copy of
an instance's record its link holds, when it holds one, is the record; counts and
sizes at every level equal a recount of what is below; the global counters equal the records;
the UID, date and recycling indexes match the records; every instance and attachment has its blob
with the recorded size and (unless ``verify_hashes`` is off) the recorded SHA-256; and every blob
on disk is referenced, or pending for a live writer.

Repair never deletes data: orphan blobs and damaged blobs move to ``quarantine/``; entries whose
blob is missing or damaged leave the index (the quarantine keeps a JSON note of each); counts,
sizes, links and secondary indexes are rebuilt from the records.

Memory stays bounded whatever the size of the store: records are read one at a time in key
order, and only patients, studies and series (a few per hundred instances) are kept, with sums of
what is below them; blob names are kept as 16 bytes each and compared one shard at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from dicomfs.store.ids import Level, ResourceId
from dicomfs.store.index import COUNTER_NAMES, Index, Txn
from dicomfs.store.mutations import TxnChanges, remove_resource
from dicomfs.store.records import Instance, Patient, Record, Series, Study, encode_record, replace_record
from dicomfs.store.store import Store

__all__ = ["CheckReport", "check_store"]

_RELEASE_EVERY = 64
"""Records read between two ``Index.release_pages`` (a few microseconds each): a check reads the
whole index, whose mapped pages would otherwise all end up in its RSS (~600 MB at 760,000
instances). Each record costs a random read in the links and in the UID index, ~64-100 KiB
mapped each: 64 of them ~12 MB."""


@dataclass
class CheckReport:
    """What ``check`` found and, with repair, what it did."""

    problems: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    broken_instances: list[str] = field(default_factory=list)
    """Instances whose blob is missing or damaged: what repair takes out of the index."""
    records: int = 0
    blobs: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, object]:
        return {"clean": self.clean, "problems": self.problems, "repairs": self.repairs,
                "records": self.records, "blobs": self.blobs, "seconds": round(self.seconds, 3)}


def check_store(store: Store, *, repair: bool = False, verify_hashes: bool = True) -> CheckReport:
    """Check ``store`` (opened writable, so interrupted operations were already recovered)."""
    started = time.monotonic()
    report = CheckReport()
    # Listed before the snapshot: a blob written after it is then either referenced or pending in
    # the snapshot, or not listed at all, and never taken for an orphan.
    on_disk = _BlobNames.of(store.blobs.names())
    referenced = _BlobNames()
    with store.index.read() as txn:
        dated = {study for _, study in store.index.studies_by_date(txn)}
        recycling = set(store.index.recycling_order(txn))
        secondary: list[str] = []
        blob_problems: list[str] = []

        def visit(record: Record) -> None:
            _check_secondary(store.index, txn, record, dated, recycling, secondary)
            if isinstance(record, Instance):
                referenced.add(record.blob)
                problem = _blob_problem(store, record.blob, record.codec, record.size, record.stored_size,
                                        record.sha256, verify_hashes)
                if problem:
                    blob_problems.append(f"instance {record.id}: {problem}")
                    report.broken_instances.append(record.id)

        census = _Census.take(store.index, txn, visit)
        report.records = census.records
        report.problems += _parent_problems(store.index, txn, census)
        report.problems += _link_problems(store.index, txn, census)
        report.problems += [f"instance {rid}: the copy of its record kept with its link differs from the record"
                            for rid in census.stale_copies]
        report.problems += [f"{census.nodes[rid].label} {rid}: counts {recorded} but recount gives {expected}"
                            for rid, recorded, expected in census.miscounted()]
        report.problems += _counter_problems(store.index, txn, census.totals())
        report.problems += secondary
        for study in sorted(dated - census.studies):
            report.problems.append(f"date index names a study that does not exist: {study}")
        for patient in sorted(recycling - census.patients):
            if store.index.get(txn, patient) is None:
                report.problems.append(f"recycling order names a patient that does not exist: {patient}")
        report.problems += blob_problems
        report.problems += _check_attachments(store, txn, referenced)
        pending = {blob for _, blob in store.index.pending(txn)}
    report.blobs = on_disk.count()
    orphans = sorted(blob for shard in on_disk.shards() for blob in on_disk.names(shard) - referenced.names(shard) - pending
                     if store.blobs.exists(blob))
    for blob in orphans:
        report.problems.append(f"orphan blob {blob}: no index entry refers to it")
    if repair and report.problems:
        _repair(store, orphans, report)
    report.seconds = time.monotonic() - started
    return report


# -- the census: one pass over the records -----------------------------------------------------


@dataclass
class _Node:
    """What the census keeps of a patient, study or series (and of an instance that, damaged,
    has records below it): where it is, and what it says is below it."""

    label: str
    parent: ResourceId | None
    recorded: dict[str, int]
    is_instance: bool = False


@dataclass
class _Census:
    """The records of an index, read once in key order and summed up per parent."""

    nodes: dict[ResourceId, _Node] = field(default_factory=dict)
    """Every patient, study and series, in key order; instances with records below them too."""
    children: defaultdict[ResourceId | None, int] = field(default_factory=lambda: defaultdict(int))
    """Records per parent, linked or not."""
    linked: defaultdict[ResourceId | None, int] = field(default_factory=lambda: defaultdict(int))
    """Records per parent that the parent links to."""
    unlinked: list[tuple[ResourceId | None, ResourceId]] = field(default_factory=list)
    """(parent, record) where the parent does not link to the record."""
    below: defaultdict[ResourceId, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    """Instances, size and stored size of the instances right below each parent."""
    levels: defaultdict[Level, int] = field(default_factory=lambda: defaultdict(int))
    size: int = 0
    stored_size: int = 0
    studies: set[ResourceId] = field(default_factory=set)
    patients: set[ResourceId] = field(default_factory=set)
    missing_parents: set[ResourceId] = field(default_factory=set)
    stale_copies: list[ResourceId] = field(default_factory=list)
    """Instances whose link holds a copy of their record that is not the record."""

    @property
    def records(self) -> int:
        return sum(self.levels.values())

    @classmethod
    def take(cls, index: Index, txn: Txn, visit: Callable[[Record], None]) -> _Census:
        """Read every record once (calling ``visit`` on each), then find which parents exist."""
        census = cls()
        for record in _each_record(index, txn):
            census._count(index, txn, record)
            visit(record)
        for parent in [p for p in census.children if p is not None and p not in census.nodes]:
            found = index.get(txn, parent)  # normally none: only damage puts records below an instance
            if found is None:
                census.missing_parents.add(parent)
            else:
                census.nodes[parent] = _Node(found.level.label, found.parent, {}, is_instance=True)
        return census

    def _count(self, index: Index, txn: Txn, record: Record) -> None:
        parent = record.parent
        self.levels[record.level] += 1
        self.children[parent] += 1
        row = index.link_row(txn, parent, record.id)
        if row is not None:
            self.linked[parent] += 1
        else:
            self.unlinked.append((parent, record.id))
        if isinstance(record, Instance):
            if row and row != encode_record(record):
                self.stale_copies.append(record.id)
            below = self.below[record.parent]
            below[0] += 1
            below[1] += record.size
            below[2] += record.stored_size
            self.size += record.size
            self.stored_size += record.stored_size
            return
        recorded = {"instances": record.instances, "size": record.size, "stored_size": record.stored_size}
        if isinstance(record, Study):
            recorded["series"] = record.series
            self.studies.add(record.id)
        if isinstance(record, Patient):
            recorded["studies"] = record.studies
            recorded["series"] = record.series
            self.patients.add(record.id)
        self.nodes[record.id] = _Node(record.level.label, parent, recorded)

    def exists(self, parent: ResourceId | None) -> bool:
        """Whether ``parent``, the parent of some record, is the root or a record."""
        return parent is None or parent in self.nodes

    def miscounted(self) -> list[tuple[ResourceId, dict[str, int], dict[str, int]]]:
        """(id, recorded, recount) of every patient, study and series whose counts are wrong."""
        below_nodes: defaultdict[ResourceId | None, list[ResourceId]] = defaultdict(list)
        for rid, node in self.nodes.items():
            below_nodes[node.parent].append(rid)
        sums: dict[ResourceId, list[int]] = {}
        for start in self.nodes:  # depth first without recursion; a damaged tree's cycle is cut where it closes
            visiting = {start}
            stack = [(start, iter(below_nodes.get(start, [])))]
            while stack:
                rid, rest = stack[-1]
                child = next((c for c in rest if c not in sums and c not in visiting), None)
                if child is not None:
                    visiting.add(child)
                    stack.append((child, iter(below_nodes.get(child, []))))
                    continue
                stack.pop()
                total = list(self.below.get(rid, (0, 0, 0)))
                for done in below_nodes.get(rid, []):
                    for position, value in enumerate(sums.get(done, (0, 0, 0))):
                        total[position] += value
                sums[rid] = total
        wrong = []
        for rid, node in self.nodes.items():
            if node.is_instance:
                continue
            instances, size, stored = sums[rid]
            expected = {"instances": instances, "size": size, "stored_size": stored}
            if "studies" in node.recorded:
                expected["studies"] = self.children.get(rid, 0)
                expected["series"] = sum(self.children.get(child, 0) for child in below_nodes.get(rid, []))
            elif "series" in node.recorded:
                expected["series"] = self.children.get(rid, 0)
            if node.recorded != expected:
                wrong.append((rid, node.recorded, expected))
        return wrong

    def totals(self) -> dict[str, int]:
        return {"patients": self.levels[Level.PATIENT], "studies": self.levels[Level.STUDY],
                "series": self.levels[Level.SERIES], "instances": self.levels[Level.INSTANCE],
                "size": self.size, "stored_size": self.stored_size}


def _each_record(index: Index, txn: Txn) -> Iterator[Record]:
    """Every record in key order, letting go of the mapped index pages as the pass goes."""
    for count, record in enumerate(index.all_records(txn), 1):
        yield record
        if count % _RELEASE_EVERY == 0:
            index.release_pages()


def _parent_problems(index: Index, txn: Txn, census: _Census) -> list[str]:
    """Records whose parent is missing, in key order: a second pass, made only when there are some."""
    if not census.missing_parents:
        return []
    return [f"{record.level.label} {record.id}: its parent {record.parent} is missing"
            for record in _each_record(index, txn) if record.parent in census.missing_parents]


def _link_problems(index: Index, txn: Txn, census: _Census) -> list[str]:
    """Records their parent does not link to, and links that join no record, parent by parent."""
    missing: defaultdict[ResourceId | None, list[str]] = defaultdict(list)
    for parent, child in census.unlinked:
        if census.exists(parent):
            missing[parent].append(child)
    dangling: defaultdict[ResourceId | None, list[str]] = defaultdict(list)
    for parent, count in index.link_counts(txn).items():
        if count == census.linked.get(parent, 0):
            continue  # every link is one of the records found linked
        if not _is_record(index, txn, census, parent):
            continue  # links under no record: not a parent anything is checked for
        for child in index.child_ids(txn, parent):
            record = index.get(txn, child)
            if record is None or record.parent != parent:
                dangling[parent].append(child)
    problems = []
    for parent in sorted(set(missing) | set(dangling), key=lambda p: "" if p is None else p):
        problems += [f"{child}: not linked under its parent {parent or 'root'}" for child in sorted(missing.get(parent, []))]
        problems += [f"link {parent or 'root'} -> {child} joins no record" for child in sorted(dangling.get(parent, []))]
    return problems


def _is_record(index: Index, txn: Txn, census: _Census, parent: ResourceId | None) -> bool:
    """Whether ``parent`` is the root or a record, even one no record names as its parent."""
    return census.exists(parent) or (parent is not None and index.get(txn, parent) is not None)


def _counter_problems(index: Index, txn: Txn, totals: dict[str, int]) -> list[str]:
    problems = []
    for name in COUNTER_NAMES:
        if name == "attachment_bytes":
            continue
        if index.counter(txn, name) != totals[name]:
            problems.append(f"counter {name} is {index.counter(txn, name)} but the records add up to {totals[name]}")
    return problems


def _check_secondary(index: Index, txn: Txn, record: Record, dated: set[ResourceId], recycling: set[ResourceId],
                     problems: list[str]) -> None:
    uid = _uid_of(record)
    if uid is not None and (record.level, record.id) not in index.find_uid(txn, uid):
        problems.append(f"{record.level.label} {record.id}: missing from the UID index")
    if isinstance(record, Study) and record.id not in dated:
        problems.append(f"study {record.id}: missing from the date index")
    if isinstance(record, Patient) and (record.id in recycling) == record.protected:
        problems.append(f"patient {record.id}: recycling order disagrees with its protection")


def _uid_of(record: Record) -> str | None:
    if isinstance(record, Study):
        return record.study_uid
    if isinstance(record, Series):
        return record.series_uid
    if isinstance(record, Instance):
        return record.sop_uid
    return None


def _check_attachments(store: Store, txn: Txn, referenced: _BlobNames) -> list[str]:
    problems = []
    total = 0
    for resource_id, key, entry in store.index.all_attachment_blobs(txn):
        referenced.add(entry.blob)
        total += entry.stored_size
        if store.index.get(txn, resource_id) is None:
            problems.append(f"attachment {key} belongs to a resource that does not exist: {resource_id}")
        problem = _blob_problem(store, entry.blob, entry.codec, entry.size, entry.stored_size, entry.sha256, True)
        if problem:
            problems.append(f"attachment {key} of {resource_id}: {problem}")
    if store.index.counter(txn, "attachment_bytes") != total:
        problems.append(f"counter attachment_bytes is {store.index.counter(txn, 'attachment_bytes')} but attachments add up to {total}")
    return problems


def _blob_problem(store: Store, blob: str, codec: str, size: int, stored: int, digest: str, verify: bool) -> str:
    try:
        on_disk = store.blobs.stored_size(blob)
    except FileNotFoundError:
        return f"blob {blob} is missing"
    if on_disk != stored:
        return f"blob {blob} has {on_disk} bytes on disk, the index records {stored}"
    if not verify:
        return ""
    hasher = hashlib.sha256()
    try:
        with store.blobs.open(blob, codec, size) as reader:
            for chunk in reader.iter_chunks():
                hasher.update(chunk)
    except Exception as error:  # StoreCorruptError and decompression errors: the blob is damaged
        return f"blob {blob} cannot be read: {error}"
    if hasher.hexdigest() != digest:
        return f"blob {blob} does not match its recorded SHA-256"
    return ""


class _BlobNames:
    """A set of blob names grouped by shard (their first two characters), 16 bytes a name.

    A million names as a set of str would take ~100 MB; here ~16 MB, and one shard's names
    (~4,000) become a set only while that shard is compared. Names that are not 32 lowercase hex
    digits (never made by BlobStore.new_name, but a file may be anything) are kept as they are."""

    def __init__(self) -> None:
        self._packed: defaultdict[str, bytearray] = defaultdict(bytearray)
        self._other: defaultdict[str, set[str]] = defaultdict(set)

    @classmethod
    def of(cls, names: Iterable[str]) -> _BlobNames:
        found = cls()
        for name in names:
            found.add(name)
        return found

    def add(self, name: str) -> None:
        if len(name) == 32:
            try:
                packed = bytes.fromhex(name)
            except ValueError:
                packed = b""
            if packed.hex() == name:
                self._packed[name[:2]] += packed
                return
        self._other[name[:2]].add(name)

    def shards(self) -> list[str]:
        return sorted(set(self._packed) | set(self._other))

    def names(self, shard: str) -> set[str]:
        packed = self._packed.get(shard, b"")
        return {packed[at : at + 16].hex() for at in range(0, len(packed), 16)} | self._other.get(shard, set())

    def count(self) -> int:
        """How many different names."""
        return sum(len(self.names(shard)) for shard in self.shards())


# -- repair ----------------------------------------------------------------------------------------


def _repair(store: Store, orphans: list[str], report: CheckReport) -> None:
    quarantine = store.folder / "quarantine" / time.strftime("%Y%m%dT%H%M%S")
    quarantine.mkdir(parents=True, exist_ok=True)
    for blob in orphans:
        os.replace(store.blobs.path(blob), quarantine / blob)
        report.repairs.append(f"moved orphan blob {blob} to {quarantine}")
    changes = TxnChanges()
    with store.index.write() as txn:
        for resource_id in report.broken_instances:
            record = store.index.get(txn, resource_id)
            if not isinstance(record, Instance):
                continue
            if store.blobs.exists(record.blob):
                os.replace(store.blobs.path(record.blob), quarantine / record.blob)
            (quarantine / f"{record.id}.json").write_text(json.dumps(dataclasses.asdict(record), indent=1))
            remove_resource(store.index, txn, resource_id, changes)
            report.repairs.append(f"removed instance {resource_id} from the index (its blob was missing or damaged)")
        _rebuild(store.index, txn, report)
        if changes.log:
            store.index.log_changes(txn, changes.log)
    for blob in changes.garbage:
        store.blobs.remove(blob)


def _rebuild(index: Index, txn: Txn, report: CheckReport) -> None:
    """Recompute links, counts, sizes, counters and secondary indexes from the records.

    The records are read twice (a census, then a pass that writes the links and indexes of each)
    rather than held: only other tables are written while the records are read."""
    census = _Census.take(index, txn, lambda record: None)
    for record in _each_record(index, txn):
        if census.exists(record.parent):
            index.link(txn, record.parent, record.id, listed=record if isinstance(record, Instance) else None)
        uid = _uid_of(record)
        if uid is not None:
            index.add_uid(txn, uid, record.level, record.id)
        if isinstance(record, Study):
            index.add_date(txn, record.date, record.id)
        if isinstance(record, Patient):
            if record.protected:
                index.remove_recycling(txn, record.recycle_seq, record.id)
            else:
                index.add_recycling(txn, record.recycle_seq, record.id)
    for parent, count in index.link_counts(txn).items():
        if count != census.children.get(parent, 0) and _is_record(index, txn, census, parent):
            for child in [c for c in index.child_ids(txn, parent) if index.get(txn, c) is None]:
                index.unlink(txn, parent, child)
    for resource_id, _, expected in census.miscounted():
        miscounted = index.get(txn, resource_id)
        assert miscounted is not None
        index.put(txn, replace_record(miscounted, **expected))
        report.repairs.append(f"recounted {miscounted.level.label} {miscounted.id}")
    for date, study in list(index.studies_by_date(txn)):
        if study not in census.studies:
            index.remove_date(txn, date, study)
    for name, value in census.totals().items():
        index.set_counter(txn, name, value)
