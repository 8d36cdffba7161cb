"""How the ``dicomfs`` command shows the store to a person.

One line per record for ``ls``, one line per resource for what ``rm`` deletes. ``--json``
output is not made here: it keeps the records' own values because scripts read them.
"""

from __future__ import annotations

import re

from dicomfs.store.records import Instance, Patient, Record, Series, Study

__all__ = ["dicom_date", "human_size", "record_line", "what_goes"]


def human_size(size: int) -> str:
    """``size`` bytes in the largest binary unit below 1024 of it: ``8.8 KiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def dicom_date(value: str) -> str:
    """A DICOM DA value (``YYYYMMDD``) as ISO 8601; anything else (a range, a typo) as received."""
    if re.fullmatch(r"\d{8}", value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "-"


def _patient_words(patient: Patient) -> str:
    return f"{patient.patient_id} - {patient.patient_name}"


def record_line(record: Record) -> str:
    """One ``ls`` line: the id, then the fields a person recognises."""
    if isinstance(record, Patient):
        text = f"{_patient_words(record)}  ({record.studies} studies, {record.instances} instances"
        text += ", protected)" if record.protected else ")"
    elif isinstance(record, Study):
        text = f"{record.date or '-'} - {record.description}  ({record.series} series, {record.instances} instances)"
    elif isinstance(record, Series):
        text = f"{record.modality} - {record.description}  (#{record.number}, {record.instances} instances)"
    else:
        assert isinstance(record, Instance)
        text = f"{record.number if record.number is not None else '-'} - {record.sop_uid}  ({human_size(record.size)})"
    return f"{record.id}  {text}"


def what_goes(record: Record, patient: Patient | None) -> str:
    """What deleting ``record`` removes, for ``rm`` to say before it does: the resource, whose it
    is, and the counts of everything below it."""
    below = f"{record.instances} instances, {human_size(record.size)}"
    if isinstance(record, Patient):
        return f"patient {record.id} ({_patient_words(record)}): {record.studies} studies, {record.series} series, {below}"
    owner = f"{_patient_words(patient)}, " if patient is not None else ""
    if isinstance(record, Study):
        return (f"study {record.id} ({owner}{dicom_date(record.date)} {record.description}): "
                f"{record.series} series, {below}")
    if isinstance(record, Series):
        return f"series {record.id} ({owner}{record.modality} #{record.number} {record.description}): {below}"
    assert isinstance(record, Instance)
    return f"instance {record.id} ({owner}SOP {record.sop_uid}): {human_size(record.size)}"
