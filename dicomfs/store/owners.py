"""Which processes are writing to a store, and cleaning up after the ones that died.

Every process that writes holds an exclusive ``flock`` on ``owners/<token>.lock`` for as long as
its Store is open. Before it writes a blob that the index does not reference yet, or right after
a commit leaves one unreferenced, it records ``(token, blob)`` in the index's ``pending`` table.
If the process is killed, the lock goes with it; ``recover`` finds the pending entries whose owner
holds no lock any more and deletes those blobs. So a kill at any moment leaves no stray blob.

``flock`` belongs to the open file, not to a descriptor: the worker processes of a bulk ingest
inherit the lock's descriptor (see ``bulk``), and the owner stays alive until all of them are gone.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path

from dicomfs.errors import StoreFullError
from dicomfs.store.blobs import BlobStore
from dicomfs.store.index import Index

__all__ = ["Owner", "recover"]


class Owner:
    """This process's claim on the store: a token and the lock that proves it is alive."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_bytes(16)
        self.lock_path = folder / f"{self.token.hex()}.lock"
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @property
    def lock_fd(self) -> int:
        """The descriptor that holds the lock, for processes that write on this owner's behalf."""
        return self._fd

    def release(self) -> None:
        if self._fd >= 0:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


def _alive(folder: Path, token: bytes) -> bool:
    path = folder / f"{token.hex()}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def recover(index: Index, blobs: BlobStore, owners_folder: Path) -> int:
    """Delete the unreferenced blobs that dead writers left pending; return how many entries went."""
    with index.read() as txn:
        pending = list(index.pending(txn))
    dead = {owner for owner in {o for o, _ in pending} if not _alive(owners_folder, owner)}
    leftovers = [(owner, blob) for owner, blob in pending if owner in dead]
    if not leftovers:
        _remove_stale_locks(owners_folder)
        return 0
    for _, blob in leftovers:
        blobs.remove(blob)
    try:
        with index.write() as txn:
            for owner, blob in leftovers:
                index.remove_pending(txn, owner, blob)
    except StoreFullError:
        return 0  # the blobs are gone; their marks go at a later open, once the index has room
    _remove_stale_locks(owners_folder)
    return len(leftovers)


def _remove_stale_locks(folder: Path) -> None:
    """Lock files of dead owners are only clutter once their pending blobs are gone."""
    if not folder.exists():
        return
    for entry in os.scandir(folder):
        name = entry.name
        if name.endswith(".lock") and len(name) == 37:
            if not _alive(folder, bytes.fromhex(name[:32])):
                Path(entry.path).unlink(missing_ok=True)
