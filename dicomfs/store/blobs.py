"""Blob files: where instance and attachment bytes live, and how they are written and read.

Each blob is one file under ``blobs/ab/<32 hex>``: 256 folders, created with the store, so the
hot path never makes a directory. At a million instances that is ~4,000 entries a folder, which
ext4's hashed directories handle without slowing (two levels of 256 were measured slower: nearly
every new blob then made a folder, and ``syncfs`` had all those folders to flush). A blob is written once and never changed; deleting it is the only
other operation. Writing does not fsync: the caller makes a whole batch durable with one
``sync_filesystem`` call (see ``committer``), which here is 2-3x faster than an fsync per file.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from dicomfs.errors import StoreCorruptError
from dicomfs.store.blockformat import (
    CODECS,
    TRAILER_SIZE,
    BlockFormatError,
    BlockTable,
    compress_blocks,
    parse_table,
    parse_trailer,
)
from dicomfs.store.libc import link_open_file, syncfs

__all__ = ["BlobReader", "BlobStore", "is_disk_full", "sync_filesystem"]


def is_disk_full(error: OSError) -> bool:
    """Whether a write failed because the store's disk (or the user's quota) is full."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)

_COPY_CHUNK = 8 << 20
_KERNEL_COPY_MIN = 1 << 20
"""Below this, one write() of bytes already in memory beats a copy_file_range round trip."""
_NAMES_PER_FOLDER = 128
"""Names reserved together come in runs that share a shard folder: the blobs a bulk worker writes
one after another then fill a few directory and inode-table blocks rather than one of each per
blob, which halved the ``syncfs`` of 5,000 small blobs here (120-145 ms against 240-260 ms). Each
run's folder is random, so the folders still fill evenly."""


def sync_filesystem(folder: Path) -> None:
    """Make everything written on ``folder``'s filesystem durable (one ``syncfs`` call)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs(fd)
    finally:
        os.close(fd)


class BlobStore:
    """The ``blobs/`` folder of a store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_text = str(root)
        self._known_dirs: set[str] = set()
        self._tables: OrderedDict[str, BlockTable] = OrderedDict()
        self._tables_lock = threading.Lock()

    def create_folders(self) -> None:
        """Make the 256 shard folders (once, when the store is created)."""
        for shard in range(256):
            (self.root / f"{shard:02x}").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_name() -> str:
        """A fresh blob name: 128 random bits, so concurrent writers never collide."""
        return secrets.token_hex(16)

    @staticmethod
    def new_names(count: int) -> list[str]:
        """``count`` fresh names, in runs of ``_NAMES_PER_FOLDER`` in one shard folder each (120
        random bits a name besides the folder's 8: still no collision between writers)."""
        names: list[str] = []
        while len(names) < count:
            folder = secrets.token_hex(1)
            names.extend(folder + secrets.token_hex(15) for _ in range(min(_NAMES_PER_FOLDER, count - len(names))))
        return names

    def path(self, name: str) -> Path:
        """The file that holds blob ``name``."""
        return self.root / name[0:2] / name

    def write(
        self,
        name: str,
        data: bytes | memoryview | mmap.mmap,
        *,
        codec: str = "none",
        level: int = 0,
        block_size: int = 131072,
        header_length: int = 0,
        source_fd: int | None = None,
    ) -> int:
        """Write blob ``name`` from ``data`` and return its size on disk (not yet durable).

        With ``codec="none"`` and a ``source_fd`` holding the same bytes, the kernel copies the
        file (``copy_file_range``) so the content never passes through Python.
        """
        path = self._new_path(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            with memoryview(data) as view:  # released on the way out, so a mapped source can close
                return self._write_content(fd, view, codec, level, block_size, header_length, source_fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)

    def adopt(self, name: str, fd: int, size: int) -> int | None:
        """Make the file open as ``fd`` (``size`` bytes, to be stored as they are) blob ``name`` by
        linking it, so its bytes are neither read nor written again; its size, or None when it
        cannot be linked (another file system, a changed file) and must be copied (``write``).

        Only for a file nobody will change (``Source.handed_over``): the blob *is* that file.
        """
        path = self._new_path(name)
        try:
            if os.fstat(fd).st_size != size:
                return None
            os.fchmod(fd, 0o640)
            link_open_file(fd, path)
        except OSError as error:
            if is_disk_full(error):
                raise
            return None  # EXDEV, EPERM (a file system without links), EMLINK...: a copy will do
        return size

    def _new_path(self, name: str) -> str:
        """Where blob ``name`` goes, its shard folder made if need be (normally made with the
        store). A string: pathlib costs ~10 us a file here."""
        if name[0:2] not in self._known_dirs:
            (self.root / name[0:2]).mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(name[0:2])
        return f"{self._root_text}/{name[0:2]}/{name}"

    @staticmethod
    def _write_content(fd: int, view: memoryview, codec: str, level: int, block_size: int,
                       header_length: int, source_fd: int | None) -> int:
        if codec == "none":
            if source_fd is not None and len(view) >= _KERNEL_COPY_MIN:
                _copy_whole(source_fd, fd, len(view))
            else:
                _write_all(fd, view)
            return len(view)
        written = 0
        for chunk in compress_blocks(view, CODECS[codec], level, header_length, block_size):
            _write_all(fd, memoryview(chunk))
            written += len(chunk)
        return written

    def remove(self, name: str) -> None:
        """Delete blob ``name``; a blob already gone is not an error (removal may be replayed)."""
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass
        with self._tables_lock:
            self._tables.pop(name, None)

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def stored_size(self, name: str) -> int:
        """Bytes the blob takes on disk (its file size)."""
        return self.path(name).stat().st_size

    def names(self) -> Iterator[str]:
        """Every blob name present on disk (for ``check``), in no particular order."""
        if not self.root.exists():
            return
        for shard in os.scandir(self.root):
            if shard.is_dir():
                for entry in os.scandir(shard.path):
                    yield entry.name

    def open(self, name: str, codec: str, size: int) -> "BlobReader":
        """A reader of blob ``name``'s original bytes (``size`` of them)."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreCorruptError(f"blob {name} is missing from the store") from None
        return BlobReader(self, name, fd, codec, size)

    def table(self, name: str, fd: int) -> BlockTable:
        """The block table of a compressed blob, cached: it is read on every open otherwise."""
        with self._tables_lock:
            table = self._tables.get(name)
            if table is not None:
                self._tables.move_to_end(name)
                return table
        end = os.fstat(fd).st_size
        try:
            codec, count, raw_size, table_offset = parse_trailer(os.pread(fd, TRAILER_SIZE, end - TRAILER_SIZE))
            raw_table = os.pread(fd, end - TRAILER_SIZE - table_offset, table_offset)
            table = parse_table(codec, count, raw_size, table_offset, raw_table)
        except (BlockFormatError, OSError) as error:
            raise StoreCorruptError(f"blob {name} is damaged: {error}") from None
        with self._tables_lock:
            self._tables[name] = table
            if len(self._tables) > 4096:
                self._tables.popitem(last=False)
        return table


class BlobReader:
    """Random access to one blob's original bytes; close it when done (or use ``with``)."""

    def __init__(self, blobs: BlobStore, name: str, fd: int, codec: str, size: int) -> None:
        self.name = name
        self.size = size
        self.fd = fd
        self._table = blobs.table(name, fd) if codec != "none" else None
        self._cached_index = -1
        self._cached_block = b""

    @property
    def compressed(self) -> bool:
        """Whether reads decompress blocks (else the blob's bytes are the instance's, at the same offsets)."""
        return self._table is not None

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` original bytes from ``offset`` (fewer only at the end)."""
        if self._table is None:
            return os.pread(self.fd, length, offset)
        table = self._table
        parts: list[bytes] = []
        for index in table.blocks_for(offset, length):
            block = self._block(table, index)
            raw_start, _ = table.raw_span(index)
            lo = max(offset - raw_start, 0)
            hi = min(offset + length - raw_start, len(block))
            parts.append(block[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _block(self, table: BlockTable, index: int) -> bytes:
        if index != self._cached_index:
            start, end = table.stored_span(index)
            stored = os.pread(self.fd, end - start, start)
            try:
                self._cached_block = table.inflate(index, stored)
            except Exception as error:  # zlib.error, zstandard.ZstdError: both mean damage
                raise StoreCorruptError(f"blob {self.name} block {index} is damaged: {error}") from None
            self._cached_index = index
        return self._cached_block

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The whole content in order, ``chunk_size`` bytes at a time."""
        offset = 0
        while offset < self.size:
            chunk = self.read(offset, min(chunk_size, self.size - offset))
            if not chunk:
                raise StoreCorruptError(f"blob {self.name} is shorter than the index records")
            yield chunk
            offset += len(chunk)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_whole(source_fd: int, target_fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            copied = os.copy_file_range(source_fd, target_fd, min(_COPY_CHUNK, size - offset), offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.write(target_fd, os.pread(source_fd, min(_COPY_CHUNK, size - offset), offset))
        if copied == 0:
            raise OSError(errno.EIO, "source file shrank while it was being stored")
        offset += copied
