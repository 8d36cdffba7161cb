"""gzip bodies undone a little at a time, so what a body inflates to is bounded by its reader.

Both ends of a transfer take gzip bodies from a peer (the bridge a pushed bucket, a pull job a
fetched one). Inflating a body whole lets 100 kB of zeros become gigabytes in memory; a
:class:`GunzipReader` hands out at most what is asked for, and ``decode_bucket_from`` asks for
no more than the bucket's checked manifest declares.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from dicomfs.transfers.validation import ManifestError

__all__ = ["GunzipReader"]

_STEP = 64 << 10
"""Compressed bytes read at a time: deflate's largest expansion (~1032x) makes this at most ~64 MiB
inflated per call, and ``decompress``'s ``max_length`` holds it to what was asked for."""


class GunzipReader:
    """``read(n)`` of the inflated stream of one gzip member read through ``read_raw(n)``.

    ManifestError when the gzip data is damaged, cut short, or followed by more bytes.
    """

    def __init__(self, read_raw: Callable[[int], bytes]) -> None:
        self._read_raw = read_raw
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def read(self, size: int) -> bytes:
        inflater = self._inflater
        while not inflater.eof:
            source = inflater.unconsumed_tail or self._read_raw(_STEP)
            try:
                # b"" once the input has ended still yields output zlib held back.
                data = inflater.decompress(source, size)
            except zlib.error as error:
                raise ManifestError(f"the gzip body is damaged: {error}") from None
            if data:
                return data
            if not source:
                raise ManifestError("the gzip body is cut short")
        if inflater.unused_data or self._read_raw(1):
            raise ManifestError("bytes after the end of the gzip body")
        return b""
