"""How a store writes: the settings the configuration turns into, apart from the code that
uses them, so a command that only reads (``export``, ``ls``) loads neither the committer nor
the parser behind it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "MAX_EXPANDED_SIZE", "WriteSettings"]

MAX_EXPANDED_SIZE = 4 << 30
"""The default of ``ingest.max_expanded_size`` (``dicomfs.config`` says why)."""


@dataclass(frozen=True)
class Limits:
    """Recycling limits; 0 switches a limit off."""

    max_size: int = 0
    max_patients: int = 0


@dataclass(frozen=True)
class WriteSettings:
    """How the committer writes: codec, batching and recycling, from the configuration."""

    codec: str = "none"
    level: int = 0
    block_size: int = 131072
    overwrite: bool = False
    limits: Limits = Limits()
    batch_files: int = 128
    batch_bytes: int = 64 << 20
    batch_delay: float = 0.02
    threads: int = 4
    workers: int = 0
    """Processes for bulk ingest; 0 means one per CPU."""
    max_expanded_size: int = MAX_EXPANDED_SIZE
    """Most bytes a zip member or a deflated dataset may expand to (see ``inflate``)."""
