"""The peer transfer endpoints under ``/transfers/``, beside the WebDAV tree (``docs/transfers.md``).

A thin HTTP layer: it authenticates (Basic, a user with the ``transfer`` right; anyone when no
users are configured, as for WebDAV), reads and writes JSON and buckets, undoes gzip, and hands
the work to ``dicomfs.transfers`` (``Receiver`` for what a peer pushes, ``Outbox`` for what a
peer pulls). Every other path goes on to the WebDAV application.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

from bridge.auth import REALM, Credentials, MalformedCredentialsError, basic_credentials
from dicomfs import __version__
from dicomfs.config import RIGHTS
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.store import Store
from dicomfs.transfers.protocol import BUCKET_TYPE, GZIP_LEVEL, VERSION, Piece, Wanted, decode_bucket
from dicomfs.transfers.receiving import Receiver
from dicomfs.transfers.sending import Outbox

__all__ = ["PREFIX", "TransferRoutes"]

PREFIX = "/transfers"
_log = logging.getLogger("dicomfs.transfers")
_MAX_JSON = 64 << 20
_MAX_BUCKET = 128 << 20
"""Twice the largest bucket_size a peer may configure, manifest included."""
_READ_STEP = 1 << 20

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Refusal(Exception):
    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, list(headers)


class TransferRoutes:
    """A WSGI application: ``/transfers/...`` here, everything else to ``webdav``."""

    def __init__(self, webdav: WsgiApp, store: Store, credentials: Credentials, *, writable: bool,
                 path_lookup: Callable[[Sequence[str]], str | None]) -> None:
        self.webdav, self.store, self.credentials, self.writable = webdav, store, credentials, writable
        self.path_lookup = path_lookup
        self.receiver = Receiver(store)
        self.outbox = Outbox(store)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return self.webdav(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            user = self._authenticate(environ)
            status, headers, body = self._dispatch(method, path[len(PREFIX):].strip("/"), environ, user)
        except _Refusal as refusal:
            status, headers, body = refusal.status, refusal.headers, _error_body(str(refusal))
        except (ValueError, TypeError, KeyError) as error:  # JSON of the wrong shape
            status, headers, body = 400, [], _error_body(f"malformed request: {error}")
        except DicomfsError as error:
            status, headers, body = error.http_status, [], _error_body(str(error))
            if status >= 500:
                _log.error("%s %s: %s", method, path, error)
        except Exception:
            _log.exception("%s %s failed", method, path)
            status, headers, body = 500, [], _error_body("internal error; the server log says more")
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        start_response(f"{status} {HTTPStatus(status).phrase}", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    # -- who --------------------------------------------------------------------------------------

    def _authenticate(self, environ: dict[str, Any]) -> str:
        """The user name ("" when no users are configured); _Refusal 401 or 403 otherwise."""
        if not self.credentials.users:
            return ""
        challenge = [("WWW-Authenticate", f'Basic realm="{REALM}"')]
        try:
            given = basic_credentials(environ.get("HTTP_AUTHORIZATION"))
        except MalformedCredentialsError as error:
            raise _Refusal(401, str(error), challenge) from None
        if given is None:
            raise _Refusal(401, "credentials needed (HTTP Basic)", challenge)
        name, password = given
        user = self.credentials.check(name, password)
        if user is None:
            raise _Refusal(401, "wrong user name or password", challenge)
        if "transfer" not in user.rights:
            raise _Refusal(403, f"user {name!r} lacks the 'transfer' right (has: {', '.join(sorted(user.rights)) or 'none'})")
        return name

    # -- what -------------------------------------------------------------------------------------

    def _dispatch(self, method: str, route: str, environ: dict[str, Any],
                  user: str) -> tuple[int, list[tuple[str, str]], bytes]:
        parts = route.split("/") if route else []
        if method == "GET" and not parts:
            return _json({"protocol": VERSION, "dicomfs": __version__, "writable": self.writable,
                          "rights": list(RIGHTS)})
        if method == "GET" and len(parts) == 3 and parts[0] == "plans" and parts[2].isdigit():
            return self._bucket(parts[1], int(parts[2]), environ)
        if method != "POST" or len(parts) != 1:
            raise _Refusal(404 if method in ("GET", "POST") else 405, f"no {method} /transfers/{route}")
        if parts[0] == "buckets":
            return self._receive(environ, user)
        request = _json_body(environ)
        if parts[0] == "lookup":
            wanted = [Wanted(str(i), str(h), int(s)) for i, h, s in _list(request, "instances")]
            return _json(self.receiver.lookup(wanted).as_json())
        if parts[0] == "resolve":
            found = self.store.instances_of(self._resource_selector(str(s)) for s in _list(request, "selectors"))
            return _json({"instances": [[r.id, r.sha256, r.size] for r in found]})
        if parts[0] == "manifest":
            here, gone = self.outbox.manifest([str(i) for i in _list(request, "ids")])
            return _json({"instances": [[w.id, w.sha256, w.size] for w in here], "gone": gone})
        if parts[0] == "plans":
            buckets = [[Piece(str(i), str(h), int(s), int(o), int(n)) for i, h, s, o, n in bucket]
                       for bucket in _list(request, "buckets")]
            return _json({"plan": self.outbox.register(buckets), "buckets": len(buckets)})
        raise _Refusal(404, f"no POST /transfers/{route}")

    def _resource_selector(self, selector: str) -> str:
        """A selector for ``Store.resolve``: a path of the tree (``by-patients/P1 - DOE^J``) becomes
        the id of the resource it shows; ids, UIDs and PatientIDs stay as they are."""
        parts = [part for part in selector.split("/") if part]
        if len(parts) < 2:
            return selector
        resource_id = self.path_lookup(parts)
        if resource_id is None:
            raise NotFoundError(f"{selector!r} is not a patient, study, series or instance of the tree")
        return resource_id

    def _receive(self, environ: dict[str, Any], user: str) -> tuple[int, list[tuple[str, str]], bytes]:
        if not self.writable:
            raise _Refusal(403, "this dicomfs is read-only: it cannot receive")
        body = _read_body(environ, _MAX_BUCKET)
        encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
        if encoding == "gzip":
            body = _gunzip(body, _MAX_BUCKET)
        elif encoding not in ("", "identity"):
            raise _Refusal(415, f"Content-Encoding {encoding!r} is not understood (gzip or identity)")
        remote = f"{user or 'anonymous'}@{environ.get('REMOTE_ADDR', '?')}"
        received = self.receiver.receive(decode_bucket(body), remote=remote)
        _log.info("received from %s: %d instances stored, %d failed, %d damaged, %d in part (%d bytes)", remote,
                  len(received.stored), len(received.failed), len(received.damaged), len(received.partial), len(body))
        return _json(received.as_json())

    def _bucket(self, plan: str, number: int, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
        bucket = self.outbox.bucket(plan, number)
        headers = [("Content-Type", BUCKET_TYPE), ("Vary", "Accept-Encoding")]
        if _accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", "")):
            bucket = gzip.compress(bucket, GZIP_LEVEL, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, bucket


def _json(value: object) -> tuple[int, list[tuple[str, str]], bytes]:
    return 200, [("Content-Type", "application/json")], json.dumps(value, separators=(",", ":")).encode()


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        raise _Refusal(400, "Content-Length is not a number") from None
    if length > limit:
        raise _Refusal(413, f"a body of {length} bytes is over the limit of {limit}")
    stream = environ["wsgi.input"]
    if length >= 0:
        chunks, left = [], length
        while left:
            chunk = stream.read(min(left, _READ_STEP))
            if not chunk:
                raise _Refusal(400, f"the body ended {left} bytes short of its Content-Length")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    data = stream.read(limit + 1)  # chunked: cheroot ends the stream at the last chunk
    if len(data) > limit:
        raise _Refusal(413, f"a body over the limit of {limit} bytes")
    return bytes(data)


def _json_body(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(_read_body(environ, _MAX_JSON))
    except ValueError:
        raise _Refusal(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise _Refusal(400, "the body must be a JSON object")
    return value


def _list(request: dict[str, Any], key: str) -> list[Any]:
    value = request.get(key)
    if not isinstance(value, list):
        raise _Refusal(400, f"the body needs a list {key!r}")
    return value


def _gunzip(body: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise _Refusal(400, f"the gzip body is damaged: {error}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise _Refusal(413, f"the body inflates beyond the limit of {limit} bytes")
    if not inflater.eof:
        raise _Refusal(400, "the gzip body is cut short")
    return data


def _accepts_gzip(header: str) -> bool:
    for token in header.split(","):
        name, _, params = token.strip().partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
