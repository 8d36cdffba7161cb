"""The main DICOM tags of a resource and its parents, by keyword: what extended attributes and
WebDAV properties show about a file or folder."""

from __future__ import annotations

from typing import Sequence

from dicomfs.store import Instance, Patient, Record, Series, Study

__all__ = ["main_tags"]


def main_tags(chain: Sequence[Record]) -> dict[str, str]:
    """Keyword -> value for every level in ``chain`` (patient first); empty values left out."""
    tags: dict[str, str] = {}
    for record in chain:
        if isinstance(record, Patient):
            tags.update(PatientID=record.patient_id, PatientName=record.patient_name,
                        PatientBirthDate=record.birth_date, PatientSex=record.sex)
        elif isinstance(record, Study):
            tags.update(StudyInstanceUID=record.study_uid, StudyDate=record.date, StudyTime=record.time,
                        StudyDescription=record.description, AccessionNumber=record.accession_number,
                        StudyID=record.study_id)
        elif isinstance(record, Series):
            tags.update(SeriesInstanceUID=record.series_uid, Modality=record.modality,
                        SeriesNumber="" if record.number is None else str(record.number),
                        SeriesDescription=record.description)
        elif isinstance(record, Instance):
            tags.update(SOPInstanceUID=record.sop_uid, SOPClassUID=record.sop_class_uid,
                        InstanceNumber="" if record.number is None else str(record.number),
                        NumberOfFrames=str(record.frames), TransferSyntaxUID=record.transfer_syntax)
    return {keyword: value for keyword, value in tags.items() if value}
