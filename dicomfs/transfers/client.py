"""Talking to a peer's ``/transfers/`` endpoints over HTTP(S), with keep-alive connections.

Each thread keeps its own connection to the peer (the jobs send buckets from several threads);
a connection the peer closed while idle is reopened once, transparently. Failures come as two
errors the job engine understands: :class:`PeerUnreachableError` (transient: try again later)
and :class:`PeerRefusedError` (a person must act: wrong password, missing right, not a dicomfs).
The Authorization header never reaches a message.
"""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from dicomfs import __version__
from dicomfs.config import Peer
from dicomfs.errors import DicomfsError
from dicomfs.jobs.links import STALE_ERRORS, ThreadConnections, describe_failure, read_whole, tls_context
from dicomfs.jobs.runner import TransientJobError
from dicomfs.transfers.protocol import BUCKET_TYPE, GZIP_LEVEL, Piece, Wanted

__all__ = ["PeerClient", "PeerRefusedError", "PeerUnreachableError", "Sent"]

_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_ANSWER = 256 << 20


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

    def lookup(self, wanted: Sequence[Wanted]) -> dict[str, Any]:
        """Which of ``wanted`` the peer has, whole or in part (push)."""
        return self._json("POST", "/lookup", {"instances": [[w.id, w.sha256, w.size] for w in wanted]})

    def send_bucket(self, bucket: bytes, *, compress: bool) -> tuple[dict[str, Any], Sent]:
        """Push one bucket; the peer's answer (stored, failed, damaged, partial) and its bytes (the
        bucket's, manifest included, and the body's)."""
        body = gzip.compress(bucket, GZIP_LEVEL, mtime=0) if compress else bucket
        headers = {"Content-Type": BUCKET_TYPE}
        if compress:
            headers["Content-Encoding"] = "gzip"
        status, answer_headers, answer = self._request("POST", "/buckets", body, headers)
        return self._decoded_json(status, answer_headers, answer, "/buckets"), Sent(len(bucket), len(body))

    def resolve(self, selectors: Sequence[str]) -> list[Wanted]:
        """The instances ``selectors`` name on the peer (pull)."""
        answer = self._json("POST", "/resolve", {"selectors": list(selectors)})
        return [Wanted(i, h, int(s)) for i, h, s in answer["instances"]]

    def manifest(self, ids: Sequence[str]) -> tuple[list[Wanted], list[str]]:
        """(the SHA-256 and size of those of ``ids`` the peer still has; the ids it no longer has)."""
        answer = self._json("POST", "/manifest", {"ids": list(ids)})
        return [Wanted(i, h, int(s)) for i, h, s in answer["instances"]], list(answer["gone"])

    def register_plan(self, buckets: Sequence[Sequence[Piece]]) -> str:
        plan = [[[p.id, p.sha256, p.size, p.offset, p.length] for p in bucket] for bucket in buckets]
        return str(self._json("POST", "/plans", {"buckets": plan})["plan"])

    def fetch_bucket(self, plan: str, number: int, *, compress: bool) -> tuple[bytes, Sent]:
        """Bucket ``number`` of a registered plan (pull); its bytes and what it cost on the wire."""
        headers = {"Accept": BUCKET_TYPE, "Accept-Encoding": "gzip" if compress else "identity"}
        path = f"/plans/{quote(plan)}/{number}"
        status, answer_headers, body = self._request("GET", path, None, headers)
        if status != 200:
            raise self._status_error(status, body, path)
        if answer_headers.get("content-encoding", "").lower() == "gzip":
            try:
                data = gzip.decompress(body)
                return data, Sent(len(data), len(body))
            except (OSError, EOFError) as error:
                raise PeerUnreachableError(f"peer {self.peer.name}: bucket {number} arrived damaged ({error})") from None
        return body, Sent(len(body), len(body))

    # -- HTTP -----------------------------------------------------------------------------------

    def _json(self, method: str, path: str, payload: object) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        status, headers, answer = self._request(method, path, body, {"Content-Type": "application/json"})
        return self._decoded_json(status, headers, answer, path)

    def _decoded_json(self, status: int, headers: dict[str, str], body: bytes, path: str) -> dict[str, Any]:
        if status != 200:
            raise self._status_error(status, body, path)
        try:
            answer = json.loads(body)
        except ValueError:
            raise PeerRefusedError(f"peer {self.peer.name}: {self._url(path)} did not answer JSON: "
                                   "is it a dicomfs bridge?") from None
        if not isinstance(answer, dict):
            raise PeerRefusedError(f"peer {self.peer.name}: {self._url(path)} answered {type(answer).__name__}, not an object")
        return answer

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

    def _request(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        headers = {**headers, "User-Agent": f"dicomfs/{__version__}"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        for attempt in (1, 2):
            connection, reused = self._connections.get()
            try:
                connection.request(method, self._base + path, body=body, headers=headers)
                response = connection.getresponse()
                answer = read_whole(response, _MAX_ANSWER)
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
        answer = json.loads(body)
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return str(answer["error"])
    except ValueError:
        pass
    return body[:300].decode("utf-8", "replace").strip().replace("\n", " ")
