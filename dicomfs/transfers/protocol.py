"""The transfer protocol's data: what a bucket is, how one is planned, written and read.

Pure: no store, no HTTP. ``docs/transfers.md`` describes the protocol as a whole.

A *bucket* carries pieces of instances: a whole small instance, or one chunk of a large one. Its
bytes are a fixed header, a JSON manifest, then the pieces' bytes back to back::

    b"DFSB" | version (1 byte) | manifest length (4 bytes, big-endian) | manifest | piece bytes...

The manifest lists the pieces in order as ``[instance id, sha256 of the whole instance, size of
the whole instance, offset, length]``: enough for the receiver to place a chunk and to check the
whole instance before it commits it. A bucket travels gzip-compressed or not; that is HTTP's
``Content-Encoding``, not the bucket's business.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterable, Sequence

from dicomfs.transfers.pieces import Piece, Wanted
from dicomfs.transfers.validation import MAX_BUCKET_PIECES, ManifestError, TooLargeError, bucket_manifest, parse_json

__all__ = ["BUCKET_TYPE", "GZIP_LEVEL", "BadBucketError", "BucketOverflowError", "Piece", "Wanted", "decode_bucket",
           "decode_bucket_from", "encode_bucket", "merge_ranges", "missing_ranges", "plan_buckets"]

BUCKET_TYPE = "application/vnd.dicomfs.bucket"
"""The media type of a bucket, in either direction."""
GZIP_LEVEL = 6
"""gzip's own default, in both directions: on the slow links transfers are for, bytes saved matter more than CPU."""
MAGIC = b"DFSB"
VERSION = 1
_HEADER = struct.Struct(">4sBI")
MAX_MANIFEST = 4 << 20
"""A manifest of MAX_BUCKET_PIECES pieces is ~1.3 MB."""
_READ_STEP = 1 << 20


class BadBucketError(ManifestError):
    """A bucket that cannot be read: wrong magic or version, a manifest that is not one, a short body."""


class BucketOverflowError(BadBucketError):
    """More bytes than the bucket's manifest declares (a gzip body inflating without end, say)."""

    http_status = 413


def plan_buckets(wanted: Iterable[Wanted], bucket_size: int) -> list[list[Piece]]:
    """Group what is wanted into buckets of at most ``bucket_size`` bytes of content.

    Whole instances that fit are packed in order, a bucket closed when the next would not fit; a
    larger instance (or the missing ranges of one) goes in chunks of at most ``bucket_size``, a
    bucket each, so one slow chunk never holds up small instances. An empty instance still gets a
    piece: the receiver must see it to store it. A bucket holds at most MAX_BUCKET_PIECES pieces,
    the most a receiver takes.
    """
    buckets: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for item in wanted:
        ranges = item.missing if item.missing is not None else ((0, item.size),)
        if item.missing is None and item.size <= bucket_size:
            if current and (filled + item.size > bucket_size or len(current) == MAX_BUCKET_PIECES):
                buckets.append(current)
                current, filled = [], 0
            current.append(Piece(item.id, item.sha256, item.size, 0, item.size))
            filled += item.size
            continue
        for start, end in ranges:
            for offset in range(start, end, bucket_size):
                buckets.append([Piece(item.id, item.sha256, item.size, offset, min(bucket_size, end - offset))])
    if current:
        buckets.append(current)
    return buckets


def encode_bucket(pieces: Sequence[Piece], read: Callable[[Piece], bytes]) -> bytes:
    """The bucket's bytes; ``read(piece)`` gives each piece's content."""
    manifest = json.dumps([[p.id, p.sha256, p.size, p.offset, p.length] for p in pieces],
                          separators=(",", ":")).encode()
    parts = [_HEADER.pack(MAGIC, VERSION, len(manifest)), manifest]
    for piece in pieces:
        data = read(piece)
        if len(data) != piece.length:
            raise BadBucketError(f"instance {piece.id}: read {len(data)} bytes at {piece.offset}, expected {piece.length}")
        parts.append(data)
    return b"".join(parts)


def decode_bucket(data: bytes | memoryview) -> list[tuple[Piece, memoryview]]:
    """The pieces of a bucket held in memory and their bytes; BadBucketError when malformed."""
    return decode_bucket_from(io.BytesIO(data).read)


def decode_bucket_from(read: Callable[[int], bytes]) -> list[tuple[Piece, memoryview]]:
    """The pieces of a bucket read from a stream (``read(n)`` gives up to ``n`` bytes, ``b""`` at
    its end) and their bytes (views into one buffer).

    The header and the manifest come first and are checked (``validation.bucket_manifest``)
    before anything else is read; then exactly the bytes the manifest declares are read, and one
    more byte is refused (BucketOverflowError). So the memory a bucket takes is what its checked
    manifest declares, however large the stream (a gzip body inflating without end) would be.
    """
    header = _read_exactly(read, _HEADER.size)
    if len(header) < _HEADER.size:
        raise BadBucketError(f"a bucket of {len(header)} bytes is shorter than its header")
    magic, version, length = _HEADER.unpack(header)
    if magic != MAGIC:
        raise BadBucketError("not a dicomfs bucket (bad magic)")
    if version != VERSION:
        raise BadBucketError(f"bucket version {version} is not supported (this dicomfs reads {VERSION})")
    if length > MAX_MANIFEST:
        raise BucketOverflowError(f"the bucket's manifest of {length} bytes is over the limit of {MAX_MANIFEST}")
    manifest = _read_exactly(read, length)
    if len(manifest) < length:
        raise BadBucketError("the bucket's manifest is longer than the bucket")
    try:
        pieces = bucket_manifest(parse_json(manifest))
    except TooLargeError as error:
        raise BucketOverflowError(str(error)) from None
    except ManifestError as error:
        raise BadBucketError(str(error)) from None
    content = bytearray(sum(p.length for p in pieces))
    view = memoryview(content)
    got = _read_into(read, view)
    found, position = [], 0
    for piece in pieces:
        if position + piece.length > got:
            raise BadBucketError(f"the bucket ends inside instance {piece.id}")
        found.append((piece, view[position:position + piece.length]))
        position += piece.length
    if read(1):
        declared = _HEADER.size + length + len(content)
        raise BucketOverflowError(f"bytes after the last piece: the body is larger than the {declared} bytes "
                                  "its bucket declares")
    return found


def _read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    """``size`` bytes of the stream, or fewer at its end."""
    buffer = bytearray(size)
    return bytes(buffer[:_read_into(read, memoryview(buffer))])


def _read_into(read: Callable[[int], bytes], view: memoryview) -> int:
    """Fill ``view`` from the stream; how many bytes came (fewer at its end)."""
    filled = 0
    while filled < len(view):
        chunk = read(min(len(view) - filled, _READ_STEP))
        if not chunk:
            break
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return filled


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) ranges covering the same bytes."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def missing_ranges(received: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The ranges of ``size`` bytes not covered by ``received``."""
    missing, position = [], 0
    for start, end in merge_ranges(received):
        if start > position:
            missing.append((position, start))
        position = max(position, end)
    if position < size:
        missing.append((position, size))
    return missing
