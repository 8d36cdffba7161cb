"""Talking to a peer's ``/transfers/`` endpoints over HTTP(S), with keep-alive connections.

Each thread keeps its own connection to the peer (the jobs send buckets from several threads);
a connection the peer closed while idle is reopened once, transparently. Failures come as two
errors the job engine understands: :class:`PeerUnreachableError` (transient: try again later)
and :class:`PeerRefusedError` (a person must act: wrong password, missing right, not a dicomfs,
or a peer whose answer is malformed). Every answer is checked (``validation``) before any of it
is used: a hostile peer cannot name a file here, nor make a job plan or inflate without bound.
The Authorization header never reaches a message.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from dicomfs import __version__
from dicomfs.config import Peer
from dicomfs.errors import DicomfsError
from dicomfs.jobs.links import STALE_ERRORS, ThreadConnections, describe_failure, read_whole, tls_context
from dicomfs.jobs.runner import TransientJobError
from dicomfs.transfers import validation
from dicomfs.transfers.inflating import GunzipReader
from dicomfs.transfers.protocol import BUCKET_TYPE, GZIP_LEVEL, Piece, Wanted, decode_bucket_from

__all__ = ["PeerClient", "PeerRefusedError", "PeerUnreachableError", "Sent"]

_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_ANSWER = 256 << 20
"""A resolve answer lists a whole selection: ~2 million instances."""
_MAX_BUCKET_ANSWER = 128 << 20
"""A bucket as fetched: as much as a bridge takes in a push."""
_T = TypeVar("_T")


class PeerUnreachableError(TransientJobError):
    """The peer could not be reached or answered "not now" (5xx, timeout): try again later."""


class PeerRefusedError(DicomfsError):
    """The peer refused the request for good: credentials, rights, or not a dicomfs transfer endpoint."""

    http_status = 502


class Sent:
    """What one bucket moved: ``content`` bytes of instances, ``wire`` bytes of HTTP body."""

    __slots__ = ("content", "wire")

    def __init__(self, content: int, wire: int) -> None:
        self.content, self.wire = content, wire


class PeerClient:
    """The transfer endpoints of one configured peer."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        parts = urlsplit(peer.url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port
        self._base = parts.path.rstrip("/") + "/transfers"
        self._authorization = peer.authorization()
        self._context = (tls_context(peer.tls_ca_file, verify=peer.tls_verify, verify_hostname=peer.tls_verify_hostname)
                         if self._https else None)
        self._connections = ThreadConnections(self._connect)

    # -- the protocol ---------------------------------------------------------------------------

    def lookup(self, wanted: Sequence[Wanted]) -> tuple[set[str], dict[str, list[tuple[int, int]]]]:
        """Which of ``wanted`` the peer has whole, and the ranges it holds of others (push)."""
        answer = self._json("POST", "/lookup", {"instances": [[w.id, w.sha256, w.size] for w in wanted]})
        return self._checked("/lookup", validation.lookup_answer, answer, wanted)

    def send_bucket(self, bucket: bytes, pieces: Sequence[Piece], *,
                    compress: bool) -> tuple[dict[str, Any], Sent]:
        """Push one bucket of ``pieces``; the peer's answer (stored, failed, damaged, later, partial:
        only ids of the bucket) and its bytes (the bucket's, manifest included, and the body's)."""
        body = gzip.compress(bucket, GZIP_LEVEL, mtime=0) if compress else bucket
        headers = {"Content-Type": BUCKET_TYPE}
        if compress:
            headers["Content-Encoding"] = "gzip"
        status, answer_headers, answer = self._request("POST", "/buckets", body, headers)
        received = self._checked("/buckets", validation.received_answer,
                                 self._decoded_json(status, answer_headers, answer, "/buckets"), {p.id for p in pieces})
        return received, Sent(len(bucket), len(body))

    def resolve(self, selectors: Sequence[str]) -> list[Wanted]:
        """The instances ``selectors`` name on the peer (pull)."""
        answer = self._json("POST", "/resolve", {"selectors": list(selectors)})
        return self._checked("/resolve", validation.resolve_answer, answer)

    def manifest(self, ids: Sequence[str]) -> tuple[list[Wanted], list[str]]:
        """(the SHA-256 and size of those of ``ids`` the peer still has; the ids it no longer has)."""
        answer = self._json("POST", "/manifest", {"ids": list(ids)})
        return self._checked("/manifest", validation.manifest_answer, answer, ids)

    def register_plan(self, buckets: Sequence[Sequence[Piece]]) -> str:
        plan = [[[p.id, p.sha256, p.size, p.offset, p.length] for p in bucket] for bucket in buckets]
        return self._checked("/plans", validation.plan_name, self._json("POST", "/plans", {"buckets": plan}))

    def fetch_bucket(self, plan: str, number: int, planned: Sequence[Piece], *,
                     compress: bool) -> tuple[list[tuple[Piece, memoryview]], Sent]:
        """Bucket ``number`` of a registered plan (pull), which must hold exactly the ``planned``
        pieces: its pieces and what it cost on the wire. A gzip body is inflated only as far as
        the bucket's manifest declares."""
        headers = {"Accept": BUCKET_TYPE, "Accept-Encoding": "gzip" if compress else "identity"}
        path = f"/plans/{quote(plan)}/{number}"
        status, answer_headers, body = self._request("GET", path, None, headers, limit=_MAX_BUCKET_ANSWER)
        if status == 404 and body.startswith(b'{"error"'):  # the peer forgot the plan (swept, or replaced)
            raise PeerUnreachableError(f"peer {self.peer.name}: {_error_text(body)}; planning again")
        if status != 200:
            raise self._status_error(status, body, path)
        read = io.BytesIO(body).read
        if answer_headers.get("content-encoding", "").lower() == "gzip":
            read = GunzipReader(read).read
        pieces = self._checked(path, decode_bucket_from, read)
        if [piece for piece, _ in pieces] != list(planned):
            raise PeerRefusedError(f"peer {self.peer.name}: bucket {number} of plan {plan} holds other pieces "
                                   "than the plan registered")
        return pieces, Sent(sum(p.length for p in planned), len(body))

    # -- HTTP -----------------------------------------------------------------------------------

    def _json(self, method: str, path: str, payload: object) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        status, headers, answer = self._request(method, path, body, {"Content-Type": "application/json"})
        return self._decoded_json(status, headers, answer, path)

    def _decoded_json(self, status: int, headers: dict[str, str], body: bytes, path: str) -> dict[str, Any]:
        if status != 200:
            raise self._status_error(status, body, path)
        try:
            answer = validation.parse_json(body)
        except validation.ManifestError as error:
            raise PeerRefusedError(f"peer {self.peer.name}: {self._url(path)} did not answer JSON ({error}): "
                                   "is it a dicomfs bridge?") from None
        if not isinstance(answer, dict):
            raise PeerRefusedError(f"peer {self.peer.name}: {self._url(path)} answered {type(answer).__name__}, not an object")
        return answer

    def _checked(self, path: str, check: Callable[..., _T], *args: Any) -> _T:
        """``check(*args)``: an answer of the peer checked; PeerRefusedError saying why when it is malformed."""
        try:
            return check(*args)
        except validation.ManifestError as error:
            raise PeerRefusedError(f"peer {self.peer.name}: {self._url(path)} answered something malformed: "
                                   f"{error}") from None

    def _status_error(self, status: int, body: bytes, path: str) -> DicomfsError:
        text = _error_text(body)
        where = f"peer {self.peer.name} ({self._url(path)})"
        if status == 401:
            return PeerRefusedError(f"{where}: the peer refused the credentials (401): check username and password "
                                    f"of [peers.{self.peer.name}]")
        if status == 403:
            return PeerRefusedError(f"{where}: forbidden (403): the peer's user needs the 'transfer' right. {text}")
        if status == 404:
            if body.startswith(b'{"error"'):  # the peer's own answer: a selector or plan it does not know
                return PeerRefusedError(f"peer {self.peer.name}: {text}")
            return PeerRefusedError(f"{where}: not found (404): is the url a dicomfs bridge? {text}")
        if status == 409:
            return PeerUnreachableError(f"{where}: the selection changed on the peer; planning again. {text}")
        if status in _TRANSIENT_STATUSES:
            return PeerUnreachableError(f"{where}: HTTP {status} {text}")
        return PeerRefusedError(f"{where}: HTTP {status} {text}")

    def _url(self, path: str) -> str:
        return f"{self.peer.url.rstrip('/')}/transfers{path}"

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.peer.timeout, context=self._context)
        return http.client.HTTPConnection(self._host, self._port, timeout=self.peer.timeout)

    def _request(self, method: str, path: str, body: bytes | None, headers: dict[str, str], *,
                 limit: int = _MAX_ANSWER) -> tuple[int, dict[str, str], bytes]:
        headers = {**headers, "User-Agent": f"dicomfs/{__version__}"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        for attempt in (1, 2):
            connection, reused = self._connections.get()
            try:
                connection.request(method, self._base + path, body=body, headers=headers)
                response = connection.getresponse()
                answer = read_whole(response, limit)
                if response.will_close:
                    self._connections.discard(connection)
                return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
            except STALE_ERRORS as error:
                self._connections.discard(connection)
                if reused and attempt == 1:  # the peer closed an idle keep-alive connection: once more, anew
                    continue
                raise self._transport_error(error, path) from None
            except (OSError, http.client.HTTPException) as error:
                self._connections.discard(connection)
                raise self._transport_error(error, path) from None
        raise AssertionError("unreachable")

    def _transport_error(self, error: BaseException, path: str) -> DicomfsError:
        transient, text = describe_failure(error, timeout=self.peer.timeout, host=self._host, server="the peer")
        where = f"peer {self.peer.name} ({self._url(path)})"
        return PeerUnreachableError(f"{where}: {text}") if transient else PeerRefusedError(f"{where}: {text}")

    def close(self) -> None:
        """Close every thread's connection (once none talks to the peer any more)."""
        self._connections.close()


def _error_text(body: bytes) -> str:
    """The peer's ``{"error": ...}`` message, or the start of whatever else it answered."""
    try:
        answer = validation.parse_json(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return str(answer["error"])[:validation.MAX_REASON]
    except validation.ManifestError:
        pass
    return body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
