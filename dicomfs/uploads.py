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
import secrets
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

from dicomfs.errors import PermissionDeniedError
from dicomfs.store import IngestResult, Store
from dicomfs.store.blobs import is_disk_full
from dicomfs.store.candidates import ALREADY_STORED, REJECTED, REPLACED, SKIPPED, STORED
from dicomfs.store.libc import link_open_file
from dicomfs.store.sources import Source, is_os_junk

__all__ = ["EMPTY", "EMPTY_REASON", "ERROR_XATTR", "INTERRUPTED_REASON", "NO_SPACE_REASON", "Stamp", "UploadArea",
           "UploadOutcome", "has_nameless_files", "new_version", "rename_over", "said_counts", "stamp_of"]

ERROR_XATTR = "user.dicomfs.error"
NO_SPACE_REASON = "not stored: no space left on device: the upload did not fit on the disk of uploads/"
INTERRUPTED_REASON = "the upload was interrupted: only part of the file arrived"
EMPTY_REASON = "empty file (0 bytes): nothing to store"
EMPTY = "empty"
"""What the log lines count empty files as, beside the ingest's statuses (they never reach the ingest)."""
Stamp = tuple[int, int, int]
"""A file's inode, size and modification time (ns)."""
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
        self._reasons: dict[str, str] = {}  # where the filesystem has no user xattrs (rare), or no room for one
        # A complete upload is the store's to keep (linked into blobs/, not copied) only where
        # the front ends can always write its next version into a new file (new_version).
        self._hand_over = has_nameless_files(root)

    def path(self, parts: Sequence[str]) -> Path:
        """The real path of ``uploads/<parts...>``; PermissionDeniedError for a name that could escape."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\0" in part:
                raise PermissionDeniedError(f"{part!r} is not an acceptable name in uploads/")
        return self.root.joinpath(*parts)

    def ingest(self, store: Store, parts: Sequence[str], *, origin: str, remote: str = "") -> UploadOutcome:
        """Ingest the complete file at ``uploads/<parts>``: remove it when stored, else keep it with its reason."""
        return self.ingest_many(store, [parts], origin=origin, remote=remote)[0]

    def stamp(self, parts: Sequence[str]) -> Stamp | None:
        """What ``uploads/<parts>`` is now (None when it is not there), for ``ingest_many`` to tell
        whether it was written again since it was found complete."""
        try:
            return stamp_of(self.path(parts).stat())
        except (OSError, PermissionDeniedError):
            return None

    def ingest_many(self, store: Store, batch: Sequence[Sequence[str]], *, origin: str, remote: str = "",
                    stamps: Sequence[Stamp | None] | None = None) -> list[UploadOutcome]:
        """``ingest`` for several complete files at once: one group commit for all of them.

        A file whose ``stamps`` entry no longer matches was written again after it was found
        complete (a client writing it anew, perhaps under a lock): it is left alone, with no
        reason, for its writer to hand in again once it is complete."""
        outcomes: dict[int, UploadOutcome] = {}
        to_ingest: list[tuple[int, Path, int]] = []  # (position in batch, path, inode read)
        for position, parts in enumerate(batch):
            path = self.path(parts)
            if is_os_junk(parts[-1]):
                _remove_quietly(path)
                outcomes[position] = UploadOutcome([], removed=True)
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                outcomes[position] = UploadOutcome([], removed=True)
                continue
            expected = stamps[position] if stamps is not None else None
            if expected is not None and expected != stamp_of(info):
                outcomes[position] = UploadOutcome([], removed=False)
                continue
            if info.st_size == 0:
                # A line of its own like a rejected file's: a copy that made it empty needs a look.
                _log.info("uploads/%s: %s", "/".join(parts), EMPTY_REASON)
                outcomes[position] = self._keep(path, [], EMPTY_REASON)
                continue
            to_ingest.append((position, path, info.st_ino))
        results = list(store.ingest_sources([Source(str(path), str(path), handed_over=self._hand_over)
                                             for _, path, _ in to_ingest],
                                            origin=origin, remote=remote, in_process=True))
        for (position, path, inode), own in zip(to_ingest, _split_by_source([str(p) for _, p, _ in to_ingest], results),
                                                strict=True):
            label = "uploads/" + "/".join(batch[position])
            for result in own:
                # A line each for what needs a look (not stored, or stored with a remark); the
                # rest is counted in the copy's total (UploadQueue), or a CD of 2,000 files floods the log.
                _log.log(logging.INFO if result.status == REJECTED or result.reason else logging.DEBUG,
                         "%s%s: %s", label, result.path[len(str(path)):], _said(result))
            rejected = [r for r in own if r.status == REJECTED]
            if not rejected:
                _remove_if_same(path, inode)
                outcomes[position] = UploadOutcome(own, removed=True)
            elif len(own) == 1:
                outcomes[position] = self._keep(path, own, rejected[0].reason)
            else:
                outcomes[position] = self._keep(path, own, f"{len(rejected)} of {len(own)} files not stored: " + "; ".join(
                    f"{r.path.rsplit(':', 1)[-1]}: {r.reason}" for r in rejected[:5]))
        if to_ingest:
            # DEBUG: the upload queue logs one total for a whole copy, made of many groups.
            _log.debug("%s", _group_summary([batch[position] for position, _, _ in to_ingest], results))
        return [outcomes[position] for position in range(len(batch))]

    def _keep(self, path: Path, results: list[IngestResult], reason: str) -> UploadOutcome:
        try:
            self.set_reason(path, reason)
        except FileNotFoundError:
            return UploadOutcome(results, removed=True)
        return UploadOutcome(results, removed=False, reason=reason)

    def set_reason(self, path: Path, reason: str) -> None:
        try:
            os.setxattr(path, ERROR_XATTR, reason.encode("utf-8"))
        except OSError as error:
            # A full disk may have no block for the attribute either: the reason is kept here then.
            if error.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP) and not is_disk_full(error):
                raise
            self._reasons[str(path)] = reason

    def write_failed(self, path: Path, error: BaseException | None) -> None:
        """Keep the upload at ``path``, part-written because writing it failed with ``error``
        (None: the client went away), with the reason: "no space left on device" when the disk
        was full, whatever the part that arrived would look like to the ingest (empty, truncated)."""
        full = isinstance(error, OSError) and is_disk_full(error)
        self.set_reason(path, NO_SPACE_REASON if full else INTERRUPTED_REASON)

    def clear_reason(self, path: Path) -> None:
        """Forget why a file was not stored (it is being written again)."""
        self._reasons.pop(str(path), None)
        try:
            os.removexattr(path, ERROR_XATTR)
        except OSError as error:
            if error.errno not in (errno.ENODATA, errno.ENOENT, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise

    def reason(self, path: Path) -> str | None:
        """Why the file at ``path`` was not stored, or None."""
        try:
            return os.getxattr(path, ERROR_XATTR).decode("utf-8", "replace")
        except OSError as error:
            if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                return self._reasons.get(str(path))
            return None

    def files_at(self, parts: Sequence[str]) -> list[tuple[str, ...]]:
        """The files now at ``uploads/<parts>``: itself when it is a file, else every file below it
        (what a rename or a MOVE brought there, for the upload queue)."""
        real = self.path(parts)
        if real.is_file():
            return [tuple(parts)]
        return [(*parts, *Path(folder).relative_to(real).parts, name) for folder, _, names in os.walk(real) for name in names]

    def leftovers(self, *, idle: float, busy: Collection[Path] = (), now: float | None = None) -> list[tuple[str, ...]]:
        """Files a front end took in but never ingested, because it was killed first: not empty,
        without a reason, not clutter, not ``busy``, and untouched for ``idle`` seconds (a file
        being written is touched). As ``parts`` below uploads/, for the upload queue."""
        now = time.time() if now is None else now
        found: list[tuple[str, ...]] = []
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder) / name
                if path in busy or is_os_junk(name):
                    continue
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                if info.st_size and now - info.st_mtime >= idle and self.reason(path) is None:
                    found.append(path.relative_to(self.root).parts)
        return found

    def sweep(self, *, rejected_ttl: int, empty_folder_idle: int, busy: Collection[Path] = (),
              now: float | None = None) -> list[Path]:
        """Remove rejected (or empty) files older than ``rejected_ttl`` s (0: never) and empty folders idle for
        ``empty_folder_idle`` s; ``busy`` paths (open in a front end) are left alone."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        for folder, _, files in os.walk(self.root, topdown=False):
            here = Path(folder)
            for name in files:
                path = here / name
                if path in busy or not rejected_ttl:
                    continue
                try:
                    info = path.stat()
                    # A file with a reason, or an empty one nobody wrote into (a client's LOCK
                    # makes one, and a client that went away never fills it).
                    kept = self.reason(path) is not None or info.st_size == 0
                    if kept and now - info.st_mtime >= rejected_ttl:
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


def new_version(target: Path, flags: int = os.O_WRONLY, *, keep: int | None = 0) -> int | None:
    """A file with no name yet (``O_TMPFILE``, beside ``target``; ``flags``: O_WRONLY or O_RDWR)
    for the next version of the upload ``target``, or None when the caller should write in place.
    ``keep``: how many of the current version's first bytes the new one starts with (None: all of
    them, for a change to part of the file; 0 for a rewrite).

    A file with content in uploads/ may be in the ingest's hands (its group is being read), or
    be a stored instance's blob already (the ingest links it into blobs/ rather than copy it).
    Written in place, it could be read torn and stored so, be removed as "the file that was
    stored" (same inode) although it holds the new version, or change what the store holds. So
    its next version goes into a new inode, which ``rename_over`` names once the front end is
    done; the earlier inode is never changed. None when there is nothing to protect (no file, or
    an empty one: the ingest keeps an empty file with its reason and never reads it) or the file
    system has no nameless files."""
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return None
    if not info.st_size:
        return None
    try:
        fd = os.open(target.parent, os.O_TMPFILE | (flags & (os.O_WRONLY | os.O_RDWR)) | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise
    try:
        if keep != 0:
            os.fchmod(fd, stat.S_IMODE(info.st_mode))
            _copy_start(target, fd, info.st_size if keep is None else min(keep, info.st_size))
    except BaseException:
        os.close(fd)
        raise
    return fd


def has_nameless_files(folder: Path) -> bool:
    """Whether ``folder``'s file system makes ``O_TMPFILE`` files, so that ``new_version`` always
    protects a file's earlier version (ext4, XFS, btrfs and tmpfs do)."""
    try:
        os.close(os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    except OSError:
        return False
    return True


def _copy_start(source: Path, fd: int, length: int) -> None:
    """Copy the first ``length`` bytes of ``source`` into ``fd`` (in the kernel)."""
    with open(source, "rb") as original:
        offset = 0
        while offset < length:
            sent = os.sendfile(fd, original.fileno(), offset, length - offset)
            if not sent:  # changed meanwhile: nobody should write it, but a short copy is no version
                raise OSError(errno.EIO, f"{source.name} shrank while its next version was being made")
            offset += sent


def rename_over(fd: int, target: Path) -> None:
    """Give the nameless file ``fd`` (from ``new_version``) the name ``target``, replacing what
    is there in one step."""
    staged = target.with_name(f".{target.name}.{secrets.token_hex(4)}.dicomfs-new")
    link_open_file(fd, str(staged))
    try:
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def stamp_of(info: os.stat_result) -> Stamp:
    """A file's stamp from its stat."""
    return info.st_ino, info.st_size, info.st_mtime_ns


def _group_summary(uploads: list[Sequence[str]], results: list[IngestResult]) -> str:
    """One line for a group: where its files were (the folder they share) and what became of them,
    e.g. "uploads/cd1/: 97 files: 95 stored, 1 already stored, 1 not stored"."""
    shared = os.path.commonpath(["/".join(parts[:-1]) for parts in uploads])
    files = f"{len(uploads)} file{'s' if len(uploads) != 1 else ''}"
    return f"uploads/{shared + '/' if shared else ''}: {files}: {said_counts(Counter(r.status for r in results))}"


def said_counts(counts: Counter[str]) -> str:
    """Counts of statuses (and ``EMPTY``) as a log line says them: "95 stored, 1 already stored, 1 not stored"."""
    return ", ".join(f"{counts[status]} {_SAID[status]}" for status in _SAID if counts[status])


def _said(result: IngestResult) -> str:
    """``rejected (not DICOM: ...)``, but ``rejected: ...`` where the reason says it already."""
    status = result.status.replace("_", " ")
    if not result.reason:
        return status
    return result.reason if result.reason.startswith(status) else f"{status} ({result.reason})"


_SAID = {STORED: "stored", REPLACED: "replaced", ALREADY_STORED: "already stored", SKIPPED: "skipped", REJECTED: "not stored",
         EMPTY: "empty"}


def _split_by_source(paths: list[str], results: list[IngestResult]) -> list[list[IngestResult]]:
    """Results (in source order: one per file, one per member of an archive) grouped by source."""
    groups: list[list[IngestResult]] = [[] for _ in paths]
    position = 0
    for result in results:
        while position < len(paths) and not (result.path == paths[position] or result.path.startswith(paths[position] + ":")):
            position += 1
        if position == len(paths):
            raise AssertionError(f"ingest returned a result for {result.path}, which was not offered")
        groups[position].append(result)
    return groups


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove the ingested file unless a client replaced it meanwhile (a new upload of the same name)."""
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
