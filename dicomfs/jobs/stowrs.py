"""A DICOMweb STOW-RS client: one call stores N instances in one request and says what happened to each.

The export job makes a :class:`StowClient` for a :class:`StowTarget` (the endpoint and how to reach
it, like dcm4chee's STOW-RS exporter properties ``chunked``, ``bearer-token``/``basic-auth``,
``allow-any-hostname`` and ``disable-trust-manager``) and calls its ``send`` with each batch of
:class:`Outgoing` instances, from several threads; each thread keeps its keep-alive connection
(:func:`send` is the same on a connection of its own). Batching, concurrency, retries and
persistence are the job engine's; this module only sends one request at a time and interprets
its answer:

- :class:`StowResponse`: the server answered 2xx or 409; ``results`` has an :class:`InstanceResult`
  for every instance sent (stored, stored with a warning, or failed with its reason).
- :class:`StowTransientError`: nothing is known to have been stored and trying again later may work
  (connection refused or reset, timeout, TLS EOF, HTTP 408/429/500/502/503/504).
- :class:`StowRefusedError`: the server refused the whole request (400, 401, 403, 404, 413, 415, a
  redirect, a TLS certificate it cannot verify, an answer that is not HTTP ...); sending the same
  request again would get the same answer.
- :class:`StowSourceError` (a :class:`StowTransientError`): an instance's content could not be read,
  or did not have the size announced; the request was abandoned half-way, nothing counts as stored.

The request is ``POST <url>/studies`` with a ``multipart/related; type="application/dicom"`` body;
every part is one Part 10 file streamed from :attr:`Outgoing.chunks`, so an instance is never held
in memory whole. The body's length is computed up front (``Content-Length``) unless the target asks
for ``Transfer-Encoding: chunked``. Answers in DICOM JSON (PS3.18 F.2) and in DICOM XML (PS3.19
NativeDicomModel) are both understood; the parsers are plain functions of bytes, tested without a
server.

The ``Authorization`` value never reaches a log, an exception or a ``repr``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dicomfs import __version__
from dicomfs.errors import ConfigError, DicomfsError
from dicomfs.jobs.links import STALE_ERRORS, ThreadConnections, describe_failure, read_whole, tls_context

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

__all__ = [
    "InstanceResult",
    "Outgoing",
    "StowClient",
    "StowError",
    "StowRefusedError",
    "StowReport",
    "StowResponse",
    "StowSourceError",
    "StowTarget",
    "StowTransientError",
    "content_length",
    "failure_text",
    "interpret_response",
    "multipart_pieces",
    "new_boundary",
    "open_connection",
    "parse_json_report",
    "parse_report",
    "parse_xml_report",
    "read_answer",
    "request_headers",
    "send",
    "short_body",
    "status_phrase",
    "warning_text",
]

log = logging.getLogger(__name__)

# HTTP statuses after which the same request may well succeed later.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The answer is read whole to be parsed; a STOW-RS report is a few hundred bytes per instance.
MAX_RESPONSE_BYTES = 32 << 20
# Pieces smaller than this are gathered before being sent, so part headers do not cost a send each.
_GATHER_BYTES = 64 << 10
# After the connection broke while sending, how long to look for an answer the server sent first.
_EARLY_ANSWER_TIMEOUT = 5.0

# Tags of the Store Instances Response Module (PS3.18 10.5.3).
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_INSTANCE_UID = "00081155"
WARNING_REASON = "00081196"
FAILURE_REASON = "00081197"
_KEYWORDS = {
    "RetrieveURL": RETRIEVE_URL,
    "FailedSOPSequence": FAILED_SOP_SEQUENCE,
    "ReferencedSOPSequence": REFERENCED_SOP_SEQUENCE,
    "ReferencedSOPInstanceUID": REFERENCED_SOP_INSTANCE_UID,
    "WarningReason": WARNING_REASON,
    "FailureReason": FAILURE_REASON,
}


# --------------------------------------------------------------------------------------------------
# Errors


class StowError(DicomfsError):
    """A STOW-RS request did not get a per-instance answer.

    ``status`` is the HTTP status when the server answered, else None.
    """

    http_status = 502  # Bad Gateway: the remote server is the problem, seen from a front end

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class StowTransientError(StowError):
    """Worth retrying later: the connection failed, timed out or the server said "not now".

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class StowRefusedError(StowError):
    """Not worth retrying as is: the server refused the whole request, or cannot be talked to.

    ``body`` is the start of the server's answer (whitespace collapsed), empty when none.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message, status=status)
        self.body = body


class StowSourceError(StowTransientError):
    """The content of ``sop_instance_uid`` could not be read, or was not ``size`` bytes long.

    The request was abandoned half-way, so nothing of it counts as stored. It is transient
    because the usual cause is an instance deleted while being sent, which the next attempt's
    preparation finds and reports on its own; the cause (e.g. a
    :class:`~dicomfs.errors.NotFoundError`) is the exception's ``__cause__``.
    """

    def __init__(self, message: str, *, sop_instance_uid: str) -> None:
        super().__init__(message)
        self.sop_instance_uid = sop_instance_uid


# --------------------------------------------------------------------------------------------------
# What to send where


@dataclass(frozen=True)
class StowTarget:
    """A STOW-RS endpoint and how to reach it.

    ``url`` is the DICOMweb base (``http://host:8042/dicom-web``); requests go to
    ``url.rstrip('/') + '/studies'``. ``authorization`` is a whole header value (``Bearer ...``,
    ``Basic ...``), never shown. ``chunked`` sends ``Transfer-Encoding: chunked`` instead of a
    ``Content-Length``. ``tls_verify=False`` accepts any certificate (dcm4chee's
    ``disable-trust-manager``), ``tls_verify_hostname=False`` a verified certificate for another host
    name (``allow-any-hostname``); ``tls_ca_file`` replaces the system's trusted authorities.
    ``timeout`` bounds each connect, send and receive (not the whole request), in seconds.

    Raises :class:`~dicomfs.errors.ConfigError` for a URL that is not http(s) with a host, with
    credentials in it, or an authorization value that cannot be a header.
    """

    url: str
    authorization: str | None = field(repr=False)
    chunked: bool = False
    tls_verify: bool = True
    tls_verify_hostname: bool = True
    tls_ca_file: str | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as error:
            raise ConfigError(f"STOW-RS URL {self.url!r} is not a URL: {error}") from None
        if parts.username is not None or parts.password is not None:
            # Not echoed: it holds a secret.
            raise ConfigError("the STOW-RS URL holds credentials; give them as a bearer token or basic-auth instead")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"STOW-RS URL {self.url!r} must be http:// or https:// with a host name")
        if parts.fragment:
            raise ConfigError(f"STOW-RS URL {self.url!r} must not have a #fragment")
        if self.authorization is not None and not _is_header_value(self.authorization):
            raise ConfigError("the STOW-RS authorization value is empty or holds control characters")
        if not self.timeout > 0:
            raise ConfigError(f"STOW-RS timeout must be positive, not {self.timeout}")

    @property
    def studies_url(self) -> str:
        """The URL the requests go to."""
        parts = urlsplit(self.url)
        return parts._replace(path=parts.path.rstrip("/") + "/studies").geturl()


def _is_header_value(value: str) -> bool:
    return bool(value.strip()) and value.isprintable() and value.isascii()


@dataclass(frozen=True)
class Outgoing:
    """One instance to send: its UIDs, the exact size of its Part 10 content and how to read it.

    ``chunks`` is called once per request and yields the content in pieces (e.g.
    ``BlobReader.iter_chunks``); the pieces must add up to exactly ``size`` bytes.
    """

    sop_instance_uid: str
    sop_class_uid: str
    size: int
    chunks: Callable[[], Iterator[bytes]]

    @classmethod
    def from_bytes(cls, sop_instance_uid: str, sop_class_uid: str, data: bytes, piece: int = 1 << 20) -> Outgoing:
        """An instance already in memory (e.g. the result of :func:`~dicomfs.jobs.transcode.transcoded`)."""
        view = memoryview(data)

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(view), piece):
                yield bytes(view[start:start + piece])

        return cls(sop_instance_uid, sop_class_uid, len(data), chunks)


@dataclass(frozen=True)
class InstanceResult:
    """What the server did with one instance.

    ``ok`` means stored. ``reason`` is the failure reason (``"0xA700 refused: out of resources"``),
    or the warning of an instance stored with one, or why the instance counts as failed (``"not in
    the response"``); ``warning`` is the warning alone.
    """

    sop_instance_uid: str
    ok: bool
    reason: str = ""
    warning: str = ""


@dataclass(frozen=True)
class StowResponse:
    """The answer to one request: its HTTP status and a result for every instance sent."""

    status: int
    results: dict[str, InstanceResult]

    @property
    def stored(self) -> list[InstanceResult]:
        """The instances stored (with or without a warning), in the order sent."""
        return [r for r in self.results.values() if r.ok]

    @property
    def failed(self) -> list[InstanceResult]:
        """The instances not stored, in the order sent."""
        return [r for r in self.results.values() if not r.ok]


# --------------------------------------------------------------------------------------------------
# Status codes


# PS3.18 10.5.3 (Store Instances Response Module) and PS3.4 C.4.2.1.4 / Annex GG.
_FAILURES = {
    0x0107: "warning: attribute list error",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0112: "no such SOP instance",
    0x0117: "invalid SOP instance",
    0x0118: "no such SOP class",
    0x0119: "SOP class and instance do not match",
    0x0122: "refused: SOP class not supported",
    0x0124: "refused: not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xC122: "refused: transfer syntax not supported",
}
_FAILURE_RANGES = (
    (0xA700, 0xA7FF, "refused: out of resources"),
    (0xA900, 0xA9FF, "error: data set does not match SOP class"),
    (0xC000, 0xCFFF, "error: cannot understand"),
)
_WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0x0001: "requested optional attributes are not supported",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
}


def failure_text(code: int) -> str:
    """A FailureReason (0008,1197) code with its meaning: ``0xA701 refused: out of resources``."""
    meaning = _FAILURES.get(code)
    if meaning is None:
        meaning = next((text for low, high, text in _FAILURE_RANGES if low <= code <= high), "")
    if not meaning and code in _WARNINGS:
        meaning = _WARNINGS[code]
    return f"0x{code:04X} {meaning or 'unknown failure'}"


def warning_text(code: int) -> str:
    """A WarningReason (0008,1196) code with its meaning: ``0xB000 coercion of data elements``."""
    return f"0x{code:04X} {_WARNINGS.get(code, 'warning')}"


# --------------------------------------------------------------------------------------------------
# The request body


def new_boundary() -> str:
    """A fresh multipart boundary: 32 random hex digits cannot occur by chance in a DICOM file."""
    return f"dicomfs-{secrets.token_hex(16)}"


def _part_header(boundary: str, size: int, first: bool) -> bytes:
    lead = "" if first else "\r\n"
    return f"{lead}--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n".encode("ascii")


def _closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")


def content_length(boundary: str, instances: Sequence[Outgoing]) -> int:
    """The exact length of the body :func:`multipart_pieces` yields, without reading any instance."""
    framing = sum(len(_part_header(boundary, item.size, index == 0)) for index, item in enumerate(instances))
    return framing + sum(item.size for item in instances) + len(_closing(boundary))


def multipart_pieces(boundary: str, instances: Sequence[Outgoing]) -> Iterator[bytes]:
    """The ``multipart/related`` body in pieces: each part's header, its content as read, the end.

    Each instance's ``chunks()`` is called when its part is reached. Raises
    :class:`StowSourceError` when reading fails or the pieces do not add up to ``size``.
    """
    for index, item in enumerate(instances):
        yield _part_header(boundary, item.size, index == 0)
        sent = 0
        try:
            for piece in item.chunks():
                sent += len(piece)
                if sent > item.size:
                    break
                if piece:
                    yield piece
        except (DicomfsError, OSError) as error:
            raise StowSourceError(f"instance {item.sop_instance_uid} could not be read: {error}",
                                  sop_instance_uid=item.sop_instance_uid) from error
        if sent != item.size:
            actual = "more than" if sent > item.size else f"{sent} bytes, not"
            raise StowSourceError(f"instance {item.sop_instance_uid} has {actual} the {item.size} bytes announced",
                                  sop_instance_uid=item.sop_instance_uid)
    yield _closing(boundary)


def _gathered(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The same bytes, small pieces joined (fewer sends and chunks), large ones passed on as they are."""
    pending: list[bytes] = []
    pending_size = 0
    for piece in pieces:
        if len(piece) >= _GATHER_BYTES:
            if pending:
                yield b"".join(pending)
                pending, pending_size = [], 0
            yield piece
            continue
        pending.append(piece)
        pending_size += len(piece)
        if pending_size >= _GATHER_BYTES:
            yield b"".join(pending)
            pending, pending_size = [], 0
    if pending:
        yield b"".join(pending)


def request_headers(target: StowTarget, boundary: str, length: int | None) -> dict[str, str]:
    """The request's headers; ``length`` None means chunked. Holds the authorization: never log it."""
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
        "User-Agent": f"dicomfs/{__version__}",
    }
    if length is None:
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Content-Length"] = str(length)
    if target.authorization is not None:
        headers["Authorization"] = target.authorization
    return headers


# --------------------------------------------------------------------------------------------------
# The response


@dataclass(frozen=True)
class StowReport:
    """The per-instance content of a Store Instances Response.

    ``stored`` maps each SOP Instance UID of the ReferencedSOPSequence to its warning (empty when
    none); ``failed`` each one of the FailedSOPSequence to its reason. ``recognized`` says whether
    the answer had either sequence at all (even empty): a report, rather than some other JSON or
    XML such as a server's own error document.
    """

    stored: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    recognized: bool = False


def _code(value: object) -> int | None:
    """A US value as DICOM JSON or XML may carry it: 42752, "42752", "A700", "0xA700", "A700H"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return int(text)
        match = re.fullmatch(r"(?:0x)?([0-9A-Fa-f]{1,4})[Hh]?", text)
        if match:
            return int(match.group(1), 16)
    return None


def _reason(codes: Sequence[object], describe: Callable[[int], str], absent: str) -> str:
    texts = []
    for value in codes:
        code = _code(value)
        texts.append(describe(code) if code is not None else f"{value!s}")
    return "; ".join(texts) if texts else absent


def _report_from(referenced: Iterable[Mapping[str, list[object]]], failed: Iterable[Mapping[str, list[object]]],
                 recognized: bool) -> StowReport:
    report = StowReport(recognized=recognized)
    for item in referenced:
        for uid in item.get(REFERENCED_SOP_INSTANCE_UID, []):
            report.stored[str(uid).strip()] = _reason(item.get(WARNING_REASON, []), warning_text, "")
    for item in failed:
        for uid in item.get(REFERENCED_SOP_INSTANCE_UID, []):
            uid = str(uid).strip()
            report.failed[uid] = _reason(item.get(FAILURE_REASON, []), failure_text, "failed, no reason given")
            report.stored.pop(uid, None)  # listed as both: failed wins
    return report


def _json_items(dataset: Mapping[str, Any], tag: str) -> list[dict[str, list[object]]]:
    element = dataset.get(tag)
    if not isinstance(element, Mapping):
        return []
    items = []
    for item in element.get("Value") or []:
        if not isinstance(item, Mapping):
            continue
        values: dict[str, list[object]] = {}
        for key, inner in item.items():
            if isinstance(inner, Mapping):
                found = inner.get("Value")
                values[str(key).upper()] = list(found) if isinstance(found, list) else []
        items.append(values)
    return items


def parse_json_report(body: bytes) -> StowReport:
    """Parse a DICOM JSON (PS3.18 F.2) Store Instances Response; ValueError when it is not one."""
    try:
        document = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    datasets = document if isinstance(document, list) else [document]
    if not datasets or not all(isinstance(d, Mapping) for d in datasets):
        raise ValueError("not a DICOM JSON dataset")
    referenced: list[dict[str, list[object]]] = []
    failed: list[dict[str, list[object]]] = []
    recognized = False
    for dataset in datasets:
        upper = {str(key).upper(): value for key, value in dataset.items()}
        recognized |= REFERENCED_SOP_SEQUENCE in upper or FAILED_SOP_SEQUENCE in upper
        referenced += _json_items(upper, REFERENCED_SOP_SEQUENCE)
        failed += _json_items(upper, FAILED_SOP_SEQUENCE)
    return _report_from(referenced, failed, recognized)


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _xml_tag(element: Element) -> str:
    tag = element.get("tag")
    if tag:
        return tag.strip().upper()
    return _KEYWORDS.get(element.get("keyword", ""), "")


def _xml_items(parent: Element, tag: str) -> list[dict[str, list[object]]]:
    items = []
    for attribute in parent:
        if _local(attribute.tag) != "DicomAttribute" or _xml_tag(attribute) != tag:
            continue
        for item in attribute:
            if _local(item.tag) != "Item":
                continue
            values: dict[str, list[object]] = {}
            for inner in item:
                if _local(inner.tag) == "DicomAttribute":
                    values[_xml_tag(inner)] = [(v.text or "").strip() for v in inner if _local(v.tag) == "Value"]
            items.append(values)
    return items


def parse_xml_report(body: bytes) -> StowReport:
    """Parse a DICOM XML (PS3.19 NativeDicomModel) Store Instances Response; ValueError when it is not one."""
    from xml.etree import ElementTree  # imported here: most archives answer JSON, and every command start pays for it

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as error:
        raise ValueError(f"not XML: {error}") from None
    if _local(root.tag) != "NativeDicomModel":
        raise ValueError(f"not a NativeDicomModel but <{_local(root.tag)}>")
    recognized = any(_local(a.tag) == "DicomAttribute" and _xml_tag(a) in (REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE)
                     for a in root)
    return _report_from(_xml_items(root, REFERENCED_SOP_SEQUENCE), _xml_items(root, FAILED_SOP_SEQUENCE), recognized)


def _first_part(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The first part of a multipart answer (some servers wrap their XML report in one)."""
    import email.parser  # imported here: only these answers need a MIME parser with the HTTP policy
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        return part.get_content_type(), payload if isinstance(payload, bytes) else b""
    raise ValueError("an empty multipart answer")


def parse_report(content_type: str, body: bytes) -> StowReport:
    """Parse a report by its media type (JSON or XML, possibly in a multipart), else by its first byte.

    Raises ValueError when the body is empty or neither.
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media.startswith("multipart/"):
        media, body = _first_part(content_type, body)
    if not body.strip():
        raise ValueError("no report in the answer")
    if media.endswith("json"):
        return parse_json_report(body)
    if media.endswith("xml"):
        return parse_xml_report(body)
    start = body.lstrip()[:1]
    if start in (b"{", b"["):
        return parse_json_report(body)
    if start == b"<":
        return parse_xml_report(body)
    raise ValueError(f"an answer of type {media or 'unknown'}, neither DICOM JSON nor XML")


def short_body(body: bytes, limit: int = 300) -> str:
    """The start of an answer for a message: decoded, whitespace collapsed, cut at `limit` characters."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def interpret_response(status: int, content_type: str, body: bytes, sent: Sequence[str],
                       retry_after: float | None = None, *, request: str = "") -> StowResponse:
    """Turn an HTTP answer into per-instance results, or raise for a whole-request failure.

    ``request`` (``"POST <url>"``) starts every message about the status, so a person reading a
    failed job sees where it went (a wrong URL answers 404).

    - 408, 429, 500, 502, 503, 504: :class:`StowTransientError`.
    - 2xx, 409, and any other status whose body is a Store Instances Response (Orthanc answers 400
      when a part is not DICOM, listing the other parts it stored): per instance. Those in the
      FailedSOPSequence failed with their reason, those in the ReferencedSOPSequence were stored
      (with their warning), and those in neither failed ("not in the response"): PS3.18 lists
      every stored instance, and Orthanc answers 200 with an empty ReferencedSOPSequence for a
      part it dropped. Only a 2xx but 202 without any report counts every instance as stored.
    - Any other status: :class:`StowRefusedError`, its message the status and the body's start.
    """
    if status in TRANSIENT_STATUSES:
        raise StowTransientError(_status_message(request, status, short_body(body)), status=status, retry_after=retry_after)
    success = 200 <= status < 300 and status != 202
    try:
        report = parse_report(content_type, body)
        why = "" if report.recognized else "no Store Instances Response in it"
    except ValueError as error:
        report, why = StowReport(), str(error)
    if not (200 <= status < 300 or status == 409 or report.recognized):
        text = short_body(body)
        raise StowRefusedError(_status_message(request, status, text), status=status, body=text)
    if why and not success:
        log.warning("STOW-RS answer %d not understood: %s", status, why)
    missing = "not in the response" if report.recognized else f"not in the response (HTTP {status}, {why})"
    results: dict[str, InstanceResult] = {}
    for uid in sent:
        if uid in report.failed:
            results[uid] = InstanceResult(uid, False, report.failed[uid])
        elif uid in report.stored:
            warning = report.stored[uid]
            results[uid] = InstanceResult(uid, True, warning, warning)
        elif success and not report.recognized:
            results[uid] = InstanceResult(uid, True)
        else:
            results[uid] = InstanceResult(uid, False, missing if success or status in (202, 409)
                                          else f"{missing}, {_status_message(request, status, '')}")
    return StowResponse(status, results)


def _status_message(request: str, status: int, text: str) -> str:
    head = f"HTTP {status} {status_phrase(status)}".rstrip()
    head = f"{request}: {head}" if request else head
    return f"{head}: {text}" if text else head


def status_phrase(status: int) -> str:
    try:
        return http.client.responses[status]
    except KeyError:
        return ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --------------------------------------------------------------------------------------------------
# Sending


def open_connection(target: StowTarget) -> http.client.HTTPConnection:
    parts = urlsplit(target.url)
    host = parts.hostname or ""
    if parts.scheme == "https":
        context = tls_context(target.tls_ca_file, verify=target.tls_verify, verify_hostname=target.tls_verify_hostname)
        return http.client.HTTPSConnection(host, parts.port, timeout=target.timeout, context=context)
    return http.client.HTTPConnection(host, parts.port, timeout=target.timeout)


def _request_path(target: StowTarget) -> str:
    parts = urlsplit(target.url)
    path = parts.path.rstrip("/") + "/studies"
    return f"{path}?{parts.query}" if parts.query else path


def _transport_error(target: StowTarget, error: BaseException, during: str) -> StowError:
    """Classify a failure to talk to the server. The message names the URL, never the authorization."""
    transient, text = describe_failure(error, timeout=target.timeout, host=urlsplit(target.url).hostname or "")
    where = f"STOW-RS {target.studies_url} ({during})"
    return StowTransientError(f"{where}: {text}") if transient else StowRefusedError(f"{where}: {text}")


def read_answer(response: http.client.HTTPResponse) -> bytes:
    return read_whole(response, MAX_RESPONSE_BYTES)


def send(target: StowTarget, instances: Sequence[Outgoing]) -> StowResponse:
    """Store `instances` with one STOW-RS request to `target`, on a connection of its own, and
    return what happened to each; see :meth:`StowClient.send`, which also keeps the connection."""
    client = StowClient(target)
    try:
        return client.send(instances)
    finally:
        client.close()


class StowClient:
    """STOW-RS requests to one target over keep-alive connections, one per thread.

    The export sends from several threads at once; each keeps its connection from one request to
    the next, so a request costs no TCP (or TLS) handshake. Servers close idle connections
    (Orthanc after 1 s): one found closed before sending is replaced, and a request that fails
    on a reused connection before any answer goes once more on a new one (storing an instance
    twice is harmless: archives answer it as stored). :meth:`close` once no thread sends any more.
    """

    def __init__(self, target: StowTarget) -> None:
        self.target = target
        self._connections = ThreadConnections(lambda: open_connection(target))

    def send(self, instances: Sequence[Outgoing]) -> StowResponse:
        """Store `instances` with one STOW-RS request and return what happened to each.

        Streams the multipart body piece by piece (each instance's ``chunks()`` called once per
        attempt), reads the answer and keeps the connection unless the server closes it.
        Blocking; call it from a thread.

        Raises
        ------
        ValueError
            No instances, or the same SOP Instance UID twice.
        StowTransientError
            Connection refused, reset or timed out, TLS cut, HTTP 408/429/500/502/503/504.
        StowRefusedError
            Any other status but 2xx and 409 (unless its body is a Store Instances Response, see
            :func:`interpret_response`), an untrusted certificate, TLS failing, an answer that is not HTTP.
        StowSourceError
            An instance could not be read or did not have its announced size.
        """
        if not instances:
            raise ValueError("no instances to send")
        uids = [item.sop_instance_uid for item in instances]
        if len(set(uids)) != len(uids):
            raise ValueError("the same SOP Instance UID is in the batch twice")
        target = self.target
        boundary = new_boundary()
        length = None if target.chunked else content_length(boundary, instances)
        headers = request_headers(target, boundary, length)
        request = f"POST {target.studies_url}"
        started = time.monotonic()
        log.debug("STOW-RS %s: %d instances, %s", target.studies_url, len(instances),
                  "chunked" if length is None else f"{length} bytes")
        connection, reused = self._connections.get()
        try:
            status, content_type, retry_after, body, send_error = self._exchange(connection, reused, boundary,
                                                                                  instances, headers, length)
        except _Stale:
            connection, reused = self._connections.get()
            status, content_type, retry_after, body, send_error = self._exchange(connection, reused, boundary,
                                                                                  instances, headers, length)
        if send_error is not None:
            # An answer before the body was sent whole: believe a refusal or a "not now" (this raises
            # them), never a per-instance report about a body the server did not get.
            interpret_response(status, content_type, body, uids, retry_after, request=request)
            raise _transport_error(target, send_error, "sending") from send_error
        result = interpret_response(status, content_type, body, uids, retry_after, request=request)
        log.debug("STOW-RS %s: HTTP %d in %.2f s, %d stored, %d failed", target.studies_url, status,
                  time.monotonic() - started, len(result.stored), len(result.failed))
        return result

    def _exchange(self, connection: http.client.HTTPConnection, reused: bool, boundary: str,
                  instances: Sequence[Outgoing], headers: dict[str, str],
                  length: int | None) -> tuple[int, str, float | None, bytes, OSError | None]:
        """One request and its answer on ``connection``: (status, content type, Retry-After, body,
        the error that cut the sending short or None). Raises :class:`_Stale` when a ``reused``
        connection turns out closed before any answer. Closes the connection unless it may serve again."""
        target = self.target
        keep = False
        try:
            if connection.sock is None:
                try:
                    connection.connect()
                except (OSError, http.client.HTTPException) as error:
                    raise _transport_error(target, error, "connecting") from error
            send_error: OSError | None = None
            try:
                connection.request("POST", _request_path(target), body=_gathered(multipart_pieces(boundary, instances)),
                                   headers=headers, encode_chunked=length is None)
            except OSError as error:
                if reused and isinstance(error, STALE_ERRORS):
                    raise _Stale from error
                # The server may have answered (401, 413 ...) and closed before reading everything.
                send_error = error
                if connection.sock is not None:
                    try:
                        connection.sock.settimeout(min(target.timeout, _EARLY_ANSWER_TIMEOUT))
                    except OSError:
                        pass
            if send_error is not None and connection.sock is None:
                raise _transport_error(target, send_error, "sending") from send_error
            try:
                response = connection.getresponse()
                status = response.status
                content_type = response.getheader("Content-Type") or ""
                retry_after = _retry_after(response.getheader("Retry-After"))
                body = read_answer(response)
            except (OSError, http.client.HTTPException) as error:
                if reused and send_error is None and isinstance(error, STALE_ERRORS):
                    raise _Stale from error
                cause = send_error or error
                raise _transport_error(target, cause, "sending" if send_error else "reading the answer") from cause
            # Only an answer read to its end leaves the connection ready for the next request.
            keep = send_error is None and not response.will_close and response.isclosed()
            return status, content_type, retry_after, body, send_error
        finally:
            if not keep:
                self._connections.discard(connection)

    def close(self) -> None:
        """Close every thread's connection (call it once none sends any more)."""
        self._connections.close()


class _Stale(Exception):
    """A reused connection was found closed by the server before any answer: send again, anew."""


