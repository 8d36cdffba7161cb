"""Which cached listings and documents a store change makes stale.

Each cached listing or document is kept with its *sources*: the resource it lists or describes,
the resources it shows, and, for the folders that list every patient or every study (the view
roots and by-dates), the levels they list. A change-log entry ``(op, level, id)`` touches its id
and its level. The store logs every ancestor of a resource that was added, removed or grown as
changed too, so a folder hears of a new child through its own id; what no source of a listing
was touched by is still exact, and stays cached while the rest of the archive receives data.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from dicomfs.store import Level
from dicomfs.views.entries import Listing, Node

__all__ = ["listing_sources", "touched"]

_LISTS_EVERY = {
    "by-patients": (Level.PATIENT,),
    # names of study folders outside by-patients carry their patient's PatientID and name
    "by-studies": (Level.PATIENT, Level.STUDY),
    "by-uids": (Level.PATIENT, Level.STUDY),
    "by-dates": (Level.PATIENT, Level.STUDY),
}
"""The levels a view's root lists all of."""
_DATED = ("year", "month", "undated")
"""by-dates folders below the root: studies of every patient, chosen by date."""


def _level(level: int) -> str:
    return f"level {level}"  # never a resource id (those are 44 characters of hex and dashes)


def listing_sources(node: Node, listing: Listing, documents: Mapping[Node, frozenset[str]]) -> frozenset[str]:
    """What the listing of the folder ``node`` was made from (see the module docstring).

    ``documents``: the sources of the documents the listing shows (their sizes are in it)."""
    kind = node[0]
    if kind == "view":
        return frozenset(_level(level) for level in _LISTS_EVERY[node[1]])
    if kind in _DATED:
        return frozenset(_level(level) for level in _LISTS_EVERY["by-dates"])
    if kind not in ("patient", "study", "series", "attachments"):
        return frozenset()  # the root, jobs/: nothing stored
    sources = {node[-1]}
    for entry in listing.entries:
        if entry.resource_id is not None:
            sources.add(entry.resource_id)
        sources |= documents.get(entry.node, frozenset())
    return frozenset(sources)


def touched(changes: Iterable[tuple[str, int, str]]) -> set[str]:
    """The ids and levels that change-log entries touch, to meet the sources of what is cached."""
    found: set[str] = set()
    for _, level, resource_id in changes:
        found.add(resource_id)
        found.add(_level(level))
    return found
