"""Errors dicomfs raises, each knowing how a front end reports it.

The core (store, views, jobs) raises only these; the FUSE adapter maps them to an errno and the
WebDAV bridge to an HTTP status through the two class attributes, so neither front end keeps a
table of its own and the core never imports ``pyfuse3`` or ``wsgidav``::

    DicomfsError                      EIO      500
    ├── ConfigError                   EINVAL   500   bad configuration file, key or value
    ├── StoreError                    EIO      500   the store on disk is unusable
    │   ├── StoreNotFoundError        ENOENT   500   no store at that folder (run `dicomfs init`)
    │   ├── StoreFullError            ENOSPC   507   limits reached and only protected data remains
    │   └── StoreCorruptError         EIO      500   an index entry or blob is missing or damaged
    ├── NotFoundError                 ENOENT   404   no such resource, metadata or attachment
    ├── AmbiguousError                EINVAL   400   a selector matches several resources
    ├── PermissionDeniedError         EACCES   403   the configuration forbids it
    ├── ReadOnlyError                 EROFS    403   the store or mount is read-only
    └── RejectedFileError             EINVAL   415   a file that cannot be stored as DICOM
        ├── NotDicomError                            empty, text, no "DICM" and no dataset
        ├── TruncatedError                           cut inside the header or the pixel data
        ├── MissingIdentifierError                   no PatientID-level UID set to file it under
        ├── ExpansionError            EFBIG    413   a zip member or deflated dataset too large once inflated
        └── MalformedError                           a UID that is none, a value or a nesting past the bounds
"""

from __future__ import annotations

import errno

__all__ = [
    "AmbiguousError",
    "ConfigError",
    "DicomfsError",
    "ExpansionError",
    "MalformedError",
    "MissingIdentifierError",
    "NotDicomError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReadOnlyError",
    "RejectedFileError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreNotFoundError",
    "TruncatedError",
]


class DicomfsError(Exception):
    """Base of every error dicomfs raises on purpose; its message is meant for a person."""

    errno: int = errno.EIO
    http_status: int = 500


class ConfigError(DicomfsError):
    """The configuration file, one of its keys or one of its values is wrong."""

    errno = errno.EINVAL


class StoreError(DicomfsError):
    """The store on disk cannot be used as asked."""


class StoreNotFoundError(StoreError):
    """No store exists at the given folder."""

    errno = errno.ENOENT


class StoreFullError(StoreError):
    """Storing would pass a configured limit and only protected patients are left to recycle."""

    errno = errno.ENOSPC
    http_status = 507  # Insufficient Storage (RFC 4918)


class StoreCorruptError(StoreError):
    """An index entry or a blob is missing or does not match what the index recorded."""


class NotFoundError(DicomfsError):
    """No resource, metadata entry or attachment of that name."""

    errno = errno.ENOENT
    http_status = 404


class AmbiguousError(DicomfsError):
    """A selector matches more than one resource where one was required."""

    errno = errno.EINVAL
    http_status = 400


class PermissionDeniedError(DicomfsError):
    """The configuration forbids the operation (for example deletion is switched off)."""

    errno = errno.EACCES
    http_status = 403


class ReadOnlyError(DicomfsError):
    """The store or the mount was opened read-only."""

    errno = errno.EROFS
    http_status = 403


class RejectedFileError(DicomfsError):
    """A file offered for ingest that cannot be stored; the message is the reason."""

    errno = errno.EINVAL
    http_status = 415  # Unsupported Media Type


class NotDicomError(RejectedFileError):
    """The file is not DICOM at all (empty, text, garbage after the preamble)."""


class TruncatedError(RejectedFileError):
    """The file ends inside the dataset or inside the pixel data."""


class MissingIdentifierError(RejectedFileError):
    """A UID needed to file the instance (study, series or SOP instance) is absent or empty."""


class ExpansionError(RejectedFileError):
    """A compressed file (a zip member, a deflated DICOM dataset) expands past
    ``ingest.max_expanded_size``, or is compressed in a way dicomfs will not expand."""

    errno = errno.EFBIG
    http_status = 413  # Content Too Large (RFC 9110)


class MalformedError(RejectedFileError):
    """The file breaks a rule the index relies on: a UID that is not one (PS3.5 9.1), a value too
    long to index, sequences nested deeper than any real file needs."""
