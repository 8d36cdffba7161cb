"""The store: DICOM instances kept once on disk, indexed in LMDB.

Plain synchronous code with no front-end imports; the FUSE daemon and the WebDAV bridge call it
from worker threads. Start at ``store.Store``; ``index`` describes the tables, ``committer`` and
``bulk`` how ingest stays fast and crash-safe, ``check`` what consistency means.

The names below are imported when first asked for (PEP 562), not with the package: a command
that only reads, such as ``dicomfs export``, then never loads the parser and the committer:
``import dicomfs.cli`` went from ~100 to ~83 ms here (tests/test_startup_imports.py keeps it so).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomfs.store.candidates import IngestResult
    from dicomfs.store.ids import Level, ResourceId
    from dicomfs.store.records import Instance, Patient, Record, Series, Study
    from dicomfs.store.settings import Limits, WriteSettings
    from dicomfs.store.store import Attachment, Store, StoreStats

_HOMES = {
    "Attachment": "store", "IngestResult": "candidates", "Instance": "records", "Level": "ids", "Limits": "settings",
    "Patient": "records", "Record": "records", "ResourceId": "ids", "Series": "records", "Store": "store",
    "StoreStats": "store", "Study": "records", "WriteSettings": "settings",
}

__all__ = ["Attachment", "IngestResult", "Instance", "Level", "Limits", "Patient", "Record", "ResourceId", "Series",
           "Store", "StoreStats", "Study", "WriteSettings"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # asked once
    return value
