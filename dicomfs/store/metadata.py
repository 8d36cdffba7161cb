"""Core metadata (derived from the index, read-only) and user metadata and attachment names.

Core metadata follows Orthanc's names so scripts written for Orthanc read the same keys. Users
name their own metadata and attachments in the configuration, mapped to keys >= 1024 (keys below
are reserved for dicomfs, as in Orthanc).
"""

from __future__ import annotations

import datetime
from typing import Mapping

from dicomfs.errors import NotFoundError, PermissionDeniedError
from dicomfs.store.records import Instance, Record, Series

__all__ = ["CORE_METADATA", "core_metadata", "iso_time", "user_key"]

CORE_METADATA = ("ReceptionDate", "LastUpdate", "Origin", "RemoteAet", "RemoteUser", "TransferSyntax",
                 "SopClassUid", "IndexInSeries", "ExpectedNumberOfInstances")
USER_KEY_MIN = 1024


def iso_time(timestamp: float) -> str:
    """A UTC time as ISO 8601 with a ``Z``, to the second."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def core_metadata(record: Record) -> dict[str, str]:
    """The core metadata of a resource, computed from its index record."""
    if isinstance(record, Instance):
        values = {
            "ReceptionDate": iso_time(record.received),
            "Origin": record.origin,
            "TransferSyntax": record.transfer_syntax,
            "SopClassUid": record.sop_class_uid,
        }
        if record.remote:
            values["RemoteAet" if record.origin == "dimse" else "RemoteUser"] = record.remote
        if record.number is not None:
            values["IndexInSeries"] = str(record.number)
        return values
    values = {"LastUpdate": iso_time(record.last_update)}
    if isinstance(record, Series) and record.expected_instances:
        values["ExpectedNumberOfInstances"] = str(record.expected_instances)
    return values


def user_key(names: Mapping[str, int], name: str, *, what: str = "metadata") -> int:
    """The key of a user metadata or attachment ``name`` (a configured name or a number >= 1024)."""
    if name in CORE_METADATA:
        raise PermissionDeniedError(f"{name} is core metadata: dicomfs sets it, users cannot change it")
    if name in names:
        return names[name]
    if name.isdigit() and USER_KEY_MIN <= int(name) <= 65535:
        return int(name)
    known = ", ".join(sorted(names)) or "none configured"
    raise NotFoundError(f"unknown {what} name {name!r} (configured: {known}; or a number from 1024 to 65535)")
