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

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dicomfs.errors import DicomfsError

__all__ = ["BUCKET_TYPE", "GZIP_LEVEL", "BadBucketError", "Piece", "Wanted", "decode_bucket", "encode_bucket",
           "merge_ranges", "missing_ranges", "plan_buckets"]

BUCKET_TYPE = "application/vnd.dicomfs.bucket"
"""The media type of a bucket, in either direction."""
GZIP_LEVEL = 6
"""gzip's own default, in both directions: on the slow links transfers are for, bytes saved matter more than CPU."""
MAGIC = b"DFSB"
VERSION = 1
_HEADER = struct.Struct(">4sBI")
MAX_MANIFEST = 16 << 20


class BadBucketError(DicomfsError):
    """A bucket that cannot be read: wrong magic or version, a manifest that is not one, a short body."""

    http_status = 400


@dataclass(frozen=True)
class Piece:
    """Bytes ``offset`` to ``offset + length`` of instance ``id`` (``size`` bytes, SHA-256 ``sha256``)."""

    id: str
    sha256: str
    size: int
    offset: int
    length: int

    @property
    def whole(self) -> bool:
        return self.offset == 0 and self.length == self.size


@dataclass(frozen=True)
class Wanted:
    """An instance to move, and the byte ranges of it the receiver still lacks (all of it, usually)."""

    id: str
    sha256: str
    size: int
    missing: tuple[tuple[int, int], ...] | None = None
    """(start, end) ranges still to send; None means the whole instance."""


def plan_buckets(wanted: Iterable[Wanted], bucket_size: int) -> list[list[Piece]]:
    """Group what is wanted into buckets of at most ``bucket_size`` bytes of content.

    Whole instances that fit are packed in order, a bucket closed when the next would not fit; a
    larger instance (or the missing ranges of one) goes in chunks of at most ``bucket_size``, a
    bucket each, so one slow chunk never holds up small instances. An empty instance still gets a
    piece: the receiver must see it to store it.
    """
    buckets: list[list[Piece]] = []
    current: list[Piece] = []
    filled = 0
    for item in wanted:
        ranges = item.missing if item.missing is not None else ((0, item.size),)
        if item.missing is None and item.size <= bucket_size:
            if current and filled + item.size > bucket_size:
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
    """The pieces of a bucket and their bytes (views into ``data``); BadBucketError when malformed."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise BadBucketError(f"a bucket of {len(view)} bytes is shorter than its header")
    magic, version, length = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BadBucketError("not a dicomfs bucket (bad magic)")
    if version != VERSION:
        raise BadBucketError(f"bucket version {version} is not supported (this dicomfs reads {VERSION})")
    if length > MAX_MANIFEST or _HEADER.size + length > len(view):
        raise BadBucketError("the bucket's manifest is longer than the bucket")
    try:
        rows = json.loads(bytes(view[_HEADER.size:_HEADER.size + length]))
        pieces = [Piece(str(i), str(h), int(s), int(o), int(n)) for i, h, s, o, n in rows]
    except (ValueError, TypeError) as error:
        raise BadBucketError(f"the bucket's manifest is not a list of pieces: {error}") from None
    position = _HEADER.size + length
    found = []
    for piece in pieces:
        if piece.length < 0 or piece.offset < 0 or piece.offset + piece.length > piece.size:
            raise BadBucketError(f"instance {piece.id}: piece {piece.offset}+{piece.length} lies outside its {piece.size} bytes")
        if position + piece.length > len(view):
            raise BadBucketError(f"the bucket ends inside instance {piece.id}")
        found.append((piece, view[position:position + piece.length]))
        position += piece.length
    if position != len(view):
        raise BadBucketError(f"{len(view) - position} bytes after the last piece")
    return found


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
