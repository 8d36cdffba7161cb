"""Checking what a peer sends, in either direction: JSON bodies, bucket manifests and answers.

Pure: no store, no HTTP. Every request the ``/transfers/`` endpoints take and every answer a
transfer job gets from a peer goes through here before any of it is used, so each value is of
the one type and range the protocol allows, and each list is bounded. Above all, an instance id
and a SHA-256 are the only strings of a peer that ever become part of a file name (the chunks of
``<store>/transfers/partial/``), and only once they match the exact format of a dicomfs id and
of a SHA-256 hex digest, which hold no ``/`` and no ``.``.

An error is a :class:`ManifestError` (HTTP 400) saying what is wrong and where, or a
:class:`TooLargeError` (413) for a count or a size over its limit; the messages never repeat
more than a few characters of what was sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from typing import Any

from dicomfs.errors import DicomfsError
from dicomfs.store.ids import looks_like_id
from dicomfs.transfers.pieces import Piece, Wanted

__all__ = ["MAX_BUCKET_CONTENT", "MAX_BUCKET_PIECES", "MAX_INSTANCES", "MAX_INSTANCE_SIZE", "MAX_JSON_BODY",
           "MAX_PLAN_PIECES", "ManifestError", "TooLargeError", "bucket_manifest", "is_instance_id", "is_sha256",
           "lookup_answer",
           "lookup_request", "manifest_answer", "manifest_request", "parse_json", "plan_name", "plan_request",
           "received_answer", "resolve_answer", "resolve_request"]

MAX_JSON_BODY = 16 << 20
"""A JSON request: a lookup or a plan of MAX_INSTANCES rows is ~13 MB."""
MAX_INSTANCES = 100_000
"""Instances in one lookup or manifest request: the largest ``lookup_batch`` a peer may configure."""
MAX_SELECTORS = 10_000
MAX_SELECTOR_LENGTH = 4096
"""A selector is a UID, a PatientID, an id or a tree path: a few hundred characters at most."""
MAX_INSTANCE_SIZE = 1 << 40
"""1 TiB, far above any DICOM object (a whole-slide image is a few GiB); bounds the sparse chunk
file a peer can make a receiver create."""
MAX_PIECE_LENGTH = 64 << 20
"""The largest ``bucket_size``: a chunk is never longer."""
MAX_BUCKET_CONTENT = 64 << 20
"""A bucket's pieces together: ``plan_buckets`` fills a bucket up to ``bucket_size`` (at most 64 MiB)."""
MAX_BUCKET_PIECES = 10_000
"""Pieces in one bucket: ``plan_buckets`` closes a bucket at this many, so its manifest stays ~1.3 MB."""
MAX_PLAN_PIECES = 100_000
"""Pieces in one pull plan (a stored plan is then ~13 MB); a puller plans a step up to this many."""
MAX_RANGES = 100_000
"""Received ranges of one instance in an answer: more than any real receiver holds apart."""
MAX_REASON = 1000
"""Characters kept of a reason a peer gives (for the job's error, which a person reads)."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID_LENGTH = 44
"""Five groups of eight hex digits and four dashes; checked as well as ``looks_like_id``'s
pattern because its ``$`` also matches before a final newline."""


class ManifestError(DicomfsError):
    """A transfer request or a peer's answer that is malformed: not JSON, a wrong type, a value out of range."""

    http_status = 400


class TooLargeError(ManifestError):
    """A transfer request or answer over one of the protocol's size or count limits."""

    http_status = 413


def parse_json(data: bytes | bytearray | memoryview) -> Any:
    """The JSON value of ``data``: UTF-8, no NaN or Infinity, no fractions (the protocol has
    none), nested only as deep as Python's recursion limit allows; ManifestError otherwise."""
    try:
        return json.loads(bytes(data), parse_constant=_no_constant, parse_float=_no_float)
    except RecursionError:
        raise ManifestError("the JSON is nested too deeply") from None
    except UnicodeDecodeError:
        raise ManifestError("the JSON is not UTF-8") from None
    except ValueError as error:  # json.JSONDecodeError, and integers of more than 4300 digits
        raise ManifestError(f"not JSON: {str(error)[:200]}") from None


def _no_constant(name: str) -> Any:
    raise ManifestError(f"{name} is not a number the transfer protocol allows")


def _no_float(text: str) -> Any:
    raise ManifestError(f"{text[:40]} is not an integer (the transfer protocol has no fractions)")


# -- requests (the endpoints) ---------------------------------------------------------------------


def lookup_request(value: object) -> list[Wanted]:
    """``{"instances": [[id, sha256, size], ...]}``."""
    return _wanted_rows(_list(_only_key(value, "instances"), "instances", MAX_INSTANCES), "instances")


def manifest_request(value: object) -> list[str]:
    """``{"ids": [id, ...]}``."""
    rows = _list(_only_key(value, "ids"), "ids", MAX_INSTANCES)
    return [_instance_id(row, f"ids[{n}]") for n, row in enumerate(rows)]


def resolve_request(value: object) -> list[str]:
    """``{"selectors": [text, ...]}``: free text, looked up in the index and the tree, never a path on disk."""
    rows = _list(_only_key(value, "selectors"), "selectors", MAX_SELECTORS)
    for n, row in enumerate(rows):
        if not isinstance(row, str) or not row or len(row) > MAX_SELECTOR_LENGTH or "\x00" in row:
            raise ManifestError(f"selectors[{n}]: a selector is a non-empty string of at most "
                                f"{MAX_SELECTOR_LENGTH} characters, not {_show(row)}")
    return rows


def plan_request(value: object) -> list[list[Piece]]:
    """``{"buckets": [[[id, sha256, size, offset, length], ...], ...]}``: at most MAX_PLAN_PIECES
    pieces in all, each bucket a valid bucket manifest."""
    buckets = _list(_only_key(value, "buckets"), "buckets", MAX_PLAN_PIECES)
    plan, count = [], 0
    for n, bucket in enumerate(buckets):
        pieces = _pieces(bucket, f"buckets[{n}]")
        if not pieces:
            raise ManifestError(f"buckets[{n}] is empty")
        count += len(pieces)
        if count > MAX_PLAN_PIECES:
            raise TooLargeError(f"a plan of more than {MAX_PLAN_PIECES} pieces: register it in parts")
        plan.append(pieces)
    return plan


def bucket_manifest(value: object) -> list[Piece]:
    """A bucket's manifest, ``[[id, sha256, size, offset, length], ...]``: at most
    MAX_BUCKET_PIECES pieces of at most MAX_BUCKET_CONTENT bytes together."""
    return _pieces(value, "the bucket's manifest")


# -- answers (the jobs) -----------------------------------------------------------------------------


def resolve_answer(value: object) -> list[Wanted]:
    """``{"instances": [[id, sha256, size], ...]}``, as many as the selection holds."""
    return _wanted_rows(_list(_key(value, "instances"), "instances", None), "instances")


def manifest_answer(value: object, asked: Sequence[str]) -> tuple[list[Wanted], list[str]]:
    """``{"instances": [[id, sha256, size], ...], "gone": [id, ...]}``, every id one of ``asked``."""
    allowed = set(asked)
    here = _wanted_rows(_list(_key(value, "instances"), "instances", len(asked)), "instances")
    gone = [_instance_id(row, f"gone[{n}]") for n, row in enumerate(_list(_key(value, "gone"), "gone", len(asked)))]
    _only_asked([w.id for w in here] + gone, allowed)
    return here, gone


def lookup_answer(value: object, asked: Sequence[Wanted]) -> tuple[set[str], dict[str, list[tuple[int, int]]]]:
    """``{"have": [id, ...], "partial": {id: [[start, end], ...]}}``: ids among ``asked``, each range
    within its instance's size."""
    sizes = {w.id: w.size for w in asked}
    have = {_instance_id(row, f"have[{n}]") for n, row in enumerate(_list(_key(value, "have"), "have", len(asked)))}
    partial = _key(value, "partial")
    if not isinstance(partial, dict) or len(partial) > len(asked):
        raise ManifestError(f"'partial' must be an object of at most {len(asked)} ids, not {_show(partial)}")
    _only_asked([*have, *partial], set(sizes))
    return have, {item: _ranges(ranges, sizes[item], f"partial[{item}]") for item, ranges in partial.items()}


def received_answer(value: object, sent: Collection[str]) -> dict[str, Any]:
    """A receiver's answer to a bucket, its ids among ``sent`` (the bucket's); reasons kept short."""
    allowed = set(sent)
    stored = [_instance_id(row, f"stored[{n}]") for n, row in
              enumerate(_list(_key(value, "stored"), "stored", len(allowed)))]
    damaged = [_instance_id(row, f"damaged[{n}]") for n, row in
               enumerate(_list(_key(value, "damaged"), "damaged", len(allowed)))]
    failed, later = _reasons(_key(value, "failed"), "failed"), _reasons(_key(value, "later", {}), "later")
    partial = _key(value, "partial", {})
    if not isinstance(partial, dict):
        raise ManifestError(f"'partial' must be an object, not {_show(partial)}")
    _only_asked([*stored, *damaged, *failed, *later, *partial], allowed)
    return {"stored": stored, "failed": failed, "damaged": damaged, "later": later, "partial": dict(partial)}


def plan_name(value: object) -> str:
    """``{"plan": name, ...}``: a name is the SHA-256 of the plan."""
    name = _key(value, "plan")
    if not is_sha256(name):
        raise ManifestError(f"a plan's name is 64 hex digits, not {_show(name)}")
    return str(name)


# -- the parts --------------------------------------------------------------------------------------


def _only_key(value: object, key: str) -> object:
    if not isinstance(value, dict):
        raise ManifestError(f"the body must be a JSON object with {key!r}, not {_show(value)}")
    if set(value) != {key}:
        others = sorted(set(value) - {key})
        raise ManifestError(f"unknown key {others[0][:40]!r}" if others else f"the body needs a list {key!r}")
    return value[key]


_MISSING = object()


def _key(value: object, key: str, default: object = _MISSING) -> object:
    """A key of an answer object (others are ignored: a newer peer may add some)."""
    if not isinstance(value, dict):
        raise ManifestError(f"the answer must be a JSON object, not {_show(value)}")
    found = value.get(key, default)
    if found is _MISSING:
        raise ManifestError(f"the answer lacks {key!r}")
    return found


def _list(value: object, where: str, limit: int | None) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{where} must be a list, not {_show(value)}")
    if limit is not None and len(value) > limit:
        raise TooLargeError(f"{where}: {len(value)} entries, over the limit of {limit}")
    return value


def is_instance_id(value: object) -> bool:
    """Whether ``value`` is an id in dicomfs's own format (hex digits and dashes only)."""
    return isinstance(value, str) and len(value) == _ID_LENGTH and looks_like_id(value)


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a SHA-256 as 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _instance_id(value: object, where: str) -> str:
    if is_instance_id(value):
        return str(value)
    raise ManifestError(f"{where}: an instance id is five groups of eight lowercase hex digits joined by '-', "
                        f"not {_show(value)}")


def _sha256(value: object, where: str) -> str:
    if is_sha256(value):
        return str(value)
    raise ManifestError(f"{where}: a SHA-256 is 64 lowercase hex digits, not {_show(value)}")


def _integer(value: object, where: str, what: str, high: int) -> int:
    # bool is an int to Python, not to the protocol.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high:
        return value
    raise ManifestError(f"{where}: {what} must be an integer from 0 to {high}, not {_show(value)}")


def _wanted_rows(rows: list[Any], where: str) -> list[Wanted]:
    found = []
    for n, row in enumerate(rows):
        # The common case in one expression; the checks that say what is wrong only on failure
        # (formatting ``where`` for each of 100,000 rows would take most of a lookup's time).
        if (type(row) is list and len(row) == 3 and is_instance_id(row[0]) and is_sha256(row[1])
                and type(row[2]) is int and 0 <= row[2] <= MAX_INSTANCE_SIZE):
            found.append(Wanted(row[0], row[1], row[2]))
        else:
            found.append(_wanted(row, f"{where}[{n}]"))
    return found


def _wanted(row: object, where: str) -> Wanted:
    if not isinstance(row, list) or len(row) != 3:
        raise ManifestError(f"{where}: an instance is [id, sha256, size], not {_show(row)}")
    return Wanted(_instance_id(row[0], where), _sha256(row[1], where), _integer(row[2], where, "size", MAX_INSTANCE_SIZE))


def _piece(row: object, where: str) -> Piece:
    if not isinstance(row, list) or len(row) != 5:
        raise ManifestError(f"{where}: a piece is [id, sha256, size, offset, length], not {_show(row)}")
    size = _integer(row[2], where, "size", MAX_INSTANCE_SIZE)
    offset = _integer(row[3], where, "offset", size)
    length = _integer(row[4], where, "length", min(MAX_PIECE_LENGTH, size - offset))
    if length == 0 and size != 0:
        raise ManifestError(f"{where}: a piece of 0 bytes of a {size}-byte instance")
    return Piece(_instance_id(row[0], where), _sha256(row[1], where), size, offset, length)


def _pieces(value: object, where: str) -> list[Piece]:
    rows = _list(value, where, MAX_BUCKET_PIECES)
    pieces = []
    for n, row in enumerate(rows):
        if (type(row) is list and len(row) == 5 and is_instance_id(row[0]) and is_sha256(row[1])
                and type(row[2]) is int and type(row[3]) is int and type(row[4]) is int
                and 0 <= row[3] and 0 < row[4] <= MAX_PIECE_LENGTH and row[3] + row[4] <= row[2] <= MAX_INSTANCE_SIZE):
            pieces.append(Piece(row[0], row[1], row[2], row[3], row[4]))  # as _wanted_rows: the common case
        else:
            pieces.append(_piece(row, f"{where}[{n}]"))
    content = sum(p.length for p in pieces)
    if content > MAX_BUCKET_CONTENT:
        raise TooLargeError(f"{where}: {content} bytes of pieces, over a bucket's limit of {MAX_BUCKET_CONTENT}")
    return pieces


def _ranges(value: object, size: int, where: str) -> list[tuple[int, int]]:
    found = []
    for n, row in enumerate(_list(value, where, MAX_RANGES)):
        if not isinstance(row, list) or len(row) != 2:
            raise ManifestError(f"{where}[{n}]: a range is [start, end], not {_show(row)}")
        start = _integer(row[0], f"{where}[{n}]", "start", size)
        end = _integer(row[1], f"{where}[{n}]", "end", size)
        if end <= start:
            raise ManifestError(f"{where}[{n}]: the range ends at {end}, not after its start {start}")
        found.append((start, end))
    return found


def _reasons(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where!r} must be an object of id: reason, not {_show(value)}")
    return {_instance_id(item, where): reason[:MAX_REASON] if isinstance(reason, str) else _show(reason)
            for item, reason in value.items()}


def _only_asked(ids: list[str], allowed: set[str]) -> None:
    for item in ids:
        if item not in allowed:
            raise ManifestError(f"the answer names {_show(item)}, which was not asked for")


def _show(value: object) -> str:
    """A value in a message: a few characters of a string, the type of anything else (a deeply
    nested list must never reach ``repr``)."""
    if isinstance(value, str):
        return repr(value[:48] + ("..." if len(value) > 48 else ""))
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a huge integer"
    return {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)

