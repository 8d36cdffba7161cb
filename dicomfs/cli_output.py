"""How the ``dicomfs`` command shows the store to a person.

One line per record for ``ls``, one row per field for ``show``, one line per resource for what
``rm`` deletes. Dates read as ISO 8601 (times in UTC, as the core metadata writes them), sizes
with a unit, booleans as yes/no, lists comma-separated. ``--json`` output is not made here: it
keeps the records' own values (epoch seconds, DICOM dates) because scripts read them.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Mapping

from dicomfs.store.records import Instance, Patient, Record, Series, Study

__all__ = ["dicom_date", "human_size", "record_line", "show_rows", "what_goes"]

_TIMESTAMPS = frozenset({"created", "last_update", "received"})
"""Record fields in seconds since the epoch."""
_DICOM_DATES = frozenset({"birth_date", "date"})
_SIZES = frozenset({"size", "stored_size"})
_SHOWN_CHILDREN = 3
"""Child ids ``show`` prints (the count is always there; ``ls --parent`` lists them all)."""


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


def _dicom_time(value: str) -> str:
    """A DICOM TM value (``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.ffffff``) as ISO 8601."""
    found = re.fullmatch(r"(\d\d)(\d\d)?(\d\d)?(\.\d{1,6})?", value)
    if found is None:
        return value or "-"
    hours, minutes, seconds, fraction = found.groups()
    return ":".join(part for part in (hours, minutes or "00", seconds) if part) + (fraction or "")


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _patient_words(patient: Patient) -> str:
    return f"{patient.patient_id} - {patient.patient_name}"


def record_line(record: Record, patient: Patient | None = None) -> str:
    """One ``ls`` line: the id, then what a person recognises (a study's ``patient`` first)."""
    if isinstance(record, Patient):
        text = f"{_patient_words(record)}  ({record.studies} studies, {record.instances} instances"
        text += ", protected)" if record.protected else ")"
    elif isinstance(record, Study):
        owner = f"{_patient_words(patient)}  " if patient is not None else ""
        text = (f"{owner}{dicom_date(record.date)} - {record.description}  "
                f"({record.series} series, {record.instances} instances)")
    elif isinstance(record, Series):
        text = f"{record.modality} - {record.description}  (#{record.number}, {record.instances} instances)"
    else:
        assert isinstance(record, Instance)
        text = f"{record.number if record.number is not None else '-'} - {record.sop_uid}  ({human_size(record.size)})"
    return f"{record.id}  {text}"


def _field_text(key: str, value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in _TIMESTAMPS and isinstance(value, (int, float)):
        return _timestamp(value)
    if key in _DICOM_DATES and isinstance(value, str):
        return dicom_date(value)
    if key == "time" and isinstance(value, str):
        return _dicom_time(value)
    if key in _SIZES and isinstance(value, int):
        return f"{value} bytes ({human_size(value)})"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value) or "none"
    return str(value)


def show_rows(shown: Mapping[str, object]) -> list[tuple[str, str]]:
    """``show``'s rows, (name, text), from the fields ``show --json`` prints: the level first,
    one row per metadata entry, the children counted with their first ids."""
    rows = [("level", str(shown["level"]))]
    for key, value in shown.items():
        if key == "level":
            continue
        if key == "metadata" and isinstance(value, Mapping):
            entries = [f"{name}: {text}" for name, text in value.items()] or ["none"]
            rows += [(key if i == 0 else "", entry) for i, entry in enumerate(entries)]
        elif key == "children" and isinstance(value, list):
            first = ", ".join(value[:_SHOWN_CHILDREN]) + (", ..." if len(value) > _SHOWN_CHILDREN else "")
            rows.append((key, f"{len(value)} ({first})" if value else "none"))
        else:
            rows.append((key, _field_text(key, value)))
    return rows


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
