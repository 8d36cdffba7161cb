"""What an offered file becomes: a verdict, or a candidate for the index.

Both ingest paths (the committer thread and the bulk worker processes) open a file, ``examine``
it, and then either report a verdict at once or carry a ``Candidate`` on to the index. Keeping
that decision here means the two paths cannot drift apart.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

from dicomfs.errors import NotDicomError, RejectedFileError
from dicomfs.store.blobs import is_disk_full
from dicomfs.store.dicomparse import DicomHeader, parse_header
from dicomfs.store.ids import ResourceId, resource_ids
from dicomfs.store.inflate import Expansion
from dicomfs.store.sources import Source, is_archive

__all__ = ["ALREADY_STORED", "Archive", "Candidate", "DICOMDIR_REASON", "IngestResult", "REJECTED", "REPLACED",
           "SKIPPED", "STORED", "examine", "settle_if_stored", "store_write_failure", "unreadable"]

STORED, ALREADY_STORED, REPLACED, REJECTED, SKIPPED = "stored", "already_stored", "replaced", "rejected", "skipped"
DICOMDIR_REASON = "DICOMDIR: read as an index of the files beside it, not stored"


@dataclass(frozen=True)
class IngestResult:
    """What became of one offered file. ``status`` is one of the five constants above."""

    path: str
    status: str
    reason: str = ""
    ids: tuple[str, str, str, str] | None = None
    size: int = 0
    retry: bool = False
    """Rejected by the store, not for the file: its disk full, a write error, its limits reached
    with only protected patients left. Offering the file again later may work."""

    def as_json(self) -> dict[str, object]:
        """The stable ``--json`` form: path, status, reason, size, and the four ids (or nulls)."""
        patient, study, series, instance = self.ids or (None, None, None, None)
        return {"path": self.path, "status": self.status, "reason": self.reason, "size": self.size,
                "patient": patient, "study": study, "series": series, "instance": instance}


@dataclass
class Candidate:
    """A parsed file on its way into the index: who it is, and where its blob is (once written)."""

    label: str
    header: DicomHeader
    ids: tuple[ResourceId, ResourceId, ResourceId, ResourceId]
    sha256: str
    size: int
    origin: str
    remote: str
    blob: str = ""
    stored_size: int = 0
    outcome: str = ""
    reason: str = ""
    retry: bool = False
    """See ``IngestResult.retry``."""

    @classmethod
    def of(cls, label: str, header: DicomHeader, data: bytes | mmap.mmap, origin: str, remote: str) -> "Candidate":
        """Identify a parsed file: its four resource ids and the SHA-256 of its bytes."""
        h = header
        ids = resource_ids(h.text("PatientID"), h.text("StudyInstanceUID"), h.text("SeriesInstanceUID"),
                           h.text("SOPInstanceUID"))
        return cls(label, header, ids, hashlib.sha256(data).hexdigest(), len(data), origin, remote)

    def result(self) -> IngestResult:
        return IngestResult(self.label, self.outcome, self.reason, self.ids, self.size, self.retry)


def store_write_failure(error: OSError, folder: Path) -> str:
    """The reason a person reads when a blob could not be written into the store."""
    if is_disk_full(error):
        return f"storage full: no space left on the store's disk ({folder})"
    return f"could not write to the store ({folder}): {error.strerror or error}"


def settle_if_stored(candidate: Candidate, stored_sha: str | None, overwrite: bool) -> bool:
    """Whether a stored copy (of SHA-256 ``stored_sha``) settles the candidate: same bytes, or other
    bytes that the configuration says to keep. Sets the candidate's outcome when it does."""
    if stored_sha is None or (stored_sha != candidate.sha256 and overwrite):
        return False
    candidate.outcome = ALREADY_STORED
    if stored_sha != candidate.sha256:
        candidate.reason = ("kept the stored copy: same SOPInstanceUID with other bytes "
                            "(storage.overwrite_instances = false)")
    return True


@dataclass(frozen=True)
class Archive:
    """A zip archive offered as one file: its members are to be offered instead."""

    source: Source


def examine(source: Source, data: bytes | mmap.mmap, origin: str, remote: str,
            expansion: Expansion = Expansion()) -> Candidate | IngestResult | Archive:
    """What the opened file ``source`` (content ``data``) is, for ingest.

    A candidate for the index, a verdict given at once (rejected with its reason, or a DICOMDIR
    skipped), or a zip archive recognised by its content. ``expansion``: how far a deflated
    dataset may expand (see ``inflate``).
    """
    try:
        header = parse_header(data, expansion=expansion)
    except NotDicomError as error:
        return Archive(source) if is_archive(data, source) else IngestResult(source.label, REJECTED, str(error))
    except RejectedFileError as error:
        return IngestResult(source.label, REJECTED, str(error))
    except Exception as error:  # a parser slip on hostile bytes rejects this file, never its group
        return IngestResult(source.label, REJECTED, f"not DICOM: could not be read ({type(error).__name__}: {str(error)[:80]})")
    if header.is_dicomdir:
        return IngestResult(source.label, SKIPPED, DICOMDIR_REASON)
    return Candidate.of(source.label, header, data, origin, remote)


def unreadable(source: Source, error: OSError | RejectedFileError) -> IngestResult:
    """The verdict on a source that could not be read, or opened as ingest allows (a zip member
    that expands too far, or is damaged)."""
    if isinstance(error, RejectedFileError):
        return IngestResult(source.label, REJECTED, str(error))
    return IngestResult(source.label, REJECTED, f"unreadable: {error.strerror or error}")
