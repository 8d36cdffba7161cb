"""The main DICOM tags of a resource and its parents, by keyword: what extended attributes and
WebDAV properties show about a file or folder.

Both front ends show the same named attributes: the mount as extended attributes ``user.<name>``,
the bridge as WebDAV properties ``{urn:dicomfs}<name>``.
"""

from __future__ import annotations

from typing import Sequence

from dicomfs.store import Instance, Patient, Record, Series, Store, Study

__all__ = ["ATTACHED", "ID", "META_PREFIX", "PROTECTED", "TAG_PREFIX", "main_tags", "protection", "resource_attributes"]

TAG_PREFIX, META_PREFIX = "dicom.", "dicomfs.meta."
"""``dicom.PatientID`` (read-only, from the index) and ``dicomfs.meta.<name>`` (user metadata)."""
PROTECTED, ID = "dicomfs.protected", "dicomfs.id"
ATTACHED = "dicomfs.attachments"
"""The names of a resource's attachments, comma-separated; present only when it has one. An
instance is a file and cannot hold an ``attachments/`` folder: this is where its attachments show."""


def protection(text: str) -> bool | None:
    """The value written to ``dicomfs.protected`` as a flag: 1/true/yes or 0/false/no; None otherwise."""
    return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.strip().lower())


def resource_attributes(store: Store, resource_id: str) -> dict[str, str]:
    """Every named attribute of a stored resource: its tags and its parents', its id, its user
    metadata, its attachments' names if any and, for a patient, whether it is protected from recycling."""
    record = store.get(resource_id)
    values = {TAG_PREFIX + k: v for k, v in main_tags([*store.ancestors(record), record]).items()}
    values[ID] = resource_id
    values.update({META_PREFIX + k: v for k, v in store.metadata(resource_id).items()})
    attachments = store.attachments(resource_id)
    if attachments:
        values[ATTACHED] = ", ".join(a.name for a in attachments)
    if isinstance(record, Patient):
        values[PROTECTED] = "1" if record.protected else "0"
    return values


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
