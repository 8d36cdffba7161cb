"""Dead WebDAV properties, kept in the store folder in an LMDB environment of their own.

Clients write properties the bridge has no meaning for: Windows Explorer sets its Win32 times and
attributes on every file it copies in, litmus and other clients set arbitrary ones with PROPPATCH.
RFC 4918 expects them kept, across restarts too; wsgidav keeps them in memory (lost) or in a
shelve (one writer, slow). Here each property is one LMDB record, ``<url>\\0<name>``, so a folder's
properties are one range scan and several processes can share them safely.

The environment is separate from the store's index: the index's format and its check stay about
DICOM, and a damaged property file can be deleted without touching stored data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import lmdb

__all__ = ["StorePropertyManager"]

_MAP_SIZE = 1 << 30  # address space only: the file grows with what is written
_SEPARATOR = b"\0"


class StorePropertyManager:
    """wsgidav's property-manager interface (``property_manager`` in its configuration) over LMDB."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(folder), map_size=_MAP_SIZE, max_dbs=0, subdir=True, lock=True)

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
        if dry_run:
            return
        value = property_value.encode("utf-8") if isinstance(property_value, str) else bytes(property_value)
        with self._env.begin(write=True) as txn:
            txn.put(_key(norm_url, name), value)

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
