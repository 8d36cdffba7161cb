"""The on-disk format of compressed blobs: independent blocks, a block table, a trailer.

Orthanc compresses a whole instance as one zlib stream, so every read of any byte inflates the
whole file. dicomfs cuts the content into blocks that compress on their own, so a read of 128 KiB
at any offset (the kernel's FUSE read size) inflates one or two blocks. One block boundary always
falls at the Pixel Data element, so the header (everything before it) reads without touching
pixel blocks::

    [block 0][block 1]...[block n-1][table: n x (raw_start u64, stored_start u64)][trailer 32 B]

    trailer = magic "DCMFSBLK" | version u8 | codec u8 | reserved u16 | n u32 | raw_size u64 |
              table_offset u64

A block whose compressed form would not be smaller is stored raw; the reader knows it because its
stored length equals its raw length. Plain (``none``) blobs are the original bytes, no framing.
This module is pure: it turns buffers into bytes and back, and leaves file I/O to ``blobs``.
"""

from __future__ import annotations

import struct
import threading
import zlib
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import zstandard


__all__ = ["BlockTable", "CODECS", "Codec", "TRAILER_SIZE", "block_bounds", "compress_blocks", "parse_trailer"]

MAGIC = b"DCMFSBLK"
VERSION = 1
TRAILER = struct.Struct("<8sBBHIQQ")
TRAILER_SIZE = TRAILER.size
ENTRY = struct.Struct("<QQ")


@dataclass(frozen=True)
class Codec:
    """A block compressor: its name, its code in the trailer, and its two functions."""

    name: str
    code: int
    compress: Callable[[bytes | memoryview, int], bytes]
    decompress: Callable[[bytes, int], bytes]


_local = threading.local()


def _zstd_compress(data: bytes | memoryview, level: int) -> bytes:
    # ZstdCompressor objects are not thread-safe: keep one per thread and level.
    compressors: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("zstd_c", {})
    compressor = compressors.get(level)
    if compressor is None:
        import zstandard  # here: its import (and the platform module it pulls) costs every command ~3 ms

        compressor = compressors[level] = zstandard.ZstdCompressor(level=level or 3, write_content_size=True)
    return compressor.compress(data)


def _zstd_decompress(data: bytes, raw_length: int) -> bytes:
    decompressor = _local.__dict__.get("zstd_d")
    if decompressor is None:
        import zstandard

        decompressor = _local.zstd_d = zstandard.ZstdDecompressor()
    return decompressor.decompress(data, max_output_size=raw_length)


def _zlib_compress(data: bytes | memoryview, level: int) -> bytes:
    return zlib.compress(data, level or 1)  # 0: dicomfs's default, see storage.compression_level


def _zlib_decompress(data: bytes, raw_length: int) -> bytes:
    return zlib.decompress(data, bufsize=max(raw_length, 1))


CODECS: dict[str, Codec] = {
    "zlib": Codec("zlib", 1, _zlib_compress, _zlib_decompress),
    "zstd": Codec("zstd", 2, _zstd_compress, _zstd_decompress),
}
_BY_CODE = {codec.code: codec for codec in CODECS.values()}


def block_bounds(raw_size: int, header_length: int, block_size: int) -> list[int]:
    """Start offsets of the blocks: every ``block_size`` bytes, restarting at ``header_length``."""
    starts: list[int] = []
    split = header_length if 0 < header_length < raw_size else raw_size
    starts.extend(range(0, split, block_size))
    starts.extend(range(split, raw_size, block_size))
    return starts or [0]


def compress_blocks(
    data: memoryview, codec: Codec, level: int, header_length: int, block_size: int
) -> Iterator[bytes]:
    """Yield the stored bytes of every block, then the table and the trailer."""
    raw_size = len(data)
    starts = block_bounds(raw_size, header_length, block_size)
    ends = starts[1:] + [raw_size]
    table = bytearray()
    stored_offset = 0
    for start, end in zip(starts, ends):
        raw = data[start:end]
        packed = codec.compress(raw, level)
        stored = packed if len(packed) < len(raw) else bytes(raw)
        table += ENTRY.pack(start, stored_offset)
        stored_offset += len(stored)
        yield stored
    yield bytes(table)
    yield TRAILER.pack(MAGIC, VERSION, codec.code, 0, len(starts), raw_size, stored_offset)


@dataclass(frozen=True)
class BlockTable:
    """Where each block of a compressed blob lies, read from its trailer and table."""

    codec: Codec
    raw_size: int
    raw_starts: Sequence[int]
    stored_starts: Sequence[int]
    table_offset: int

    def blocks_for(self, offset: int, length: int) -> range:
        """Indexes of the blocks that hold bytes ``[offset, offset + length)``."""
        if length <= 0 or offset >= self.raw_size:
            return range(0)
        first = bisect_right(self.raw_starts, offset) - 1
        last = bisect_right(self.raw_starts, min(offset + length, self.raw_size) - 1) - 1
        return range(first, last + 1)

    def raw_span(self, index: int) -> tuple[int, int]:
        """(start, end) of block ``index`` in the original content."""
        end = self.raw_starts[index + 1] if index + 1 < len(self.raw_starts) else self.raw_size
        return self.raw_starts[index], end

    def stored_span(self, index: int) -> tuple[int, int]:
        """(start, end) of block ``index`` in the blob file."""
        end = self.stored_starts[index + 1] if index + 1 < len(self.stored_starts) else self.table_offset
        return self.stored_starts[index], end

    def inflate(self, index: int, stored: bytes) -> bytes:
        """The original bytes of block ``index`` from its stored bytes."""
        raw_start, raw_end = self.raw_span(index)
        if len(stored) == raw_end - raw_start:
            return stored
        return self.codec.decompress(stored, raw_end - raw_start)


class BlockFormatError(ValueError):
    """The trailer or table of a compressed blob is damaged."""


def parse_trailer(trailer: bytes) -> tuple[Codec, int, int, int]:
    """Decode a trailer into (codec, block count, raw size, table offset)."""
    if len(trailer) != TRAILER_SIZE:
        raise BlockFormatError("compressed blob shorter than its trailer")
    magic, version, code, _, count, raw_size, table_offset = TRAILER.unpack(trailer)
    if magic != MAGIC or version != VERSION or code not in _BY_CODE:
        raise BlockFormatError("compressed blob has no valid trailer")
    return _BY_CODE[code], count, raw_size, table_offset


def parse_table(codec: Codec, count: int, raw_size: int, table_offset: int, table: bytes) -> BlockTable:
    """Build the BlockTable from the raw table bytes that precede the trailer."""
    if len(table) != count * ENTRY.size:
        raise BlockFormatError("compressed blob has a short block table")
    entries = [ENTRY.unpack_from(table, i * ENTRY.size) for i in range(count)]
    return BlockTable(codec, raw_size, [e[0] for e in entries], [e[1] for e in entries], table_offset)
