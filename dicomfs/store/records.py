"""The index records: one frozen dataclass per level, stored as compact msgpack rows.

A record holds the main DICOM tags the views and queries need, exact counts and sizes of
everything below it, and times. Rows are positional lists (field order = dataclass order, without
the id, which is the key), which keeps a million-instance index small and fast to decode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, TypeVar, Union

import msgpack

from dicomfs.store.ids import Level, ResourceId, id_from_key

__all__ = ["Instance", "Patient", "Record", "Series", "Study", "decode_record", "encode_record", "replace_record"]


@dataclass(frozen=True)
class Patient:
    """A patient: identified by PatientID; its name and demographics as first received."""

    level: ClassVar[Level] = Level.PATIENT
    id: ResourceId
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    protected: bool
    recycle_seq: int
    """Position in the recycling order: the smallest unprotected one is recycled first."""
    studies: int
    series: int
    instances: int
    size: int
    stored_size: int
    created: float
    last_update: float

    @property
    def parent(self) -> ResourceId | None:
        return None

    @property
    def children(self) -> int:
        return self.studies


@dataclass(frozen=True)
class Study:
    """A study of one patient (the same StudyInstanceUID under two PatientIDs is two studies)."""

    level: ClassVar[Level] = Level.STUDY
    id: ResourceId
    parent: ResourceId
    study_uid: str
    date: str
    time: str
    description: str
    accession_number: str
    study_id: str
    series: int
    instances: int
    size: int
    stored_size: int
    created: float
    last_update: float

    @property
    def children(self) -> int:
        return self.series


@dataclass(frozen=True)
class Series:
    """A series of one study."""

    level: ClassVar[Level] = Level.SERIES
    id: ResourceId
    parent: ResourceId
    series_uid: str
    modality: str
    number: int | None
    description: str
    expected_instances: int | None
    instances: int
    size: int
    stored_size: int
    created: float
    last_update: float

    @property
    def children(self) -> int:
        return self.instances


@dataclass(frozen=True)
class Instance:
    """One stored DICOM instance and where its bytes are."""

    level: ClassVar[Level] = Level.INSTANCE
    id: ResourceId
    parent: ResourceId
    sop_uid: str
    sop_class_uid: str
    number: int | None
    frames: int
    transfer_syntax: str
    size: int
    stored_size: int
    sha256: str
    blob: str
    codec: str
    header_length: int
    received: float
    origin: str
    remote: str

    @property
    def children(self) -> int:
        return 0

    @property
    def instances(self) -> int:
        return 1

    @property
    def last_update(self) -> float:
        return self.received

    @property
    def created(self) -> float:
        return self.received


Record = Union[Patient, Study, Series, Instance]
_CLASSES: dict[int, type[Record]] = {cls.level: cls for cls in (Patient, Study, Series, Instance)}
_R = TypeVar("_R", bound=Record)


def replace_record(record: _R, **changes: object) -> _R:
    """``dataclasses.replace`` for fields named at run time (counts and sizes shared by several levels)."""
    # mypy checks replace's keywords against the fields of each class; a dict of names it cannot.
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


_ROW_FIELDS: dict[int, tuple[str, ...]] = {
    cls.level: tuple(f.name for f in dataclasses.fields(cls) if f.name != "id") for cls in (Patient, Study, Series, Instance)
}
"""Field names of each level's row, in order (dataclasses.fields is slow on a hot path)."""


def encode_record(record: Record) -> bytes:
    """The stored row: level, then every field but the id."""
    names = _ROW_FIELDS[record.level]
    return msgpack.packb([int(record.level), *[getattr(record, name) for name in names]], use_bin_type=True)  # type: ignore[no-any-return]


def decode_record(key: bytes, row: bytes) -> Record:
    """The record stored under ``key``."""
    level, *values = msgpack.unpackb(row, raw=False, use_list=True)
    return _CLASSES[level](id_from_key(key), *values)
