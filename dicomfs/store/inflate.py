"""Expanding compressed content (zip members, deflated DICOM datasets) in bounded memory.

A 3 MB zip can hold a 3 GiB member of zeros, and a 2 MB deflated DICOM a 2 GiB dataset: read
whole, either took ingest past 4 GB of memory. Here what a file expands to comes in steps of at
most ``STEP`` bytes, counted as they come: past ``Expansion.most`` (``ingest.max_expanded_size``)
the file is rejected before anything more is inflated, whatever size the file declares. Up to
``IN_MEMORY`` bytes stay in memory; beyond, everything goes into a nameless file in the store's
``tmp/`` folder, memory-mapped as any large file on disk is, so a process's memory never depends
on what a file expands to. Steps of zeros (what bombs are made of) become holes in that file
rather than disk writes, and a nameless file vanishes with its descriptor, even after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Generator, Iterator, Union

from dicomfs.errors import ExpansionError, RejectedFileError, TruncatedError
from dicomfs.store.settings import MAX_EXPANDED_SIZE

__all__ = ["Expansion", "expanded", "inflate_raw", "zip_member"]

STEP = 1 << 20
"""Bytes inflated at a time: large enough that a step costs far more inflating than Python."""
IN_MEMORY = 8 << 20
"""Content up to this size stays in memory: a file in tmp/ and its mapping cost more below it,
and the committer holds at most twice ``ingest.batch_bytes`` of submitted content anyway."""
_INPUT_STEP = 64 << 10
_ZEROS = bytes(STEP)
_EXPANDED_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
"""Deflate (and stored) members are inflated ``STEP`` bytes at a time. zipfile inflates bzip2 and
LZMA members without an output bound: one 4 KiB read of a bzip2 bomb can expand to gigabytes."""

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]


@dataclass(frozen=True)
class Expansion:
    """How far ingest lets a file expand, and where content too large for memory goes."""

    most: int = MAX_EXPANDED_SIZE
    spill: str = ""
    """The folder for content past ``IN_MEMORY`` (the store's tmp/); "" for the system's."""

    def refusal(self) -> ExpansionError:
        return ExpansionError(f"rejected: expands past ingest.max_expanded_size ({self.most} bytes)")


@contextlib.contextmanager
def expanded(chunks: Generator[bytes, None, None], expansion: Expansion) -> Iterator[tuple[bytes | mmap.mmap, int | None]]:
    """What ``chunks`` add up to, and a file descriptor holding it (None when it is in memory).

    Raises
    ------
    ExpansionError
        The chunks add up to more than ``expansion.most`` bytes (found before more is inflated).
    OSError
        The spill file could not be made or written (the store's disk is full).
    """
    held = bytearray()
    total = 0
    fd: int | None = None
    try:
        for chunk in chunks:
            total += len(chunk)
            if total > expansion.most:
                raise expansion.refusal()
            if fd is not None:
                if chunk != _ZEROS:  # a step of zeros is left as a hole
                    _write_at(fd, chunk, total - len(chunk))
                continue
            held += chunk
            if len(held) > IN_MEMORY:
                fd = _nameless_file(expansion.spill)
                _write_at(fd, held, 0)
                held = bytearray()
        if fd is None:
            yield bytes(held), None
            return
        os.ftruncate(fd, total)  # a last step of zeros is a hole the file must still cover
        mapped = mmap.mmap(fd, total, access=mmap.ACCESS_READ)
        try:
            yield mapped, fd
        finally:
            mapped.close()
    finally:
        chunks.close()  # an archive member left part-read closes its archive now
        if fd is not None:
            os.close(fd)


def inflate_raw(data: Buffer, start: int) -> Generator[bytes, None, None]:
    """The raw deflate stream ``data[start:]`` (a deflated DICOM dataset), inflated ``STEP`` bytes
    at a time; bytes after the stream's end are ignored, as zlib does.

    Raises
    ------
    TruncatedError
        The stream does not inflate, or ends before its final block.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    position, end = start, len(data)
    pending = b""
    try:
        while not inflater.eof:
            if not pending and position < end:
                pending = bytes(data[position : position + _INPUT_STEP])
                position += len(pending)
            chunk = inflater.decompress(pending, STEP)
            pending = inflater.unconsumed_tail
            if chunk:
                yield chunk
            elif not pending and position >= end:
                break
    except zlib.error as error:
        raise TruncatedError(f"truncated: the deflated dataset does not inflate ({error})") from None
    if not inflater.eof:
        raise TruncatedError("truncated: the deflated dataset ends inside its deflate stream")


def zip_member(path: str, member: str) -> Generator[bytes, None, None]:
    """The content of ``member`` of the zip archive at ``path``, ``STEP`` bytes at a time.

    The sizes the archive declares are not trusted: zipfile stops at the declared size, and
    ``expanded`` counts what actually comes.

    Raises
    ------
    ExpansionError
        The member is compressed with a method dicomfs does not expand (bzip2, LZMA).
    RejectedFileError
        The member is damaged (a bad CRC, a stream that does not inflate) or encrypted.
    OSError
        The archive cannot be read.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
            if info.compress_type not in _EXPANDED_ZIP_METHODS:
                raise ExpansionError(f"rejected: the zip member is compressed with method {info.compress_type}; "
                                     "dicomfs expands deflated and stored members only")
            with archive.open(info) as stream:
                while chunk := stream.read(STEP):
                    yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, NotImplementedError, RuntimeError) as error:
        # RuntimeError: an encrypted member; KeyError: the archive changed since it was listed
        raise RejectedFileError(f"rejected: the zip member cannot be read ({error})") from None


def _nameless_file(folder: str) -> int:
    """A file with no name in ``folder`` (the system's temporary folder for ""), open for writing."""
    folder = folder or tempfile.gettempdir()
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, name = tempfile.mkstemp(dir=folder, prefix=".dicomfs-expanding-")  # no O_TMPFILE there
    os.unlink(name)
    return fd


def _write_at(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
