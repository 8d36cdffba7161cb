"""The uploads staging area: a real folder in the store where clients copy files to be ingested.

Both front ends (the FUSE mount and the WebDAV bridge) keep what is being uploaded in
``<store>/uploads/``, so a half-written file survives a crash and a large one never sits in
memory. Once a file is complete (its last close in the mount, the end of its PUT or UNLOCK over
WebDAV) the front end calls ``ingest``: DICOM goes into the store and the file disappears; what
is not DICOM stays, its reason in the extended attribute ``user.dicomfs.error``, until ``sweep``
removes it after ``uploads.rejected_ttl``. Orthanc deletes such files silently; a person copying a
CD deserves to see what was not taken and why.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from dicomfs.errors import PermissionDeniedError
from dicomfs.store import IngestResult, Store
from dicomfs.store.candidates import REJECTED
from dicomfs.store.sources import is_os_junk

__all__ = ["ERROR_XATTR", "UploadArea", "UploadOutcome"]

ERROR_XATTR = "user.dicomfs.error"
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadOutcome:
    """What became of one uploaded file."""

    results: list[IngestResult]
    removed: bool
    """The file is gone from uploads/ (stored, already stored, or OS clutter)."""
    reason: str = ""
    """Why the file stays, when it does."""


class UploadArea:
    """The staging folder and the rules for what may be done in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._reasons: dict[str, str] = {}  # where the filesystem has no user xattrs (rare)

    def path(self, parts: Sequence[str]) -> Path:
        """The real path of ``uploads/<parts...>``; PermissionDeniedError for a name that could escape."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\0" in part:
                raise PermissionDeniedError(f"{part!r} is not an acceptable name in uploads/")
        return self.root.joinpath(*parts)

    def ingest(self, store: Store, parts: Sequence[str], *, origin: str, remote: str = "") -> UploadOutcome:
        """Ingest the complete file at ``uploads/<parts>``: remove it when stored, else keep it with its reason."""
        path = self.path(parts)
        label = "uploads/" + "/".join(parts)
        if is_os_junk(parts[-1]):
            _remove_quietly(path)
            return UploadOutcome([], removed=True)
        try:
            if path.stat().st_size == 0:
                reason = "empty file (0 bytes): nothing to store"
                self.set_reason(path, reason)
                return UploadOutcome([], removed=False, reason=reason)
        except FileNotFoundError:
            return UploadOutcome([], removed=True)
        results = store.ingest_file(path, label=label, origin=origin, remote=remote)
        rejected = [r for r in results if r.status == REJECTED]
        for result in results:
            _log.info("%s: %s%s", result.path, result.status, f" ({result.reason})" if result.reason else "")
        if not rejected:
            _remove_quietly(path)
            return UploadOutcome(results, removed=True)
        if len(results) == 1:
            reason = rejected[0].reason
        else:
            reason = f"{len(rejected)} of {len(results)} files not stored: " + "; ".join(
                f"{r.path.rsplit(':', 1)[-1]}: {r.reason}" for r in rejected[:5])
        self.set_reason(path, reason)
        return UploadOutcome(results, removed=False, reason=reason)

    def set_reason(self, path: Path, reason: str) -> None:
        try:
            os.setxattr(path, ERROR_XATTR, reason.encode("utf-8"))
        except OSError as error:
            if error.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._reasons[str(path)] = reason

    def reason(self, path: Path) -> str | None:
        """Why the file at ``path`` was not stored, or None."""
        try:
            return os.getxattr(path, ERROR_XATTR).decode("utf-8", "replace")
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return self._reasons.get(str(path))
            return None

    def sweep(self, *, rejected_ttl: int, empty_folder_idle: int, busy: Collection[Path] = (),
              now: float | None = None) -> list[Path]:
        """Remove rejected files older than ``rejected_ttl`` s (0: never) and empty folders idle for
        ``empty_folder_idle`` s; ``busy`` paths (open in a front end) are left alone."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        for folder, _, files in os.walk(self.root, topdown=False):
            here = Path(folder)
            for name in files:
                path = here / name
                if path in busy or not rejected_ttl or self.reason(path) is None:
                    continue
                try:
                    if now - path.stat().st_mtime >= rejected_ttl:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass
            if here == self.root or here in busy:
                continue
            try:
                if not any(here.iterdir()) and now - here.stat().st_mtime >= empty_folder_idle:
                    here.rmdir()
                    removed.append(here)
            except OSError:
                pass  # refilled or removed meanwhile
        return removed


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
