"""The store: DICOM instances kept once on disk, indexed in LMDB.

Plain synchronous code with no front-end imports; the FUSE daemon and the WebDAV bridge call it
from worker threads. Start at ``store.Store``; ``index`` describes the tables, ``committer`` and
``bulk`` how ingest stays fast and crash-safe, ``check`` what consistency means.
"""

from dicomfs.store.candidates import IngestResult
from dicomfs.store.committer import WriteSettings
from dicomfs.store.ids import Level, ResourceId
from dicomfs.store.mutations import Limits
from dicomfs.store.records import Instance, Patient, Record, Series, Study
from dicomfs.store.store import Attachment, Store, StoreStats

__all__ = [
    "Attachment",
    "IngestResult",
    "Instance",
    "Level",
    "Limits",
    "Patient",
    "Record",
    "ResourceId",
    "Series",
    "Store",
    "StoreStats",
    "Study",
    "WriteSettings",
]
