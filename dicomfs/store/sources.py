"""What ingest reads: files, folder trees, zip archives and DICOMDIRs, as a flat list of sources.

A source is one candidate file with the label a person will see in the results (its path, or
``archive.zip:member``). Operating-system clutter (``.DS_Store``, ``._*`` AppleDouble files,
``Thumbs.db``, ``desktop.ini``, ``__MACOSX/``) is skipped without a word, because it is never
medical data and reporting it would only hide real rejections.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dicomfs.store.inflate import Expansion, expanded, zip_member
__all__ = ["Source", "archive_members", "is_archive", "is_os_junk", "iter_sources"]

_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", ".localized"}
_ZIP_MAGIC = b"PK\x03\x04"
_MAP_THRESHOLD = 1 << 20


def is_os_junk(name: str) -> bool:
    """Whether a file name (or a path inside an archive) is operating-system clutter rather than data."""
    path = name.replace("\\", "/")
    base = path.rpartition("/")[2]
    return base.startswith("._") or base.lower() in _JUNK_NAMES or "__MACOSX/" in path


@dataclass(frozen=True)
class Source:
    """One file to offer to ingest: on disk, a member of a zip archive, or bytes already in memory
    (an instance a peer transfer received: writing it to a file only to read it back would be
    wasted I/O)."""

    label: str
    path: str
    """The file on disk (the archive, for a member); empty for ``content``. Text, not a Path:
    listing 10,000 files made Path objects cost a tenth of a bulk ingest's CPU."""
    member: str = ""
    content: bytes | None = field(default=None, repr=False, compare=False)
    """The file itself, when it is in memory; never an archive."""
    handed_over: bool = False
    """The file is the store's once stored: nobody changes it afterwards (a complete upload; see
    ``uploads.new_version``), so an uncompressed store may link it into blobs/ rather than copy it."""

    @contextlib.contextmanager
    def open(self, expansion: Expansion = Expansion()) -> Iterator[tuple[bytes | mmap.mmap, int | None]]:
        """The content, and a file descriptor holding it (None for content in memory).

        Large files are memory-mapped, so an instance is never copied into Python memory; small
        ones are read, because mapping costs more than reading below about a megabyte. A zip
        member is inflated as far as ``expansion`` lets it (see ``inflate``): a large one into a
        nameless file in the store's tmp/, then mapped like a file on disk.

        Raises
        ------
        RejectedFileError
            A zip member expands past ``expansion.most`` (ExpansionError), or is damaged.
        OSError
            The file cannot be read, or a large member cannot be written into tmp/.
        """
        if self.content is not None:
            yield self.content, None
            return
        if self.member:
            with expanded(zip_member(self.path, self.member), expansion) as opened:
                yield opened
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < _MAP_THRESHOLD:
                yield _read_all(fd, size), fd
                return
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            try:
                yield mapped, fd
            finally:
                mapped.close()
        finally:
            os.close(fd)


def _read_all(fd: int, size: int) -> bytes:
    data = os.pread(fd, size, 0)
    while len(data) < size:  # a short read only happens on odd filesystems; be exact anyway
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    return data


def iter_sources(paths: list[Path]) -> Iterator[Source]:
    """Every candidate file under ``paths`` (files, folders, zips, DICOMDIRs), in a stable order.

    Listing must stay cheap, since it runs before any file is parsed: paths stay strings, and
    only names ending in ``.zip`` are opened to look for an archive. A zip by any other name is
    found when it is parsed (see ``is_archive``) and expanded then.
    """
    for path in paths:
        if path.is_dir():
            yield from _walk(str(path))
        elif path.name.upper() == "DICOMDIR" and path.is_file():
            yield Source(str(path), str(path))
            yield from _dicomdir_members(path)
        elif not is_os_junk(path.name):
            yield from _file(str(path))


def _walk(folder: str) -> Iterator[Source]:
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):  # a linked folder can loop back on itself
            yield from _walk(entry.path)
        elif entry.is_file() and not is_os_junk(entry.name):
            yield from _file(entry.path)


def _file(path: str) -> Iterator[Source]:
    if path.lower().endswith(".zip") and zipfile.is_zipfile(path):
        yield from archive_members(path)
    else:
        yield Source(path, path)


def is_archive(data: bytes | mmap.mmap, source: Source) -> bool:
    """Whether content that is not DICOM is a zip archive on disk, whose members to ingest."""
    return source.content is None and not source.member and data[:4] == _ZIP_MAGIC and zipfile.is_zipfile(source.path)


def archive_members(path: str | Path) -> list[Source]:
    """The files of a zip archive, OS clutter left out, in name order."""
    with zipfile.ZipFile(path) as archive:
        members = [info.filename for info in archive.infolist() if not info.is_dir()]
    return [Source(f"{path}:{member}", str(path), member) for member in sorted(members) if not is_os_junk(member)]


def _dicomdir_members(dicomdir: Path) -> Iterator[Source]:
    """The files a DICOMDIR lists (when it is given on its own rather than inside a folder)."""
    import pydicom

    try:
        dataset = pydicom.dcmread(dicomdir, force=True)
    except Exception:  # an unreadable DICOMDIR is reported when it is parsed as a source
        return
    root = dicomdir.parent
    for record in dataset.get("DirectoryRecordSequence", []):
        parts = record.get("ReferencedFileID")
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        resolved = _resolve_case_insensitive(root, [str(p) for p in parts])
        if resolved is not None:
            yield Source(str(resolved), str(resolved))


def _resolve_case_insensitive(root: Path, parts: list[str]) -> Path | None:
    """Find ``root/parts...`` even when the CD's upper-case names were copied in lower case.

    A DICOMDIR names files below its own folder only: a part that could lead elsewhere (``..``,
    a separator, an absolute path) makes the reference unusable rather than followed.
    """
    if any(part in ("", ".", "..") or "/" in part or "\\" in part for part in parts):
        return None
    current = root
    for part in parts:
        candidate = current / part
        if candidate.exists():
            current = candidate
            continue
        matches = [p for p in current.iterdir() if p.name.lower() in (part.lower(), part.lower() + ";1")] if current.is_dir() else []
        if not matches:
            return None
        current = matches[0]
    return current
