"""The XNAT export job: instances go to an XNAT server in zip batches, as CTP's HttpExportService does
with its ``xnat`` and ``compressor`` elements.

One step of a job::

    up to cache_size      zip, spooled into the      POST upload_url          2xx: the items are done
    pending instances ──► store folder; names from ──► application/zip ──┬──► 408, 429, 5xx, no connection:
    (one, unzipped, when  ``structure`` (zipnames)    + session cookie   │     nothing recorded, the job is
    cache_size = 0)                                   (+ Digest)         │     deferred and the batch goes again
                                                                         └──► other 4xx: the batch is quarantined,
                                                                               its items fail naming the file

The session (:class:`XnatSession`) logs in once at ``<url>/data/JSESSION`` with Basic credentials
and sends its cookie with every upload, so XNAT checks a password once per job rather than once
per batch; when XNAT has forgotten the session (401) it logs in again, once, and resends.

Errors::

    DicomfsError
    ├── TransientJobError (jobs.runner)
    │   └── XnatUnavailableError     no connection, a timeout, HTTP 408/429/5xx: the job is deferred
    └── XnatRefusedError             login refused, 401 right after a new login, a redirect, 404 or
        │                            405, an untrusted certificate: every batch would get the same
        │                            answer, so the job fails and its items stay pending
        └── XnatBatchRefusedError    any other 4xx: that batch is quarantined and the job goes on

Quarantine: a refused batch is kept as sent in ``<store>/exports/quarantine/<job id>/<n>.zip`` (``.dcm``
for a lone instance) beside ``<n>.json``, which lists its items and XNAT's answer. ``dicomfs jobs
retry`` makes the items pending again; they are packed anew (the configuration may have been fixed
since) and an entry is removed once none of its items is still failed by it: each was sent, refused
again (it is then in the newer entry) or failed for another reason.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from dicomfs import __version__
from dicomfs.config import XnatDestination
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.jobs.links import describe_failure
from dicomfs.jobs.model import QUEUED_UNDER, Job
from dicomfs.jobs.runner import JobWork, TransientJobError
from dicomfs.jobs.schedule import target_waiting
from dicomfs.jobs.stowrs import StowTarget, open_connection, read_answer, short_body, status_phrase
from dicomfs.jobs.zipnames import Structure, parse_structure, unique_names
from dicomfs.store import Instance, Store
from dicomfs.store.blobs import BlobReader

__all__ = ["Quarantine", "XnatBatchRefusedError", "XnatExporter", "XnatRefusedError", "XnatSession",
           "XnatUnavailableError"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# A body up to this size is built in memory; a larger one (100 CT slices are ~50 MiB) in a
# temporary file in the store folder, which has room for instances by construction.
_SPOOL_IN_MEMORY = 8 << 20
# After the connection broke while sending, how long to look for an answer the server sent first.
_EARLY_ANSWER_TIMEOUT = 5.0
# XNAT's answer in an item's reason: its message, not a whole HTML error page.
_ANSWER_CHARS = 200
# RFC 6265 cookie-octets: what may be sent back in a Cookie header as it came.
_COOKIE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]{1,4096}")
# A session id XNAT answered as text (CTP's only source of it): an id, not an HTML page.
_SESSION_ID = re.compile(r"[A-Za-z0-9._~+/=-]{1,512}")
_DELETED = "deleted from the store after the export was queued"


class XnatUnavailableError(TransientJobError):
    """XNAT could not be reached, timed out or said "not now" (408, 429, 5xx): try the batch again later."""

    http_status = 502


class XnatRefusedError(DicomfsError):
    """XNAT refused in a way every request would meet (credentials, a wrong URL, TLS): a person must act."""

    http_status = 502


class XnatBatchRefusedError(XnatRefusedError):
    """XNAT refused one batch for good (a 4xx but 401, 404 and 405); ``answer`` is where it went and what XNAT said."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.answer = answer


@dataclass(frozen=True)
class _Answer:
    status: int
    set_cookies: tuple[str, ...]
    location: str
    body: bytes

    def summary(self) -> str:
        head = f"HTTP {self.status} {status_phrase(self.status)}".rstrip()
        text = short_body(self.body, _ANSWER_CHARS)
        return f"{head}: {text}" if text else head


class XnatSession:
    """A logged-in session with one XNAT server, as CTP's ``xnat`` element keeps.

    Logs in at the first upload, sends the cookie named ``cookie_name`` with every upload, and logs
    in again, once, when an upload is answered 401. The password is read at each login and appears
    in no message; ``logins`` counts the logins made.
    """

    def __init__(self, destination: XnatDestination) -> None:
        self.destination = destination
        self.logins = 0
        self._cookie: str | None = None

    @property
    def login_url(self) -> str:
        return self.destination.url.rstrip("/") + "/data/JSESSION"

    def login(self) -> None:
        """Open a session; XnatRefusedError when XNAT refuses the credentials or gives no session,
        XnatUnavailableError when it cannot be reached, ConfigError when the password cannot be read."""
        destination = self.destination
        credentials = f"{destination.username}:{destination.password()}".encode("utf-8")
        self._cookie = None
        answer = _post(destination, self.login_url, {"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")})
        self.logins += 1
        who = f"the login of {destination.username!r} at {self.login_url}"
        if _transient(answer.status):
            raise XnatUnavailableError(f"XNAT did not answer {who}: {answer.summary()}")
        if not 200 <= answer.status < 300:
            raise XnatRefusedError(f"XNAT refused {who}: {answer.summary()}")
        self._cookie = _session_cookie(answer, destination.cookie_name)
        if self._cookie is None:
            raise XnatRefusedError(f"XNAT answered {who} with neither a {destination.cookie_name} cookie nor a session id")

    def upload(self, url: str, body: IO[bytes], content_type: str, headers: Mapping[str, str]) -> None:
        """POST ``body`` (all of it, from its start) to ``url`` in the session; returns once XNAT took it.

        Raises
        ------
        XnatBatchRefusedError
            XNAT refused this body for good (a 4xx but 401, 404 and 405).
        XnatRefusedError
            401 even right after a new login, a redirect, 404 or 405, TLS refused.
        XnatUnavailableError
            No connection, a timeout, HTTP 408, 429 or 5xx.
        """
        if self._cookie is None:
            self.login()
        answer = self._send(url, body, content_type, headers)
        if answer.status == 401:  # the session expired (or XNAT restarted): one new login, one resend
            log.info("XNAT %s: the session was refused, logging in again", url)
            self.login()
            answer = self._send(url, body, content_type, headers)
            if answer.status == 401:
                raise XnatRefusedError(f"XNAT {url} answered {answer.summary()} right after a new login of "
                                       f"{self.destination.username!r}: may that user import?")
        _check_upload(url, answer)

    def _send(self, url: str, body: IO[bytes], content_type: str, headers: Mapping[str, str]) -> _Answer:
        cookie = f"{self.destination.cookie_name}={self._cookie}"
        return _post(self.destination, url, {**headers, "Content-Type": content_type, "Cookie": cookie}, body)


class Quarantine:
    """The batches of one job that XNAT refused for good, kept as sent for a person to look at.

    ``<n>.zip`` (or ``<n>.dcm``) is the body sent; ``<n>.json`` lists its items and XNAT's answer. An
    item is in one entry at most, that of its latest refusal; an emptied entry and then an emptied
    folder are removed. Only the runner holding the job's lease touches its folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def keep(self, body: IO[bytes], suffix: str, items: Sequence[str], answer: str) -> Path:
        """Keep ``body`` with its items (which must have been settled first); the path of the copy."""
        self.folder.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(p.name.split(".")[0]) for p in self.folder.iterdir() if p.name.split(".")[0].isdigit()),
                         default=0)
        kept = self.folder / f"{number}{suffix}"
        _write_atomically(kept, body)
        listing = {"items": list(items), "answer": answer, "refused": time.time(), "file": kept.name}
        _write_atomically(self.folder / f"{number}.json", json.dumps(listing, indent=1).encode())
        return kept

    def settle(self, items: Iterable[str]) -> None:
        """These items have a newer outcome: take them out of every entry, removing emptied ones."""
        if not self.folder.is_dir():
            return
        settled = set(items)
        for path in sorted(self.folder.glob("*.json")):
            try:
                listing = json.loads(path.read_bytes())
                left = [item for item in listing["items"] if item not in settled]
            except (OSError, ValueError, KeyError, TypeError) as error:  # a damaged entry is left for a person
                log.warning("XNAT quarantine entry %s unreadable: %s", path, error)
                continue
            if len(left) == len(listing["items"]):
                continue
            if left:
                listing["items"] = left
                _write_atomically(path, json.dumps(listing, indent=1).encode())
                continue
            (self.folder / str(listing.get("file", ""))).unlink(missing_ok=True)
            path.unlink()
        with contextlib.suppress(OSError):  # not empty: entries remain
            self.folder.rmdir()


class _UnreadableInstanceError(DicomfsError):
    """An instance of the batch could not be read from the store; the batch is packed again without it."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(reason)
        self.item = item


class XnatExporter:
    """The executor of ``xnat-export`` jobs (see ``jobs.runner.Executor``)."""

    def __init__(self, store: Store, destinations: Mapping[str, XnatDestination],
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.store = store
        self.destinations = destinations
        self._clock = clock

    def waiting_for(self, job: Job) -> str | None:
        return target_waiting("destination", self.destinations, job.params.get("destination"), self._clock(),
                              job.params.get(QUEUED_UNDER))

    def run(self, job: Job, work: JobWork) -> None:
        destination = self.destinations[job.params["destination"]]
        structure = parse_structure(destination.structure)
        session = XnatSession(destination)
        quarantine = Quarantine(self.store.folder / "exports" / "quarantine" / job.id)
        while work.keep_going():
            batch = [item for item, _ in work.pending(destination.cache_size or 1)]
            if not batch:
                return
            self._step(destination, structure, session, quarantine, batch, work)

    def _step(self, destination: XnatDestination, structure: Structure, session: XnatSession, quarantine: Quarantine,
              batch: list[str], work: JobWork) -> None:
        """Send one batch and record its outcome; XnatUnavailableError (nothing recorded) to try it later."""
        present: list[tuple[str, Instance]] = []
        failed: list[tuple[str, str]] = []
        for item in batch:
            record = self.store.find(item)
            if isinstance(record, Instance):
                present.append((item, record))
            else:
                failed.append((item, _DELETED))
        body: IO[bytes] | None = None
        while present and body is None:
            try:
                body = self._pack(present, structure, destination)
            except _UnreadableInstanceError as error:
                failed.append((error.item, str(error)))
                present = [entry for entry in present if entry[0] != error.item]
        items = [item for item, _ in present]
        if body is None:
            quarantine.settle(batch)
            work.record(failed=failed)
            return
        zipped = destination.cache_size > 0
        with body:
            started = time.monotonic()
            try:
                session.upload(destination.upload_url, body, "application/zip" if zipped else "application/dicom",
                               _digest_header(body) if destination.send_digest_header else {})
            except XnatBatchRefusedError as refusal:
                quarantine.settle(batch)
                kept = quarantine.keep(body, ".zip" if zipped else ".dcm", items, refusal.answer)
                log.warning("XNAT %s refused %d instances (%s); kept in %s", destination.name, len(items), refusal, kept)
                reason = f"XNAT refused the batch ({refusal.answer}); it is kept in {kept}"
                work.record(failed=failed + [(item, reason) for item in items])
                return
        log.debug("XNAT %s: %d instances sent in %.2f s", destination.name, len(items), time.monotonic() - started)
        quarantine.settle(batch)
        work.record(done=items, failed=failed)

    def _pack(self, present: Sequence[tuple[str, Instance]], structure: Structure, destination: XnatDestination) -> IO[bytes]:
        """The request body: a zip of the instances, or the lone instance as stored when cache_size is 0.

        Members are STORED, not deflated: the zip is there to send many files in one request (one
        session check, one XNAT import). zlib at its fastest level halves a 512x512 CT but runs at
        ~40 MB/s a core (measured), a third of a gigabit LAN to XNAT, and gains nothing on JPEG or
        JPEG 2000 pixel data; it would pay only on links slower than ~20 MB/s.
        """
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY, dir=str(self.store.folder))
        try:
            if destination.cache_size == 0:
                self._copy(present[0][0], spool.write)
                return spool
            names = unique_names([self._name(item, record, structure, destination) for item, record in present])
            with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED) as archive:
                for name, (item, record) in zip(names, present, strict=True):
                    info = zipfile.ZipInfo(name, _zip_time(record.received))
                    info.file_size = record.size  # so zipfile chooses ZIP64 up front for a member of 2 GiB or more
                    with archive.open(info, "w") as member:
                        self._copy(item, member.write)
        except BaseException:
            spool.close()
            raise
        return spool

    def _copy(self, item: str, write: Callable[[bytes], object]) -> None:
        with self._reading(item) as reader:
            for chunk in reader.iter_chunks(_CHUNK):
                write(chunk)

    def _name(self, item: str, record: Instance, structure: Structure, destination: XnatDestination) -> str:
        """The instance's name in the zip, from its header (pixels are not read)."""
        from pydicom import dcmread  # ~0.4 s, paid by a process that runs an XNAT job, not by every runner
        from pydicom.dataset import Dataset

        with self._reading(item) as reader:
            header = reader.read(0, record.header_length or record.size)
        try:
            dataset = dcmread(io.BytesIO(header), stop_before_pixels=True, force=True)
            return structure.name_for(dataset, destination.default_string, destination.whitespace_replacement)
        except Exception as error:  # pydicom raises many kinds; a name is no reason to hold an instance back
            log.warning("XNAT %s: header of %s not readable for its name (%s); default names used",
                        destination.name, record.sop_uid, error)
            return structure.name_for(Dataset(), destination.default_string, destination.whitespace_replacement)

    @contextlib.contextmanager
    def _reading(self, item: str) -> Iterator[BlobReader]:
        """The instance's bytes; a store error (deleted since, damaged) as _UnreadableInstanceError."""
        try:
            with self.store.open_instance(item) as reader:
                yield reader
        except NotFoundError:
            raise _UnreadableInstanceError(item, _DELETED) from None
        except DicomfsError as error:
            raise _UnreadableInstanceError(item, f"could not be read from the store: {error}") from error


def _transient(status: int) -> bool:
    return status in (408, 429) or 500 <= status < 600


def _check_upload(url: str, answer: _Answer) -> None:
    if 200 <= answer.status < 300:
        return
    if _transient(answer.status):
        raise XnatUnavailableError(f"XNAT {url}: {answer.summary()}")
    if 400 <= answer.status < 500 and answer.status not in (404, 405):
        raise XnatBatchRefusedError(f"{url}: {answer.summary()}")
    moved = f" (to {answer.location})" if answer.location else ""
    raise XnatRefusedError(f"XNAT {url}: {answer.summary()}{moved}: every batch would get this answer; check the url "
                           "and import_url")


def _session_cookie(answer: _Answer, name: str) -> str | None:
    """The session id: the cookie ``name`` from Set-Cookie, else the body, as XNAT also answers it as text."""
    for header in answer.set_cookies:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(header)
        except CookieError:
            continue
        if name in jar and _COOKIE_VALUE.fullmatch(jar[name].value):
            return jar[name].value
    text = answer.body.decode("ascii", "replace").strip()
    return text if _SESSION_ID.fullmatch(text) else None


def _digest_header(body: IO[bytes]) -> dict[str, str]:
    """RFC 3230's ``Digest: SHA-256=<base64>`` (the algorithm token from RFC 5843) of the whole body."""
    digest = hashlib.sha256()
    body.seek(0)
    for chunk in iter(lambda: body.read(_CHUNK), b""):
        digest.update(chunk)
    return {"Digest": "SHA-256=" + base64.b64encode(digest.digest()).decode("ascii")}


def _zip_time(received: float) -> tuple[int, int, int, int, int, int]:
    """When the instance was received, in UTC (the same zip wherever it is built); zip has no date before 1980."""
    stamp = time.gmtime(max(received, 315532800.0))
    return stamp.tm_year, stamp.tm_mon, stamp.tm_mday, stamp.tm_hour, stamp.tm_min, stamp.tm_sec


def _write_atomically(path: Path, content: bytes | IO[bytes]) -> None:
    """``path`` holds all of ``content`` (a file from its start) or keeps what it held: no half entry is seen."""
    partial = path.with_name(path.name + ".part")
    with open(partial, "wb") as out:
        if isinstance(content, bytes):
            out.write(content)
        else:
            content.seek(0)
            shutil.copyfileobj(content, out, _CHUNK)
    os.replace(partial, path)


def _post(destination: XnatDestination, url: str, headers: Mapping[str, str], body: IO[bytes] | None = None) -> _Answer:
    """One POST on its own connection; the answer whatever its status, or the error of not getting one."""
    target = StowTarget(url, None, tls_verify=destination.tls_verify, tls_verify_hostname=destination.tls_verify_hostname,
                        tls_ca_file=destination.tls_ca_file or None, timeout=float(destination.timeout))
    length = 0 if body is None else body.seek(0, os.SEEK_END)
    if body is not None:
        body.seek(0)
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request_headers = {**headers, "Content-Length": str(length), "User-Agent": f"dicomfs/{__version__}"}
    connection = open_connection(target)
    send_error: OSError | None = None
    try:
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as error:
            raise _unreachable(url, error, "connecting", target.timeout) from error
        try:
            pieces = None if body is None else iter(lambda: body.read(_CHUNK), b"")
            connection.request("POST", path, body=pieces, headers=request_headers)
        except OSError as error:
            # The server may have answered (401, 413) and closed before reading the whole body.
            send_error = error
            if connection.sock is None:
                raise _unreachable(url, error, "sending", target.timeout) from error
            with contextlib.suppress(OSError):
                connection.sock.settimeout(min(target.timeout, _EARLY_ANSWER_TIMEOUT))
        try:
            response = connection.getresponse()
            answer = _Answer(response.status, tuple(response.headers.get_all("Set-Cookie") or ()),
                             response.getheader("Location") or "", read_answer(response))
        except (OSError, http.client.HTTPException) as error:
            cause = send_error or error
            raise _unreachable(url, cause, "sending" if send_error else "reading the answer", target.timeout) from cause
    finally:
        connection.close()
    if send_error is not None and answer.status < 400:  # an answer to a body it did not get whole is no receipt
        raise _unreachable(url, send_error, "sending", target.timeout) from send_error
    return answer


def _unreachable(url: str, error: BaseException, during: str, timeout: float) -> DicomfsError:
    """Classify a failure to talk to XNAT. The message names the URL, never a credential."""
    transient, text = describe_failure(error, timeout=timeout, host=urlsplit(url).hostname or "")
    where = f"XNAT {url} ({during})"
    return XnatUnavailableError(f"{where}: {text}") if transient else XnatRefusedError(f"{where}: {text}")
