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
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

from bridge.auth import REALM, Credentials, MalformedCredentialsError, basic_credentials
from dicomfs import __version__
from dicomfs.config import RIGHTS
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.store import Store
from dicomfs.transfers import validation
from dicomfs.transfers.inflating import GunzipReader
from dicomfs.transfers.protocol import BUCKET_TYPE, GZIP_LEVEL, VERSION, decode_bucket_from
from dicomfs.transfers.receiving import Receiver
from dicomfs.transfers.sending import Outbox

__all__ = ["PREFIX", "TransferRoutes"]

PREFIX = "/transfers"
_log = logging.getLogger("dicomfs.transfers")
_MAX_BUCKET = 128 << 20
"""The bytes of a bucket's body as sent: more than the largest bucket (64 MiB of pieces and a 4 MiB
manifest) takes, even gzip-compressed (incompressible data grows by 0.03%)."""
_READ_STEP = 1 << 20
_LINGER = 64 << 20
"""Bytes of a body over its limit still read (and dropped) before the 413, so the client, still
sending, gets the answer instead of a reset connection (nginx's lingering close, bounded)."""
_RETRY_AFTER = "60"
"""Seconds a peer told 429 (too many pull plans held) waits; plans are let go of within a day."""
_PLAN_NUMBER_DIGITS = 9

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
        except DicomfsError as error:
            status, headers, body = error.http_status, [], _error_body(str(error))
            if status == 429:
                headers.append(("Retry-After", _RETRY_AFTER))
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
        if method == "GET" and len(parts) == 3 and parts[0] == "plans" and _is_number(parts[2]):
            return self._bucket(parts[1], int(parts[2]), environ, user)
        if method != "POST" or len(parts) != 1:
            raise _Refusal(404 if method in ("GET", "POST") else 405, f"no {method} /transfers/{route}")
        if parts[0] == "buckets":
            return self._receive(environ, user)
        if parts[0] not in ("lookup", "resolve", "manifest", "plans"):
            raise _Refusal(404, f"no POST /transfers/{route}")
        request = validation.parse_json(_read_body(environ, validation.MAX_JSON_BODY))
        if parts[0] == "lookup":
            return _json(self.receiver.lookup(validation.lookup_request(request)).as_json())
        if parts[0] == "resolve":
            selectors = validation.resolve_request(request)
            found = self.store.instances_of(self._resource_selector(s) for s in selectors)
            return _json({"instances": [[r.id, r.sha256, r.size] for r in found]})
        if parts[0] == "manifest":
            here, gone = self.outbox.manifest(validation.manifest_request(request))
            return _json({"instances": [[w.id, w.sha256, w.size] for w in here], "gone": gone})
        buckets = validation.plan_request(request)
        return _json({"plan": self.outbox.register(buckets, owner=user), "buckets": len(buckets)})

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
        encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            raise _Refusal(415, f"Content-Encoding {encoding!r} is not understood (gzip or identity)")
        body = _Body(environ, _MAX_BUCKET)
        try:
            # Read as it is decoded: a gzip body inflates only as far as its manifest declares.
            pieces = decode_bucket_from(GunzipReader(body.read).read if encoding == "gzip" else body.read)
        except DicomfsError as error:
            if error.http_status != 413:  # cheroot closes the connection after a 413, unread
                body.drain()
            raise
        remote = f"{user or 'anonymous'}@{environ.get('REMOTE_ADDR', '?')}"
        received = self.receiver.receive(pieces, remote=remote)
        _log.info("received from %s: %d instances stored, %d failed, %d damaged, %d in part (%d bytes)", remote,
                  len(received.stored), len(received.failed), len(received.damaged), len(received.partial), body.count)
        return _json(received.as_json())

    def _bucket(self, plan: str, number: int, environ: dict[str, Any],
                user: str) -> tuple[int, list[tuple[str, str]], bytes]:
        bucket = self.outbox.bucket(plan, number, owner=user)
        headers = [("Content-Type", BUCKET_TYPE), ("Vary", "Accept-Encoding")]
        if _accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", "")):
            bucket = gzip.compress(bucket, GZIP_LEVEL, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, bucket


def _json(value: object) -> tuple[int, list[tuple[str, str]], bytes]:
    return 200, [("Content-Type", "application/json")], json.dumps(value, separators=(",", ":")).encode()


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _Body:
    """The request body, read in steps: 413 beyond ``limit`` bytes, 400 when it ends before its Content-Length."""

    def __init__(self, environ: dict[str, Any], limit: int) -> None:
        try:
            self.length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            raise _Refusal(400, "Content-Length is not a number") from None
        self.stream, self.limit, self.count = environ["wsgi.input"], limit, 0
        if self.length > limit:
            if self.length <= limit + _LINGER:
                self._drop(self.length)
            raise _Refusal(413, f"a body of {self.length} bytes is over the limit of {limit}")

    def read(self, size: int) -> bytes:
        if self.length >= 0:
            size = min(size, self.length - self.count)
            if size <= 0:
                return b""
        data = bytes(self.stream.read(min(size, self.limit + 1 - self.count)))
        self.count += len(data)
        if self.count > self.limit:  # chunked: cheroot ends the stream at the last chunk
            self._drop(_LINGER)
            raise _Refusal(413, f"a body over the limit of {self.limit} bytes")
        if not data and 0 <= self.count < self.length:
            raise _Refusal(400, f"the body ended {self.length - self.count} bytes short of its Content-Length")
        return data

    def drain(self) -> None:
        """Read what is left of a body answered early, in steps (cheroot would read it whole
        into memory to keep the connection)."""
        try:
            while self.read(_READ_STEP):
                pass
        except (_Refusal, OSError):
            pass

    def _drop(self, most: int) -> None:
        """Read and forget up to ``most`` bytes of the body, in steps."""
        try:
            while most > 0 and (chunk := self.stream.read(min(most, _READ_STEP))):
                most -= len(chunk)
        except OSError:  # the client went away: nobody to answer
            pass


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    body, chunks = _Body(environ, limit), []
    while chunk := body.read(_READ_STEP):
        chunks.append(chunk)
    return b"".join(chunks)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= _PLAN_NUMBER_DIGITS


def _accepts_gzip(header: str) -> bool:
    for token in header.split(","):
        name, _, params = token.strip().partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
