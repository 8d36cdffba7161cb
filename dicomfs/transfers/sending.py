"""The sending side of a transfer: buckets read from the store, and the plans pulling peers register.

Used by the push job (buckets it sends) and by the bridge's pull endpoints (buckets a peer
fetches). For pull, the fetching side plans the buckets and registers the plan here; a plan is
named by the SHA-256 of its content, so registering it again (after a restart of either side) is
harmless, and each bucket is then a plain ``GET`` a proxy or a cache can handle.

Plans are bounded: a plan holds at most ``MAX_PLAN_PIECES`` pieces (``validation``), a peer at
most ``MAX_PLANS_PER_PEER`` plans (registering one more forgets its least recently used one,
which it registers again should it still want it), and the bridge at most ``MAX_PLANS`` in all
(then it answers 429 until some are swept). A plan's file is named by the SHA-256 of the peer's
user name and of the plan, never by what the peer sent.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.store import Instance, Store
from dicomfs.transfers.protocol import Piece, Wanted, encode_bucket
from dicomfs.transfers.validation import is_sha256

__all__ = ["MAX_PLANS", "MAX_PLANS_PER_PEER", "Outbox", "StaleSelectionError", "TooManyPlansError", "read_bucket"]

MAX_PLANS_PER_PEER = 4
"""A pull job uses one plan at a time; a few more cover jobs running side by side and restarts."""
MAX_PLANS = 16
"""All peers together: at most ~200 MB of plans on disk (each at most ~13 MB)."""
_OWNER_DIGITS = 16


class StaleSelectionError(DicomfsError):
    """An instance of a plan changed (or was deleted) since the plan was made: plan again."""

    http_status = 409


class TooManyPlansError(DicomfsError):
    """The bridge holds as many pull plans as it keeps, for other peers: try again later."""

    http_status = 429


def read_bucket(store: Store, pieces: Sequence[Piece]) -> bytes:
    """A bucket of ``pieces`` read from the store; StaleSelectionError when an instance changed."""
    records = dict(zip((p.id for p in pieces), store.records([p.id for p in pieces]), strict=True))
    for piece in pieces:
        record = records[piece.id]
        if not isinstance(record, Instance) or record.sha256 != piece.sha256:
            raise StaleSelectionError(f"instance {piece.id} was changed or deleted since the transfer was planned")

    def read(piece: Piece) -> bytes:
        with store.open_instance(piece.id) as reader:
            return reader.read(piece.offset, piece.length)

    return encode_bucket(pieces, read)


class Outbox:
    """Plans registered by pulling peers, and the buckets they name (``<store>/transfers/plans``)."""

    def __init__(self, store: Store, folder: Path | None = None) -> None:
        self.store = store
        self.plans = (folder or store.folder / "transfers") / "plans"

    def manifest(self, ids: Sequence[str]) -> tuple[list[Wanted], list[str]]:
        """(what is here of ``ids``, with SHA-256 and size; the ids that are not here)."""
        here, gone = [], []
        for item, record in zip(ids, self.store.records(ids), strict=True):
            if isinstance(record, Instance):
                here.append(Wanted(record.id, record.sha256, record.size))
            else:
                gone.append(item)
        return here, gone

    def register(self, buckets: Sequence[Sequence[Piece]], *, owner: str = "") -> str:
        """Keep a plan for the peer logged in as ``owner`` ("" on a bridge without users); its name
        (the same for the same plan).
        The caller checked the plan (``validation.plan_request``)."""
        text = json.dumps([[[p.id, p.sha256, p.size, p.offset, p.length] for p in bucket] for bucket in buckets],
                          separators=(",", ":")).encode()
        name = hashlib.sha256(text).hexdigest()
        self.plans.mkdir(parents=True, exist_ok=True)
        path = self._path(name, owner)
        if path.exists():
            path.touch()
            return name
        held = sorted(self.plans.glob(f"{path.name[:_OWNER_DIGITS]}-*.json"), key=_last_used)
        for old in held[:max(0, len(held) - MAX_PLANS_PER_PEER + 1)]:  # the least recently used
            old.unlink(missing_ok=True)
        if sum(1 for _ in self.plans.glob("*.json")) >= MAX_PLANS:
            raise TooManyPlansError(f"this dicomfs holds {MAX_PLANS} pull plans for other peers, its limit: "
                                    "try again later")
        temporary = path.with_suffix(f".{time.monotonic_ns()}.tmp")
        temporary.write_bytes(text)
        temporary.replace(path)
        return name

    def bucket(self, plan: str, number: int, *, owner: str = "") -> bytes:
        """Bucket ``number`` of a plan ``owner`` registered, read from the store."""
        if not is_sha256(plan):
            raise NotFoundError(f"no transfer plan {plan[:80]!r}")
        path = self._path(plan, owner)
        try:
            rows = json.loads(path.read_bytes())
            path.touch()  # in use: not for the sweeper, nor the first to go for a newer plan
        except FileNotFoundError:
            raise NotFoundError(f"no transfer plan {plan} (expired, replaced by newer ones or never registered): "
                                "register it again") from None
        except ValueError as error:
            raise DicomfsError(f"transfer plan {plan} is damaged: {error}") from None
        if not 0 <= number < len(rows):
            raise NotFoundError(f"transfer plan {plan} has {len(rows)} buckets, not {number + 1}")
        return read_bucket(self.store, [Piece(*row) for row in rows[number]])

    def _path(self, plan: str, owner: str) -> Path:
        """The file of a plan: the owner's and the plan's digests, hex only (``plan`` was checked)."""
        return self.plans / f"{hashlib.sha256(owner.encode()).hexdigest()[:_OWNER_DIGITS]}-{plan}.json"

    def sweep(self, max_age: float) -> int:
        """Remove plans not used for ``max_age`` seconds; how many went."""
        removed, cutoff = 0, time.time() - max_age
        for path in self.plans.glob("*") if self.plans.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _last_used(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
