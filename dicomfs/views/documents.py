"""``study.json`` and ``series.json``: what the index knows about a study or series, as a file.

Orthanc's by-uids folders carry the same two files (its REST "expanded" resource in CRLF JSON, with a
``Last-Modified: not-a-date-timeZ`` header). Ours are UTF-8 JSON (names stay readable), with the main
tags, the parent's tags, exact counts and sizes, core and user metadata, and the children's UIDs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import orjson

from dicomfs.store import Instance, Patient, Series, Study
from dicomfs.store.metadata import iso_time

__all__ = ["series_document", "study_document"]


def study_document(study: Study, patient: Patient | None, series: Sequence[Series], metadata: Mapping[str, str]) -> bytes:
    """The content of ``study.json``, from the records a listing has already read."""
    document = {
        "Type": "Study",
        "ID": study.id,
        "MainDicomTags": {
            "StudyInstanceUID": study.study_uid, "StudyDate": study.date, "StudyTime": study.time,
            "StudyDescription": study.description, "AccessionNumber": study.accession_number, "StudyID": study.study_id,
        },
        "PatientMainDicomTags": _patient_tags(patient) if patient is not None else {},
        "ParentPatient": study.parent,
        "CountSeries": study.series,
        "CountInstances": study.instances,
        "Size": study.size,
        "StoredSize": study.stored_size,
        "LastUpdate": iso_time(study.last_update),
        "Metadata": dict(metadata),
        "Series": [{"ID": s.id, "SeriesInstanceUID": s.series_uid, "Modality": s.modality, "Instances": s.instances}
                   for s in series],
    }
    return _encode(document)


def series_document(series: Series, instances: Sequence[Instance], metadata: Mapping[str, str]) -> bytes:
    """The content of ``series.json``, from the records a listing has already read."""
    document = {
        "Type": "Series",
        "ID": series.id,
        "MainDicomTags": {
            "SeriesInstanceUID": series.series_uid, "Modality": series.modality, "SeriesNumber": series.number,
            "SeriesDescription": series.description,
        },
        "ParentStudy": series.parent,
        "CountInstances": series.instances,
        "ExpectedNumberOfInstances": series.expected_instances,
        "Size": series.size,
        "StoredSize": series.stored_size,
        "LastUpdate": iso_time(series.last_update),
        "Metadata": dict(metadata),
        "Instances": [{"ID": i.id, "SOPInstanceUID": i.sop_uid, "InstanceNumber": i.number, "Size": i.size}
                      for i in sorted(instances, key=lambda i: (i.number is None, i.number or 0, i.sop_uid))],
    }
    return _encode(document)


def _patient_tags(patient: Patient) -> dict[str, str]:
    return {"PatientID": patient.patient_id, "PatientName": patient.patient_name,
            "PatientBirthDate": patient.birth_date, "PatientSex": patient.sex}


def _encode(document: dict[str, object]) -> bytes:
    # The bytes json.dumps(indent=2, ensure_ascii=False) gives, plus a newline; that pure-Python
    # encoder (the C one does no indent) was half the CPU of a cold walk of by-uids, where every
    # series listing renders its series.json to know its size.
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
