"""Numbers kept for resources on behalf of the views, so that a name once shown never changes.

The store gives them no meaning. A *context* is a short string the views choose (which folder,
which kind of name), a number a small unsigned integer (``views.names`` says what it means). The
store promises only three things: the numbers of one context come with one range read, so a folder
listing that finds none pays a single cursor move; they are read and written in the index's
transactions, so every process over the store (a mount and a bridge) sees the same ones; and a
resource's numbers go in the transaction that deletes its record (``forget``, called by
``Index.delete_record``), so a resource stored again later starts afresh and nothing is left
behind.

Keys in the ``numbers`` table::

    b"c" + len(context)(1) + context + id(20) -> number (u32 BE)   one context's numbers: one range
    b"r" + id(20) + context                   -> b""               what ``forget`` deletes
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from dicomfs.store.ids import ResourceId, id_from_key, key_from_id

if TYPE_CHECKING:
    from dicomfs.store.index import Index, Txn

__all__ = ["MAX_CONTEXT_BYTES", "forget", "keep", "numbers"]

MAX_CONTEXT_BYTES = 200
"""A context is a view's name and a resource id or a date (~60 bytes); LMDB keys stop at 511."""
_NUMBER = struct.Struct(">I")
_BY_CONTEXT, _BY_RESOURCE = b"c", b"r"


def numbers(index: Index, txn: Txn, context: str) -> dict[ResourceId, int]:
    """The numbers kept in ``context``, by resource id (usually none: one cursor move)."""
    if index.numbers_db is None:  # an index written before numbers were kept, opened read-only
        return {}
    prefix = _context_prefix(context)
    cursor = txn.cursor(db=index.numbers_db)
    found: dict[ResourceId, int] = {}
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                break
            found[id_from_key(key[len(prefix):])] = _NUMBER.unpack(value)[0]
    return found


def keep(index: Index, txn: Txn, context: str, resource_id: str, number: int) -> None:
    """Keep ``number`` for ``resource_id`` in ``context`` (replacing what was kept there)."""
    assert index.numbers_db is not None, "a writable index has the numbers table"
    resource = key_from_id(resource_id)
    txn.put(_context_prefix(context) + resource, _NUMBER.pack(number), db=index.numbers_db)
    txn.put(_BY_RESOURCE + resource + context.encode(), b"", db=index.numbers_db)


def forget(index: Index, txn: Txn, resource_id: str) -> None:
    """Delete every number kept for ``resource_id`` (its record is being deleted)."""
    if index.numbers_db is None:
        return
    prefix = _BY_RESOURCE + key_from_id(resource_id)
    cursor = txn.cursor(db=index.numbers_db)
    contexts = []
    if cursor.set_range(prefix):
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            contexts.append(key[len(prefix):].decode())
    for context in contexts:
        txn.delete(prefix + context.encode(), db=index.numbers_db)
        txn.delete(_context_prefix(context) + key_from_id(resource_id), db=index.numbers_db)


def _context_prefix(context: str) -> bytes:
    encoded = context.encode()
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise ValueError(f"a numbering context of {len(encoded)} bytes (at most {MAX_CONTEXT_BYTES})")
    return _BY_CONTEXT + bytes([len(encoded)]) + encoded
