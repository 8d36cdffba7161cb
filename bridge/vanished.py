"""View folders a DELETE emptied a moment ago, which still answer a DELETE of their own.

A study's series folder exists only while it holds instances. A client deleting a tree one
member at a time (davfs2's ``rm -r``, cadaver's ``rm``, a script) deletes the last instance, which
takes the folder with it, then sends DELETE for the folder: a 404 there made ``rm -r`` report
"No such file or directory" and exit 1 although everything was gone. The mount keeps such
folders for the same reason (``mount.operations._VANISHED_SECONDS``). Only folders emptied by a
delete through this bridge are remembered, for a few seconds, so a DELETE of a name that never
existed still answers 404 (litmus checks that).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from wsgidav.dav_provider import DAVCollection

__all__ = ["VanishedFolder", "VanishedFolders"]

_SECONDS = 10.0
"""As long as the mount keeps a vanished folder: a client's recursive delete reaches a folder
within milliseconds of its last member."""
_MOST = 10_000
"""Folders remembered at most (~200 bytes each): a delete of a whole archive empties many."""


class VanishedFolders:
    """The view paths (as tuples of names) emptied by a delete, with when; thread-safe, bounded."""

    def __init__(self) -> None:
        self._when: OrderedDict[tuple[str, ...], float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, parts: tuple[str, ...]) -> None:
        with self._lock:
            self._when.pop(parts, None)
            self._when[parts] = time.monotonic()
            while len(self._when) > _MOST:
                self._when.popitem(last=False)

    def recent(self, parts: tuple[str, ...]) -> bool:
        with self._lock:
            when = self._when.get(parts)
        return when is not None and time.monotonic() - when < _SECONDS

    def discard(self, parts: tuple[str, ...]) -> None:
        with self._lock:
            self._when.pop(parts, None)


class VanishedFolder(DAVCollection):  # type: ignore[misc]
    """What a DELETE of a vanished folder finds: an empty folder, whose delete succeeds."""

    def __init__(self, path: str, environ: dict[str, object], parts: tuple[str, ...], folders: VanishedFolders) -> None:
        super().__init__(path, environ)
        self._parts, self._folders = parts, folders

    def get_member_names(self) -> list[str]:
        return []

    def support_recursive_delete(self) -> bool:
        return True

    def delete(self) -> None:
        self._folders.discard(self._parts)

    def handle_delete(self) -> bool:
        self.delete()
        return True
