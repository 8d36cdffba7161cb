"""Changes to the index inside one write transaction: add, replace and remove instances, recycle.

Every function here takes the open write transaction and keeps all invariants in it: parent links,
per-level counts and sizes, the global counters, the UID, date and recycling indexes. Blob files
are not touched; functions return the names of blobs that became garbage, and the caller deletes
them once the transaction is durable.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dicomfs.errors import StoreFullError
from dicomfs.store.ids import Level, ResourceId
from dicomfs.store.index import Index, Txn
from dicomfs.store.records import Instance, Patient, Record, Series, Study, replace_record
from dicomfs.store.settings import Limits

if TYPE_CHECKING:
    from dicomfs.store.dicomparse import DicomHeader

__all__ = ["Limits", "NewInstance", "TxnChanges", "add_instance", "apply_growth", "make_room", "remove_resource", "set_protected"]


@dataclass(frozen=True)
class NewInstance:
    """An instance whose blob is written and which the transaction is about to index."""

    header: DicomHeader
    ids: tuple[ResourceId, ResourceId, ResourceId, ResourceId]
    sha256: str
    size: int
    stored_size: int
    blob: str
    codec: str
    origin: str
    remote: str


@dataclass
class _Growth:
    """Instances and bytes an ancestor gained in this transaction, not yet in its record."""

    instances: int = 0
    size: int = 0
    stored_size: int = 0
    last_update: float = 0.0
    received: bool = False


@dataclass
class TxnChanges:
    """What one transaction changed: the change log entries, the blobs it made garbage, and the
    ancestors' growth still to apply (``apply_growth`` must run before the commit)."""

    log: list[tuple[str, int, str]] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    growth: dict[str, _Growth] = field(default_factory=dict)

    def note(self, op: str, record: Record) -> None:
        self.log.append((op, int(record.level), record.id))


def add_instance(index: Index, txn: Txn, new: NewInstance, changes: TxnChanges, replacing: Instance | None) -> Instance:
    """Index ``new`` (creating its patient, study and series when needed); return its record.

    With ``replacing`` (an instance with the same id and other bytes), that record is overwritten
    and its blob becomes garbage.
    """
    now = time.time()
    header = new.header
    patient_key, study_key, series_key, instance_key = new.ids
    record = Instance(
        id=instance_key, parent=series_key, sop_uid=header.text("SOPInstanceUID"),
        sop_class_uid=header.sop_class_uid, number=header.number("InstanceNumber"),
        frames=header.number("NumberOfFrames") or 1, transfer_syntax=header.transfer_syntax,
        size=new.size, stored_size=new.stored_size, sha256=new.sha256, blob=new.blob, codec=new.codec,
        header_length=header.header_length, received=now, origin=new.origin, remote=new.remote,
    )
    index.put(txn, record)
    if replacing is not None:
        index.link(txn, record.parent, record.id, listed=record)  # the link's copy is the new record too
        changes.garbage.append(replacing.blob)
        changes.note("~", record)
        _grow(index, txn, new.ids[:3], 0, record.size - replacing.size, record.stored_size - replacing.stored_size, now, changes)
        return record
    index.link(txn, series_key, instance_key, listed=record)
    index.add_uid(txn, record.sop_uid, Level.INSTANCE, instance_key)
    index.count_level(txn, Level.INSTANCE, 1)
    changes.note("+", record)
    _ensure_parents(index, txn, header, new.ids, now, changes)
    _grow(index, txn, new.ids[:3], 1, record.size, record.stored_size, now, changes)
    return record


def _ensure_parents(
    index: Index, txn: Txn, header: DicomHeader, ids: tuple[ResourceId, ...], now: float, changes: TxnChanges
) -> None:
    """Create whichever of the patient, study and series do not exist yet (tags as first seen)."""
    patient_key, study_key, series_key, _ = ids
    if index.get(txn, series_key) is not None:
        return
    series = Series(
        id=series_key, parent=study_key, series_uid=header.text("SeriesInstanceUID"),
        modality=header.text("Modality"), number=header.number("SeriesNumber"),
        description=header.text("SeriesDescription"), expected_instances=header.number("ImagesInAcquisition"),
        instances=0, size=0, stored_size=0, created=now, last_update=now,
    )
    index.put(txn, series)
    index.link(txn, study_key, series_key)
    index.add_uid(txn, series.series_uid, Level.SERIES, series_key)
    index.count_level(txn, Level.SERIES, 1)
    changes.note("+", series)
    study = index.get(txn, study_key)
    if study is None:
        study = Study(
            id=study_key, parent=patient_key, study_uid=header.text("StudyInstanceUID"),
            date=header.text("StudyDate"), time=header.text("StudyTime"),
            description=header.text("StudyDescription"), accession_number=header.text("AccessionNumber"),
            study_id=header.text("StudyID"), series=0, instances=0, size=0, stored_size=0,
            created=now, last_update=now,
        )
        index.link(txn, patient_key, study_key)
        index.add_uid(txn, study.study_uid, Level.STUDY, study_key)
        index.add_date(txn, study.date, study_key)
        index.count_level(txn, Level.STUDY, 1)
        changes.note("+", study)
        patient = index.get(txn, patient_key)
        if patient is None:
            seq = index.add_to_counter(txn, "seq", 1)
            patient = Patient(
                id=patient_key, patient_id=header.text("PatientID"), patient_name=header.text("PatientName"),
                birth_date=header.text("PatientBirthDate"), sex=header.text("PatientSex"), protected=False,
                recycle_seq=seq, studies=0, series=0, instances=0, size=0, stored_size=0,
                created=now, last_update=now,
            )
            index.link(txn, None, patient_key)
            index.add_recycling(txn, seq, patient_key)
            index.count_level(txn, Level.PATIENT, 1)
            changes.note("+", patient)
        assert isinstance(patient, Patient)
        index.put(txn, dataclasses.replace(patient, studies=patient.studies + 1))
    assert isinstance(study, Study)
    index.put(txn, dataclasses.replace(study, series=study.series + 1))
    patient = index.get(txn, patient_key)
    assert isinstance(patient, Patient)
    index.put(txn, dataclasses.replace(patient, series=patient.series + 1))


def _grow(
    index: Index, txn: Txn, ancestors: tuple[ResourceId, ...], instances: int, size: int, stored: int,
    now: float, changes: TxnChanges,
) -> None:
    """Note that the patient, study and series gained instances and bytes (see ``apply_growth``)."""
    for key in ancestors:
        growth = changes.growth.pop(key, None) or _Growth()
        growth.instances += instances
        growth.size += size
        growth.stored_size += stored
        growth.last_update = now
        growth.received |= instances > 0
        changes.growth[key] = growth  # re-inserted: the dict keeps the order of the last touch
    index.add_to_counter(txn, "size", size)
    index.add_to_counter(txn, "stored_size", stored)


def apply_growth(index: Index, txn: Txn, changes: TxnChanges) -> None:
    """Write the growth noted since the last call into the ancestors' records, once each.

    A batch of instances of one series would otherwise rewrite the same three records per
    instance. Patients that received an instance become the most recent in the recycling order,
    in the order they last received one.
    """
    for key, growth in changes.growth.items():
        record = index.get(txn, key)
        assert record is not None and not isinstance(record, Instance)
        updates: dict[str, object] = dict(
            instances=record.instances + growth.instances, size=record.size + growth.size,
            stored_size=record.stored_size + growth.stored_size, last_update=growth.last_update,
        )
        if isinstance(record, Patient) and growth.received:
            seq = index.add_to_counter(txn, "seq", 1)
            if not record.protected:
                index.remove_recycling(txn, record.recycle_seq, record.id)
                index.add_recycling(txn, seq, record.id)
            updates["recycle_seq"] = seq
        index.put(txn, replace_record(record, **updates))
        changes.note("~", record)
    changes.growth.clear()


def remove_resource(index: Index, txn: Txn, resource_id: str, changes: TxnChanges) -> int:
    """Remove a resource and everything below it; emptied parents go too. Returns instances removed."""
    record = index.get(txn, resource_id)
    if record is None:
        return 0
    if isinstance(record, Instance):
        _remove_instance(index, txn, record, changes)
        return 1
    removed = 0
    for child in list(index.child_ids(txn, record.id)):
        removed += remove_resource(index, txn, child, changes)
    return removed


def _remove_instance(index: Index, txn: Txn, record: Instance, changes: TxnChanges) -> None:
    index.delete_record(txn, record)
    index.unlink(txn, record.parent, record.id)
    index.remove_uid(txn, record.sop_uid, Level.INSTANCE, record.id)
    index.count_level(txn, Level.INSTANCE, -1)
    index.add_to_counter(txn, "size", -record.size)
    index.add_to_counter(txn, "stored_size", -record.stored_size)
    changes.garbage.append(record.blob)
    _drop_extras(index, txn, record.id, changes)
    changes.note("-", record)
    # Walk up: every ancestor loses the instance's count and bytes; one left with no instance
    # goes too, and its own parent then has one child fewer.
    now = time.time()
    series_gone = study_gone = False
    parent_key: str | None = record.parent
    while parent_key is not None:
        parent = index.get(txn, parent_key)
        assert parent is not None and not isinstance(parent, Instance)
        updates: dict[str, object] = dict(
            instances=parent.instances - 1, size=parent.size - record.size,
            stored_size=parent.stored_size - record.stored_size, last_update=now,
        )
        if isinstance(parent, (Study, Patient)) and series_gone:
            updates["series"] = parent.series - 1
        if isinstance(parent, Patient) and study_gone:
            updates["studies"] = parent.studies - 1
        updated = replace_record(parent, **updates)
        if updated.instances == 0:
            _remove_empty(index, txn, updated, changes)
            series_gone = series_gone or isinstance(updated, Series)
            study_gone = study_gone or isinstance(updated, Study)
        else:
            index.put(txn, updated)
            changes.note("~", updated)
        parent_key = updated.parent


def _remove_empty(index: Index, txn: Txn, record: Record, changes: TxnChanges) -> None:
    """Remove a patient, study or series that has no instance left."""
    index.delete_record(txn, record)
    index.unlink(txn, record.parent, record.id)
    index.count_level(txn, record.level, -1)
    if isinstance(record, Study):
        index.remove_uid(txn, record.study_uid, Level.STUDY, record.id)
        index.remove_date(txn, record.date, record.id)
    elif isinstance(record, Series):
        index.remove_uid(txn, record.series_uid, Level.SERIES, record.id)
    elif isinstance(record, Patient) and not record.protected:
        index.remove_recycling(txn, record.recycle_seq, record.id)
    _drop_extras(index, txn, record.id, changes)
    changes.note("-", record)


def _drop_extras(index: Index, txn: Txn, resource_id: str, changes: TxnChanges) -> None:
    """User metadata and attachments go with their resource; attachment blobs become garbage."""
    for key in list(index.metadata(txn, resource_id)):
        index.delete_metadata(txn, resource_id, key)
    for key, entry in list(index.attachments(txn, resource_id).items()):
        index.delete_attachment(txn, resource_id, key)
        index.add_to_counter(txn, "attachment_bytes", -entry.stored_size)
        changes.garbage.append(entry.blob)


def make_room(index: Index, txn: Txn, limits: Limits, incoming: int, patient_key: str, changes: TxnChanges) -> None:
    """Recycle the oldest unprotected patients until an instance of ``incoming`` bytes fits.

    The patient receiving the instance is never recycled for it. Nothing is removed unless
    enough can be removed: otherwise StoreFullError, and the store is as it was.
    """
    if not limits.max_size and not limits.max_patients:
        return
    apply_growth(index, txn, changes)  # victims' sizes must be exact
    new_patient = index.get(txn, patient_key) is None
    excess_bytes = index.counter(txn, "size") + incoming - limits.max_size if limits.max_size else 0
    excess_patients = index.counter(txn, "patients") + int(new_patient) - limits.max_patients if limits.max_patients else 0
    if excess_bytes <= 0 and excess_patients <= 0:
        return
    if limits.max_size and incoming > limits.max_size:
        raise StoreFullError(f"storage full: the instance ({incoming} bytes) is larger than storage.max_size")
    victims: list[str] = []
    for candidate in index.recycling_order(txn):
        if excess_bytes <= 0 and excess_patients <= 0:
            break
        if candidate == patient_key:
            continue
        patient = index.get(txn, candidate)
        assert isinstance(patient, Patient)
        victims.append(candidate)
        excess_bytes -= patient.size
        excess_patients -= 1
    if excess_bytes > 0 or excess_patients > 0:
        raise StoreFullError(
            "storage full: storage.max_size or storage.max_patients is reached and only protected "
            "patients (or the patient being stored) are left to recycle"
        )
    for victim in victims:
        remove_resource(index, txn, victim, changes)


def set_protected(index: Index, txn: Txn, patient: Patient, protected: bool, changes: TxnChanges) -> Patient:
    """Protect a patient from recycling, or give it back its place in the recycling order."""
    if patient.protected == protected:
        return patient
    if protected:
        index.remove_recycling(txn, patient.recycle_seq, patient.id)
    else:
        index.add_recycling(txn, patient.recycle_seq, patient.id)
    updated = dataclasses.replace(patient, protected=protected)
    index.put(txn, updated)
    changes.note("~", updated)
    return updated
