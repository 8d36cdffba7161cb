"""Dead WebDAV properties, kept in the store folder in an LMDB environment of their own.

Clients write properties the bridge has no meaning for: Windows Explorer sets its Win32 times and
attributes on every file it copies in, litmus and other clients set arbitrary ones with PROPPATCH.
RFC 4918 expects them kept, across restarts too; wsgidav keeps them in memory (lost) or in a
shelve (one writer, slow). Here each property is one LMDB record, ``<url>\\0<name>``, so a folder's
properties are one range scan and several processes can share them safely.

The environment is separate from the store's index: the index's format and its check stay about
DICOM, and a damaged property file can be deleted without touching stored data.

What a client may keep is bounded (``PropertyLimits``: a value, a count and a total per resource);
past a bound the property is refused with 507 Insufficient Storage inside the PROPPATCH's 207, as
RFC 4918 (9.2.1) has it, and nothing of that PROPPATCH is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb
from wsgidav.dav_error import HTTP_INSUFFICIENT_STORAGE, DAVError

__all__ = ["PropertyLimits", "StorePropertyManager"]

_MAP_SIZE = 1 << 30  # address space only: the file grows with what is written
_SEPARATOR = b"\0"


@dataclass(frozen=True)
class PropertyLimits:
    """What one resource may keep (``webdav.dead_property_*`` in the configuration)."""

    value_bytes: int = 64 << 10
    count: int = 100
    total_bytes: int = 256 << 10


class StorePropertyManager:
    """wsgidav's property-manager interface (``property_manager`` in its configuration) over LMDB."""

    def __init__(self, folder: Path, limits: PropertyLimits = PropertyLimits()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(folder), map_size=_MAP_SIZE, max_dbs=0, subdir=True, lock=True)
        self.limits = limits

    def __repr__(self) -> str:
        return f"StorePropertyManager({self._env.path()})"

    def close(self) -> None:
        self._env.close()

    # -- the interface wsgidav calls -----------------------------------------------------------------

    def get_properties(self, norm_url: str, environ: dict[str, object] | None = None) -> list[str]:
        with self._env.begin() as txn:
            return [name for name, _ in self._scan(txn, norm_url)]

    def get_property(self, norm_url: str, name: str, environ: dict[str, object] | None = None) -> bytes | None:
        with self._env.begin() as txn:
            value = txn.get(_key(norm_url, name))
        return bytes(value) if value is not None else None

    def write_property(self, norm_url: str, name: str, property_value: bytes | str, dry_run: bool = False,
                       environ: dict[str, object] | None = None) -> None:
        """Keep a property; DAVError 507 when the resource would keep more than its limits allow
        (checked in the dry run too, so a PROPPATCH over a limit writes nothing)."""
        value = property_value.encode("utf-8") if isinstance(property_value, str) else bytes(property_value)
        key = _key(norm_url, name)
        with self._env.begin(write=not dry_run) as txn:
            self._check_room(txn, norm_url, key, value)
            if not dry_run:
                try:
                    txn.put(key, value)
                except lmdb.MapFullError:
                    raise DAVError(HTTP_INSUFFICIENT_STORAGE, "the property store is full") from None

    def _check_room(self, txn: lmdb.Transaction, url: str, key: bytes, value: bytes) -> None:
        limits = self.limits
        if len(key) + len(value) > limits.value_bytes:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, f"a property may hold {limits.value_bytes} bytes at most")
        count, total = 1, len(key) + len(value)
        for name, kept in self._scan(txn, url):
            if _key(url, name) != key:  # a new value replaces the one kept under the same name
                count += 1
                total += len(_key(url, name)) + len(kept)
        if count > limits.count:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, f"a resource may keep {limits.count} properties at most")
        if total > limits.total_bytes:
            raise DAVError(HTTP_INSUFFICIENT_STORAGE, f"a resource may keep {limits.total_bytes} bytes of properties at most")

    def remove_property(self, norm_url: str, name: str, dry_run: bool = False,
                        environ: dict[str, object] | None = None) -> None:
        if dry_run:
            return
        with self._env.begin(write=True) as txn:
            txn.delete(_key(norm_url, name))

    def remove_properties(self, norm_url: str, environ: dict[str, object] | None = None) -> None:
        with self._env.begin(write=True) as txn:
            for name, _ in list(self._scan(txn, norm_url)):
                txn.delete(_key(norm_url, name))

    def remove_under(self, url: str) -> None:
        """Forget the properties of ``url`` and of everything below it (a folder removed, a file
        ingested): wsgidav removes only a deleted resource's own. Looked for first in a read
        transaction: most files have none, and a write transaction per ingested file would
        serialise the ingest on LMDB's writer lock."""
        if self.owners_under(url):
            with self._env.begin(write=True) as txn:
                for owner in self._urls_under(txn, url):
                    for name, _ in list(self._scan(txn, owner)):
                        txn.delete(_key(owner, name))

    def owners_under(self, url: str) -> list[str]:
        """``url`` and the URLs below it that have properties."""
        with self._env.begin() as txn:
            return self._urls_under(txn, url)

    def copy_properties(self, src_url: str, dest_url: str, environ: dict[str, object] | None = None) -> None:
        with self._env.begin(write=True) as txn:
            for name, value in list(self._scan(txn, src_url)):
                txn.put(_key(dest_url, name), value)

    def move_properties(self, src_url: str, dest_url: str, with_children: bool,
                        environ: dict[str, object] | None = None) -> None:
        with self._env.begin(write=True) as txn:
            urls = self._urls_under(txn, src_url) if with_children else [src_url]
            for url in urls:
                target = dest_url + url[len(src_url):]
                for name, value in list(self._scan(txn, url)):
                    txn.put(_key(target, name), value)
                    txn.delete(_key(url, name))

    # -- for the bridge's own PROPFIND ---------------------------------------------------------------

    def any_under(self, url: str) -> bool:
        """Whether ``url`` or any URL below it holds a property: one range scan, where asking each
        member of a 2,000-entry folder cost ~9 ms."""
        with self._env.begin() as txn:
            return next(self._owners_under(txn, url), None) is not None

    # -- scans -----------------------------------------------------------------------------------

    @staticmethod
    def _scan(txn: lmdb.Transaction, url: str) -> Iterator[tuple[str, bytes]]:
        prefix = url.encode("utf-8") + _SEPARATOR
        cursor = txn.cursor()
        if not cursor.set_range(prefix):
            return
        for raw_key, value in cursor:
            key = bytes(raw_key)
            if not key.startswith(prefix):
                return
            yield key[len(prefix):].decode("utf-8"), bytes(value)

    @staticmethod
    def _urls_under(txn: lmdb.Transaction, url: str) -> list[str]:
        """``url`` and the URLs below it that have properties (``/a`` covers ``/a/b``, not ``/ab``)."""
        found: list[str] = []
        for owner in StorePropertyManager._owners_under(txn, url):
            if not found or found[-1] != owner:
                found.append(owner)
        return found

    @staticmethod
    def _owners_under(txn: lmdb.Transaction, url: str) -> Iterator[str]:
        """The URL of each property at or below ``url``, in key order (one per property)."""
        base = url.rstrip("/")
        cursor = txn.cursor()
        if not cursor.set_range(base.encode("utf-8")):
            return
        for key in cursor.iternext(keys=True, values=False):
            owner = bytes(key).split(_SEPARATOR, 1)[0].decode("utf-8")
            if not owner.startswith(base):
                return
            if owner in (base, url) or owner.startswith(base + "/"):
                yield owner


def _key(url: str, name: str) -> bytes:
    return url.encode("utf-8") + _SEPARATOR + name.encode("utf-8")
