"""Resource levels and ids: stable names derived from the DICOM identifiers.

An id is the SHA-1 of the identifiers that locate a resource, joined by ``|`` and printed as five
groups of eight hex digits. This is Orthanc's scheme, so the same data gets the same id in two
dicomfs stores, and in Orthanc too::

    patient  = SHA1(PatientID)
    study    = SHA1(PatientID | StudyInstanceUID)
    series   = SHA1(PatientID | StudyInstanceUID | SeriesInstanceUID)
    instance = SHA1(PatientID | StudyInstanceUID | SeriesInstanceUID | SOPInstanceUID)

The index keys use the 20 raw bytes; people and JSON see the dashed text form.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from typing import NewType

__all__ = ["ROOT_KEY", "Level", "ResourceId", "id_from_key", "key_from_id", "looks_like_id", "patient_resource_id",
           "resource_ids"]

ResourceId = NewType("ResourceId", str)
"""A resource id in text form: ``8hex-8hex-8hex-8hex-8hex``."""

ROOT_KEY = bytes(20)
"""The key of the virtual parent of every patient."""

_ID_PATTERN = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")


class Level(enum.IntEnum):
    """The four levels of the DICOM model, in parent-to-child order."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    INSTANCE = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Level":
        """A level from its name, singular or plural (``patients``, ``study``, ...)."""
        level = _LEVEL_NAMES.get(text.strip().lower())
        if level is None:
            raise ValueError(f"unknown level {text!r}: use patients, studies, series or instances")
        return level


_LEVEL_NAMES = {
    **{name: level for level in Level for name in (level.label, level.label + "s")},
    "studies": Level.STUDY,
    "series": Level.SERIES,
}


def _hash(*parts: str) -> ResourceId:
    digest = hashlib.sha1("|".join(parts).encode("utf-8")).hexdigest()
    return ResourceId("-".join(digest[i : i + 8] for i in range(0, 40, 8)))


def resource_ids(
    patient_id: str, study_uid: str, series_uid: str, sop_uid: str
) -> tuple[ResourceId, ResourceId, ResourceId, ResourceId]:
    """The ids of an instance and its ancestors: (patient, study, series, instance)."""
    return (*_ancestor_ids(patient_id, study_uid, series_uid), _hash(patient_id, study_uid, series_uid, sop_uid))


def patient_resource_id(patient_id: str) -> ResourceId:
    """The id of the patient with this PatientID."""
    return _hash(patient_id)


@functools.lru_cache(maxsize=1024)  # every instance of a series shares them
def _ancestor_ids(patient_id: str, study_uid: str, series_uid: str) -> tuple[ResourceId, ResourceId, ResourceId]:
    return _hash(patient_id), _hash(patient_id, study_uid), _hash(patient_id, study_uid, series_uid)


@functools.lru_cache(maxsize=4096)  # ancestors' ids recur for every instance of a batch
def key_from_id(resource_id: str) -> bytes:
    """The 20-byte index key of a text id."""
    return bytes.fromhex(resource_id.replace("-", ""))


def id_from_key(key: bytes) -> ResourceId:
    """The text id of a 20-byte index key."""
    return ResourceId(bytes(key).hex("-", 4))  # 20 bytes: five groups of 8 hex digits


def looks_like_id(text: str) -> bool:
    """Whether ``text`` has the shape of a resource id."""
    return bool(_ID_PATTERN.fullmatch(text))  # match() with $ would take a trailing newline too
