"""What a view folder lists: entries with the name, size and time a client shows."""

from __future__ import annotations

import enum
import unicodedata
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["Entry", "EntryKind", "Listing", "Node"]


class EntryKind(enum.Enum):
    FOLDER = "folder"
    INSTANCE = "instance"
    """A stored DICOM instance: the same bytes (and, in the mount, the same inode) in every view."""
    DOCUMENT = "document"
    """A small file made from the index, such as ``study.json``."""


Node = tuple[str, ...]
"""What a folder stands for, e.g. ``("study", "by-uids", <study id>)``: how to list it."""


@dataclass(frozen=True)
class Entry:
    """One name in a folder."""

    name: str
    kind: EntryKind
    size: int
    mtime: float
    node: Node = ()
    """For a folder, what it lists; for a document, what it describes."""
    resource_id: str | None = None
    """The patient, study, series or instance this entry shows, if any."""

    @property
    def is_folder(self) -> bool:
        return self.kind is EntryKind.FOLDER


@dataclass(frozen=True)
class Listing:
    """A folder's entries in name order, and a way to find one by name."""

    entries: tuple[Entry, ...]
    mtime: float
    _by_name: Mapping[str, Entry] = field(repr=False, default_factory=dict)
    _by_folded: Mapping[str, Entry] = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, entries: list[Entry], mtime: float) -> Listing:
        entries.sort(key=lambda e: (e.name.casefold(), e.name))
        return cls(tuple(entries), mtime, {e.name: e for e in entries},
                   {unicodedata.normalize("NFC", e.name).casefold(): e for e in entries})

    def find(self, name: str) -> Entry | None:
        """The entry called ``name``; failing an exact match, one equal but for case or Unicode form
        (macOS sends decomposed names; Windows clients ignore case)."""
        found = self._by_name.get(name)
        if found is None:
            found = self._by_folded.get(unicodedata.normalize("NFC", name).casefold())
        return found
