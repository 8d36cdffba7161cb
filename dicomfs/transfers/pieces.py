"""What moves in a transfer: a piece of an instance, and an instance wanted (``protocol`` explains both)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Piece", "Wanted"]


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
