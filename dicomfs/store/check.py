"""``dicomfs check``: prove the index and the blobs agree, and repair what can be repaired.

Checked: every record's parent exists and links to it; every link joins two records; counts and
sizes at every level equal a recount of what is below; the global counters equal the records;
the UID, date and recycling indexes match the records; every instance and attachment has its blob
with the recorded size and (unless ``verify_hashes`` is off) the recorded SHA-256; and every blob
on disk is referenced, or pending for a live writer.

Repair never deletes data: orphan blobs and damaged blobs move to ``quarantine/``; entries whose
blob is missing or damaged leave the index (the quarantine keeps a JSON note of each); counts,
sizes, links and secondary indexes are rebuilt from the records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

from dicomfs.store.ids import Level, ResourceId
from dicomfs.store.index import COUNTER_NAMES, Index, Txn
from dicomfs.store.mutations import TxnChanges, remove_resource
from dicomfs.store.records import Instance, Patient, Record, Series, Study, replace_record
from dicomfs.store.store import Store

__all__ = ["CheckReport", "check_store"]


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
    on_disk = set(store.blobs.names())  # listed before the snapshot: see _check_blobs
    with store.index.read() as txn:
        records = {r.id: r for r in store.index.all_records(txn)}
        report.records = len(records)
        _check_tree(store.index, txn, records, report)
        referenced = _check_instance_blobs(store, records, report, verify_hashes)
        referenced |= _check_attachments(store, txn, records, report)
        pending = {blob for _, blob in store.index.pending(txn)}
    report.blobs = len(on_disk)
    orphans = sorted(b for b in on_disk - referenced - pending if store.blobs.exists(b))
    for blob in orphans:
        report.problems.append(f"orphan blob {blob}: no index entry refers to it")
    if repair and report.problems:
        _repair(store, orphans, report)
    report.seconds = time.monotonic() - started
    return report


def _check_tree(index: Index, txn: Txn, records: dict[ResourceId, Record], report: CheckReport) -> None:
    children: dict[str | None, list[Record]] = defaultdict(list)
    for record in records.values():
        children[record.parent].append(record)
        if record.parent is not None and record.parent not in records:
            report.problems.append(f"{record.level.label} {record.id}: its parent {record.parent} is missing")
    for parent in (None, *records):
        linked = set(index.child_ids(txn, parent))
        actual = {c.id for c in children.get(parent, [])}
        for missing in sorted(actual - linked):
            report.problems.append(f"{missing}: not linked under its parent {parent or 'root'}")
        for dangling in sorted(linked - actual):
            report.problems.append(f"link {parent or 'root'} -> {dangling} joins no record")
    for record in records.values():
        expected = _recount(record, children)
        recorded = {name: getattr(record, name) for name in expected}
        if recorded != expected:
            report.problems.append(f"{record.level.label} {record.id}: counts {recorded} but recount gives {expected}")
    totals = _totals(records)
    for name in COUNTER_NAMES:
        if name == "attachment_bytes":
            continue
        if index.counter(txn, name) != totals[name]:
            report.problems.append(f"counter {name} is {index.counter(txn, name)} but the records add up to {totals[name]}")
    _check_secondary(index, txn, records, report)


def _recount(record: Record, children: dict[str | None, list[Record]]) -> dict[str, int]:
    """The counts and sizes a record should hold, from the instances below it."""
    if isinstance(record, Instance):
        return {}
    below = children.get(record.id, [])
    instances = [r for r in _descendants(record, children) if isinstance(r, Instance)]
    counts = {"instances": len(instances), "size": sum(i.size for i in instances),
              "stored_size": sum(i.stored_size for i in instances)}
    if isinstance(record, Study):
        counts["series"] = len(below)
    if isinstance(record, Patient):
        counts["studies"] = len(below)
        counts["series"] = sum(len(children.get(s.id, [])) for s in below)
    return counts


def _descendants(record: Record, children: dict[str | None, list[Record]]) -> list[Record]:
    found: list[Record] = []
    stack = list(children.get(record.id, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child.id, []))
    return found


def _totals(records: dict[ResourceId, Record]) -> dict[str, int]:
    by_level: defaultdict[Level, int] = defaultdict(int)
    for record in records.values():
        by_level[record.level] += 1
    instances = [r for r in records.values() if isinstance(r, Instance)]
    return {"patients": by_level[Level.PATIENT], "studies": by_level[Level.STUDY], "series": by_level[Level.SERIES],
            "instances": by_level[Level.INSTANCE], "size": sum(i.size for i in instances),
            "stored_size": sum(i.stored_size for i in instances)}


def _check_secondary(index: Index, txn: Txn, records: dict[ResourceId, Record], report: CheckReport) -> None:
    dated = {study for _, study in index.studies_by_date(txn)}
    recycling = set(index.recycling_order(txn))
    for record in records.values():
        uid = _uid_of(record)
        if uid is not None and (record.level, record.id) not in index.find_uid(txn, uid):
            report.problems.append(f"{record.level.label} {record.id}: missing from the UID index")
        if isinstance(record, Study) and record.id not in dated:
            report.problems.append(f"study {record.id}: missing from the date index")
        if isinstance(record, Patient) and (record.id in recycling) == record.protected:
            report.problems.append(f"patient {record.id}: recycling order disagrees with its protection")
    for study in dated - {r.id for r in records.values() if isinstance(r, Study)}:
        report.problems.append(f"date index names a study that does not exist: {study}")
    for patient in recycling - set(records):
        report.problems.append(f"recycling order names a patient that does not exist: {patient}")


def _uid_of(record: Record) -> str | None:
    if isinstance(record, Study):
        return record.study_uid
    if isinstance(record, Series):
        return record.series_uid
    if isinstance(record, Instance):
        return record.sop_uid
    return None


def _check_instance_blobs(store: Store, records: dict[ResourceId, Record], report: CheckReport, verify: bool) -> set[str]:
    referenced: set[str] = set()
    for record in records.values():
        if not isinstance(record, Instance):
            continue
        referenced.add(record.blob)
        problem = _blob_problem(store, record.blob, record.codec, record.size, record.stored_size, record.sha256, verify)
        if problem:
            report.problems.append(f"instance {record.id}: {problem}")
            report.broken_instances.append(record.id)
    return referenced


def _check_attachments(store: Store, txn: Txn, records: dict[ResourceId, Record], report: CheckReport) -> set[str]:
    referenced: set[str] = set()
    total = 0
    for resource_id, key, entry in store.index.all_attachment_blobs(txn):
        referenced.add(entry.blob)
        total += entry.stored_size
        if resource_id not in records:
            report.problems.append(f"attachment {key} belongs to a resource that does not exist: {resource_id}")
        problem = _blob_problem(store, entry.blob, entry.codec, entry.size, entry.stored_size, entry.sha256, True)
        if problem:
            report.problems.append(f"attachment {key} of {resource_id}: {problem}")
    if store.index.counter(txn, "attachment_bytes") != total:
        report.problems.append(f"counter attachment_bytes is {store.index.counter(txn, 'attachment_bytes')} but attachments add up to {total}")
    return referenced


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
    """Recompute links, counts, sizes, counters and secondary indexes from the records."""
    records = {r.id: r for r in index.all_records(txn)}
    children: dict[str | None, list[Record]] = defaultdict(list)
    for record in records.values():
        if record.parent is None or record.parent in records:
            children[record.parent].append(record)
    for parent in (None, *records):
        for child in list(index.child_ids(txn, parent)):
            if child not in records:
                index.unlink(txn, parent, child)
        for record in children.get(parent, []):
            index.link(txn, parent, record.id)
    for record in records.values():
        expected = _recount(record, children)
        if any(getattr(record, k) != v for k, v in expected.items()):
            index.put(txn, replace_record(record, **expected))
            report.repairs.append(f"recounted {record.level.label} {record.id}")
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
    for date, study in list(index.studies_by_date(txn)):
        if study not in records:
            index.remove_date(txn, date, study)
    for name, value in _totals(records).items():
        index.set_counter(txn, name, value)
