"""Instance content as the seekable binary stream wsgidav reads a GET (and its Range) from."""

from __future__ import annotations

import io
import os

from dicomfs.store.blobs import BlobReader

__all__ = ["open_stream"]


def open_stream(reader: BlobReader) -> io.RawIOBase:
    """A stream over the instance ``reader`` opened; closing it closes the reader.

    An uncompressed blob holds the instance's bytes at the same offsets, so its file descriptor is
    the stream itself (as fast as serving a plain file); a compressed one decompresses the blocks
    a read touches.
    """
    if not reader.compressed:
        fd, reader.fd = reader.fd, -1  # the file object owns the descriptor now
        return io.FileIO(fd, "rb", closefd=True)
    return _BlockStream(reader)


class _BlockStream(io.RawIOBase):
    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._reader.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._reader.size - self._position)
        if wanted <= 0:
            return 0
        data = self._reader.read(self._position, wanted)
        buffer[:len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
        super().close()
