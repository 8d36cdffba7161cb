"""How the ``dicomfs`` command shows the store to a person.

One line per record for ``ls``. ``--json`` output is not made here: it keeps the records' own
values because scripts read them.
"""

from __future__ import annotations

from dicomfs.store.records import Instance, Patient, Record, Series, Study

__all__ = ["human_size", "record_line"]


def human_size(size: int) -> str:
    """``size`` bytes in the largest binary unit below 1024 of it: ``8.8 KiB``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


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
