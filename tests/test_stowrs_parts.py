"""The STOW-RS client's parts that need no archive: response parsing, the multipart body,
keep-alive connections (against a minimal server on loopback, in this process), syntaxes, transcoding.

The responses are written from PS3.18 10.5.3 (Store Instances Response Module), F.2 (DICOM JSON)
and PS3.19 (NativeDicomModel). Sending to a real archive is tested against Orthanc elsewhere.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from dicomfs.errors import ConfigError, NotFoundError
from dicomfs.jobs import links
from dicomfs.jobs.stowrs import (
    InstanceResult,
    Outgoing,
    StowClient,
    StowRefusedError,
    StowSourceError,
    StowTarget,
    StowTransientError,
    _gathered,
    content_length,
    failure_text,
    interpret_response,
    multipart_pieces,
    parse_json_report,
    parse_report,
    parse_xml_report,
    request_headers,
    send,
    warning_text,
)
from dicomfs.jobs.transcode import TranscodeError, choose_syntax, parse_syntaxes, transcoded
from dicomfs.samples import make_instance

A, B, C, D = "1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"
SECRET = "Bearer s3cr3t-t0ken"


# ------------------------------------------------------------------------------------------------
# DICOM JSON and XML reports


def _uid(value: str, vr: str = "UI") -> dict[str, object]:
    return {"vr": vr, "Value": [value]}


def json_report(stored: dict[str, int | None], failed: dict[str, int | None]) -> bytes:
    """A Store Instances Response in DICOM JSON: stored UID -> warning code, failed UID -> failure code."""
    dataset: dict[str, object] = {"00081190": {"vr": "UR", "Value": ["http://pacs/dicom-web/studies/1.2.3"]}}
    if stored:
        items = []
        for uid, warning in stored.items():
            item: dict[str, object] = {"00081150": _uid(CTImageStorage), "00081155": _uid(uid),
                                       "00081190": _uid(f"http://pacs/dicom-web/studies/1.2.3/series/1/instances/{uid}", "UR")}
            if warning is not None:
                item["00081196"] = {"vr": "US", "Value": [warning]}
            items.append(item)
        dataset["00081199"] = {"vr": "SQ", "Value": items}
    if failed:
        items = []
        for uid, code in failed.items():
            item = {"00081150": _uid(CTImageStorage), "00081155": _uid(uid)}
            if code is not None:
                item["00081197"] = {"vr": "US", "Value": [code]}
            items.append(item)
        dataset["00081198"] = {"vr": "SQ", "Value": items}
    return json.dumps(dataset).encode()


def _xml_attr(tag: str, vr: str, keyword: str, value: object) -> str:
    return f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{keyword}"><Value number="1">{value}</Value></DicomAttribute>'


def xml_report(stored: dict[str, int | None], failed: dict[str, int | None]) -> bytes:
    """The same in DICOM XML (PS3.19 NativeDicomModel, with its namespace)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM" '
           'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">',
           _xml_attr("00081190", "UR", "RetrieveURL", "http://pacs/dicom-web/studies/1.2.3")]
    for tag, keyword, entries, reason_tag, reason_keyword in (
            ("00081198", "FailedSOPSequence", failed, "00081197", "FailureReason"),
            ("00081199", "ReferencedSOPSequence", stored, "00081196", "WarningReason")):
        if not entries:
            continue
        out.append(f'<DicomAttribute tag="{tag}" vr="SQ" keyword="{keyword}">')
        for number, (uid, code) in enumerate(entries.items(), 1):
            out.append(f'<Item number="{number}">')
            out.append(_xml_attr("00081150", "UI", "ReferencedSOPClassUID", CTImageStorage))
            out.append(_xml_attr("00081155", "UI", "ReferencedSOPInstanceUID", uid))
            if code is not None:
                out.append(_xml_attr(reason_tag, "US", reason_keyword, code))
            out.append("</Item>")
        out.append("</DicomAttribute>")
    out.append("</NativeDicomModel>")
    return "\n".join(out).encode()


@pytest.mark.parametrize("report", [json_report, xml_report])
def test_report_parsers(report) -> None:  # type: ignore[no-untyped-def]
    body = report({A: None, B: 0xB000}, {C: 0xA700, D: None})
    parsed = parse_json_report(body) if report is json_report else parse_xml_report(body)
    assert parsed.stored == {A: "", B: "0xB000 coercion of data elements"}
    assert parsed.failed == {C: "0xA700 refused: out of resources", D: "failed, no reason given"}


def test_failure_and_warning_texts() -> None:
    assert failure_text(0xA7FF) == "0xA7FF refused: out of resources"
    assert failure_text(0xA900) == "0xA900 error: data set does not match SOP class"
    assert failure_text(0xC000) == "0xC000 error: cannot understand"
    assert failure_text(0xC122) == "0xC122 refused: transfer syntax not supported"
    assert failure_text(0x0110) == "0x0110 processing failure"
    assert failure_text(0x0122) == "0x0122 refused: SOP class not supported"
    assert failure_text(0x0124) == "0x0124 refused: not authorized"
    assert failure_text(0xB000) == "0xB000 coercion of data elements"
    assert failure_text(0x1234) == "0x1234 unknown failure"
    assert warning_text(0xB007) == "0xB007 data set does not match SOP class"


@pytest.mark.parametrize("report, content_type", [(json_report, "application/dicom+json"),
                                                  (xml_report, "application/dicom+xml; charset=utf-8"),
                                                  (json_report, ""), (xml_report, "text/plain")])
def test_partial_success_202(report, content_type) -> None:  # type: ignore[no-untyped-def]
    """202: the report says what was stored; an instance it does not mention failed."""
    body = report({A: None, B: 0xB006}, {C: 0xC000})
    response = interpret_response(202, content_type, body, [A, B, C, D])
    assert response.status == 202
    assert list(response.results) == [A, B, C, D]
    assert response.results[A] == InstanceResult(A, True)
    assert response.results[B] == InstanceResult(B, True, "0xB006 elements discarded", "0xB006 elements discarded")
    assert response.results[C] == InstanceResult(C, False, "0xC000 error: cannot understand")
    assert response.results[D] == InstanceResult(D, False, "not in the response")
    assert [r.sop_instance_uid for r in response.stored] == [A, B]
    assert [r.sop_instance_uid for r in response.failed] == [C, D]


@pytest.mark.parametrize("report", [json_report, xml_report])
def test_all_failed_409(report) -> None:  # type: ignore[no-untyped-def]
    body = report({}, {A: 0x0122, B: 0xA900, C: 0x0124})
    response = interpret_response(409, "application/dicom+json" if report is json_report else "application/dicom+xml",
                                  body, [A, B, C])
    assert response.status == 409
    assert {uid: (r.ok, r.reason) for uid, r in response.results.items()} == {
        A: (False, "0x0122 refused: SOP class not supported"),
        B: (False, "0xA900 error: data set does not match SOP class"),
        C: (False, "0x0124 refused: not authorized"),
    }


def test_409_without_a_report_fails_every_instance() -> None:
    response = interpret_response(409, "text/html", b"<html>conflict</html>", [A, B])
    assert not any(r.ok for r in response.results.values())
    assert response.results[A].reason.startswith("not in the response (HTTP 409, ")


def test_200_needs_the_instance_in_the_report() -> None:
    """PS3.18 lists every stored instance; Orthanc answers 200 with an empty list for a part it dropped."""
    body = json_report({A: None}, {})
    response = interpret_response(200, "application/dicom+json", body, [A, B])
    assert response.results == {A: InstanceResult(A, True), B: InstanceResult(B, False, "not in the response")}
    orthanc_dropped = json.dumps({"00081190": {"vr": "UR", "Value": ["http://o/dicom-web/studies"]},
                                  "00081198": {"vr": "SQ", "Value": []}, "00081199": {"vr": "SQ", "Value": []}}).encode()
    assert not interpret_response(200, "application/dicom+json", orthanc_dropped, [A]).results[A].ok
    # A 200 that lists a failure is recorded as it says.
    mixed = interpret_response(200, "application/dicom+json", json_report({A: None}, {B: 0x0110}), [A, B])
    assert mixed.results[B] == InstanceResult(B, False, "0x0110 processing failure")


def test_200_without_a_report_means_all_stored() -> None:
    for content_type, body in [("", b""), ("text/html", b"<html>ok</html>"), ("application/json", b"{}")]:
        response = interpret_response(200, content_type, body, [A, B])
        assert response.results == {A: InstanceResult(A, True), B: InstanceResult(B, True)}
    assert interpret_response(204, "", b"", [A]).results[A].ok


def test_a_4xx_with_a_report_is_recorded_per_instance() -> None:
    """Orthanc: 400 when a part is not DICOM; the good parts are stored and listed."""
    response = interpret_response(400, "application/dicom+json", json_report({A: None}, {}), [A, B])
    assert response.status == 400
    assert response.results[A] == InstanceResult(A, True)
    assert response.results[B] == InstanceResult(B, False, "not in the response, HTTP 400 Bad Request")
    # Orthanc's own error document is not a report: the whole request is refused.
    orthanc_error = b'{"HttpError": "Unsupported Media Type", "HttpStatus": 415, "OrthancError": "Bad request"}'
    with pytest.raises(StowRefusedError, match=r"HTTP 415 Unsupported Media Type: .*OrthancError"):
        interpret_response(415, "application/json", orthanc_error, [A])
    with pytest.raises(StowRefusedError) as caught:
        interpret_response(401, "", b"", [A])
    assert str(caught.value) == "HTTP 401 Unauthorized" and caught.value.body == ""


def test_report_variants() -> None:
    # A top-level array, lowercase tags, codes as strings, an instance in both sequences (failed wins).
    body = json.dumps([{
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [A]}},
                                            {"00081155": {"vr": "UI", "Value": [B]}}]},
        "0008119a": {"vr": "SQ", "Value": []},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [B]},
                                            "00081197": {"vr": "US", "Value": ["A701"]}}]},
    }]).encode()
    report = parse_json_report(body)
    assert report.stored == {A: ""}
    assert report.failed == {B: "0xA701 refused: out of resources"}
    # XML without a namespace and with keywords only.
    xml = (b'<NativeDicomModel><DicomAttribute keyword="FailedSOPSequence" vr="SQ"><Item number="1">'
           b'<DicomAttribute keyword="ReferencedSOPInstanceUID" vr="UI"><Value number="1"> 1.2.3.1 </Value></DicomAttribute>'
           b'<DicomAttribute keyword="FailureReason" vr="US"><Value number="1">272</Value></DicomAttribute>'
           b'</Item></DicomAttribute></NativeDicomModel>')
    assert parse_xml_report(xml).failed == {A: "0x0110 processing failure"}
    # The XML report as the only part of a multipart/related answer.
    multipart = (b"--xyz\r\nContent-Type: application/dicom+xml\r\n\r\n" + xml_report({A: None}, {B: 0xC000})
                 + b"\r\n--xyz--\r\n")
    report = parse_report('multipart/related; type="application/dicom+xml"; boundary=xyz', multipart)
    assert report.stored == {A: ""} and report.failed == {B: "0xC000 error: cannot understand"}


@pytest.mark.parametrize("body", [b"", b"   ", b"{not json", b"<html><body>oops</body></html>", b"<unclosed", b"plain text",
                                  b'"a string"', b"[1, 2]"])
def test_reports_not_understood(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_report("", body)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses(status: int) -> None:
    with pytest.raises(StowTransientError) as caught:
        interpret_response(status, "text/plain", b"busy,\n  try later", [A], retry_after=30.0)
    assert caught.value.status == status
    assert caught.value.retry_after == 30.0
    assert str(caught.value).startswith(f"HTTP {status} ")
    assert "busy, try later" in str(caught.value)


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 405, 413, 415, 501])
def test_refused_statuses(status: int) -> None:
    body = b'{"error": "no"}' + b"x" * 2000
    with pytest.raises(StowRefusedError) as caught:
        interpret_response(status, "application/json", body, [A])
    error = caught.value
    assert error.status == status
    assert str(error).startswith(f"HTTP {status} ") and '{"error": "no"}' in str(error)
    assert len(str(error)) < 400  # a short body, not the whole answer
    assert not isinstance(error, StowTransientError)


# ------------------------------------------------------------------------------------------------
# The request


def _outgoing(uid: str, data: bytes, piece: int = 3) -> Outgoing:
    return Outgoing(uid, CTImageStorage, len(data), lambda: (data[i:i + piece] for i in range(0, len(data), piece)))


# Bodies that look like framing: a boundary-like line, CRLFs, and an empty-looking end.
BODY_A = b"DICM\r\n--not-the-boundary\r\n\r\n\x00\xff" * 3
BODY_B = b"\r\n\r\n--\r\n"


def test_multipart_body_exact_bytes() -> None:
    items = [_outgoing(A, BODY_A), _outgoing(B, BODY_B)]
    body = b"".join(multipart_pieces("bnd", items))
    assert body == (
        b"--bnd\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % len(BODY_A) + BODY_A
        + b"\r\n--bnd\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % len(BODY_B) + BODY_B
        + b"\r\n--bnd--\r\n")
    assert content_length("bnd", items) == len(body)


@pytest.mark.parametrize("chunked", [False, True])
def test_multipart_body_parses_back(chunked: bool) -> None:
    """The body as a MIME parser reads it, with the very headers the request would carry."""
    target = StowTarget("http://pacs.example:8042/dicom-web/", SECRET, chunked=chunked)
    items = [_outgoing(A, BODY_A), _outgoing(B, BODY_B, piece=1), _outgoing(C, b"")]
    boundary = "dicomfs-0123456789abcdef"
    body = b"".join(_gathered(multipart_pieces(boundary, items)))
    length = None if chunked else content_length(boundary, items)
    headers = request_headers(target, boundary, length)
    assert headers["Accept"] == "application/dicom+json"
    assert headers["Authorization"] == SECRET
    if chunked:
        assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    else:
        assert headers["Content-Length"] == str(len(body)) and "Transfer-Encoding" not in headers
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body)
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [BODY_A, BODY_B, b""]
    assert [p["Content-Length"] for p in parts] == [str(len(BODY_A)), str(len(BODY_B)), "0"]
    assert message.defects == [] and all(p.defects == [] for p in parts)


def test_content_length_of_a_random_boundary_and_large_parts() -> None:
    big = bytes(range(256)) * 1000  # 256 kB, passed on in pieces larger than the gathering size
    items = [Outgoing.from_bytes(A, CTImageStorage, big, piece=100_000), _outgoing(B, b"x" * 10)]
    from dicomfs.jobs.stowrs import new_boundary
    boundary = new_boundary()
    assert boundary != new_boundary()
    pieces = list(_gathered(multipart_pieces(boundary, items)))
    assert sum(len(p) for p in pieces) == content_length(boundary, items)
    assert max(len(p) for p in pieces) == 100_000  # streamed, never the whole instance in one piece
    assert big in b"".join(pieces)


def test_instances_are_read_lazily_one_after_the_other() -> None:
    opened: list[str] = []

    def reader(uid: str) -> Outgoing:
        def chunks() -> Iterator[bytes]:
            opened.append(uid)
            yield b"abc"
        return Outgoing(uid, CTImageStorage, 3, chunks)

    pieces = multipart_pieces("b", [reader(A), reader(B)])
    assert next(pieces).startswith(b"--b\r\n") and opened == []
    assert next(pieces) == b"abc" and opened == [A]
    list(pieces)
    assert opened == [A, B]


def test_a_wrong_size_or_a_failing_read_stops_the_body() -> None:
    with pytest.raises(StowSourceError, match="has 5 bytes, not the 6 bytes announced") as caught:
        list(multipart_pieces("b", [Outgoing(A, CTImageStorage, 6, lambda: iter([b"12345"]))]))
    assert caught.value.sop_instance_uid == A
    with pytest.raises(StowSourceError, match="has more than the 6 bytes announced"):
        list(multipart_pieces("b", [Outgoing(A, CTImageStorage, 6, lambda: iter([b"12345", b"67"]))]))

    def deleted() -> Iterator[bytes]:
        raise NotFoundError("no such instance")

    with pytest.raises(StowSourceError, match="could not be read: no such instance") as caught:
        list(multipart_pieces("b", [Outgoing(B, CTImageStorage, 6, deleted)]))
    assert isinstance(caught.value.__cause__, NotFoundError)
    assert isinstance(caught.value, StowTransientError)  # nothing counts as sent: the engine tries again


def test_target_hides_its_authorization_and_checks_its_url() -> None:
    target = StowTarget("https://pacs.example/dicom-web", SECRET, tls_verify=False)
    assert SECRET not in repr(target) and "s3cr3t" not in repr(target)
    assert target.studies_url == "https://pacs.example/dicom-web/studies"
    assert StowTarget("http://h:8042/", None).studies_url == "http://h:8042/studies"
    for url in ["ftp://pacs/dicom-web", "pacs/dicom-web", "http:///dicom-web", "http://h:port/x", "http://h/x#frag"]:
        with pytest.raises(ConfigError):
            StowTarget(url, None)
    with pytest.raises(ConfigError) as caught:
        StowTarget("http://admin:hunter2@pacs/dicom-web", None)
    assert "hunter2" not in str(caught.value)
    for bad in ["Bearer abc\r\nX-Evil: 1", "", "Basic \x00"]:
        with pytest.raises(ConfigError) as caught:
            StowTarget("http://pacs/dicom-web", bad)
        assert bad.strip() == "" or bad not in str(caught.value)
    with pytest.raises(ConfigError):
        StowTarget("http://pacs/dicom-web", None, timeout=0)


def test_send_checks_its_batch() -> None:
    target = StowTarget("http://127.0.0.1:9/dicom-web", SECRET)
    with pytest.raises(ValueError, match="no instances"):
        send(target, [])
    with pytest.raises(ValueError, match="twice"):
        send(target, [_outgoing(A, b"x"), _outgoing(A, b"y")])


def test_send_to_a_closed_port_is_transient_and_keeps_the_secret() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: refused at once.
    target = StowTarget(f"http://127.0.0.1:{port}/dicom-web", SECRET, timeout=5)
    with pytest.raises(StowTransientError) as caught:
        send(target, [_outgoing(A, BODY_A)])
    message = str(caught.value)
    assert f"127.0.0.1:{port}/dicom-web/studies" in message and "connecting" in message
    assert "s3cr3t" not in message and "s3cr3t" not in repr(caught.value.args)


class _Archive(http.server.ThreadingHTTPServer):
    """Answers every POST with a report storing A; counts the connections it accepted and, with
    ``drop``, closes each after its answer without saying so (as a server timing out an idle one)."""

    daemon_threads = True

    def __init__(self, drop: bool) -> None:
        self.drop, self.connections, self.bodies = drop, 0, 0
        super().__init__(("127.0.0.1", 0), _ArchiveHandler)


class _ArchiveHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Archive

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies += 1
        answer = json.dumps({"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [A]}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        self.wfile.flush()
        if self.server.drop:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["keep-alive", "dropped"])
def archive(request: pytest.FixtureRequest) -> Iterator[_Archive]:
    server = _Archive(drop=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _send_three_times(archive: _Archive) -> None:
    """Three one-instance requests through one client: each stored, over one connection unless
    the archive drops them."""
    client = StowClient(StowTarget(f"http://127.0.0.1:{archive.server_address[1]}/dicom-web", SECRET, timeout=5))
    try:
        for _ in range(3):
            assert client.send([_outgoing(A, BODY_A)]).stored == [InstanceResult(A, True)]
    finally:
        client.close()
    assert archive.bodies == 3
    assert archive.connections == (3 if archive.drop else 1)


def test_client_keeps_its_connection_and_replaces_one_the_server_closed(archive: _Archive) -> None:
    _send_three_times(archive)


def test_client_sends_again_anew_when_a_reused_connection_was_closed_unseen(archive: _Archive,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The server closes between the client's look and its request: the request fails on the old
    # connection before any answer, and goes once more on a new one.
    monkeypatch.setattr(links, "closed_by_peer", lambda sock: False)
    _send_three_times(archive)


# ------------------------------------------------------------------------------------------------
# Transfer syntaxes


def test_choose_syntax() -> None:
    jpeg, explicit, implicit = str(JPEGLosslessSV1), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
    rle = str(RLELossless)
    assert choose_syntax(jpeg, frozenset()) is None  # no list: everything as stored
    assert choose_syntax(jpeg, frozenset({jpeg, explicit})) is None
    assert choose_syntax(rle, frozenset({jpeg, explicit, implicit})) == explicit
    assert choose_syntax(rle, frozenset({jpeg, implicit})) == implicit
    assert choose_syntax(rle, frozenset({jpeg})) == explicit  # decompressed anyway
    assert choose_syntax(explicit, frozenset({jpeg})) is None  # already what it would become
    assert choose_syntax(implicit, frozenset({jpeg})) == explicit
    assert choose_syntax(explicit, frozenset({implicit})) == implicit


def test_parse_syntaxes() -> None:
    assert parse_syntaxes([]) == frozenset()
    assert parse_syntaxes(["JPEGLosslessSV1", "1.2.840.10008.1.2.1", " explicitvrlittleendian ", ""]) == frozenset(
        {JPEGLosslessSV1, ExplicitVRLittleEndian})
    assert parse_syntaxes(["JPEGBaseline8Bit,JPEG2000Lossless", "1.2.840.10008.1.2.4.52"]) == frozenset(
        {JPEGBaseline8Bit, JPEG2000Lossless, UID("1.2.840.10008.1.2.4.52")})  # a retired one too


@pytest.mark.parametrize("value, named", [
    ("JPEGLossy", "'JPEGLossy'"),
    ("CTImageStorage", "'CTImageStorage'"),
    ("1.2.840.10008.5.1.4.1.1.2", "CT Image Storage, not a transfer syntax"),
    ("1.2.840.10008.1.2.4.999", "not a transfer syntax UID pydicom knows"),
])
def test_parse_syntaxes_errors(value: str, named: str) -> None:
    with pytest.raises(ConfigError, match="unknown transfer syntax") as caught:
        parse_syntaxes(["ExplicitVRLittleEndian", value])
    assert named in str(caught.value)


# ------------------------------------------------------------------------------------------------
# Transcoding


def _instance_bytes(syntax: str, **kwargs: object) -> tuple[pydicom.Dataset, bytes]:
    ds = make_instance(patient_id="P1", patient_name="TEST^T", study_uid="1.2.9", series_uid="1.2.9.1",
                       sop_uid="1.2.9.1.1", transfer_syntax=syntax, rows=32, columns=24, **kwargs)  # type: ignore[arg-type]
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return ds, out.getvalue()


@pytest.mark.parametrize("stored", [RLELossless, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("modality, frames", [("CT", 1), ("US", 3)])
def test_transcoded_decodes_to_the_same_pixels(stored: str, target: str, modality: str, frames: int) -> None:
    reference, _ = _instance_bytes(ExplicitVRLittleEndian, modality=modality, frames=frames)
    original, data = _instance_bytes(stored, modality=modality, frames=frames)
    assert pydicom.dcmread(BytesIO(data)).file_meta.TransferSyntaxUID == stored
    result = pydicom.dcmread(BytesIO(transcoded(data, target)))
    assert result.file_meta.TransferSyntaxUID == target
    assert result.SOPInstanceUID == original.SOPInstanceUID == "1.2.9.1.1"
    assert result.PatientName == "TEST^T" and result.Modality == modality
    assert np.array_equal(result.pixel_array, reference.pixel_array)
    assert result.PixelData == reference.PixelData  # the very bytes of the never-compressed instance


def test_transcoded_refuses_other_targets() -> None:
    _, data = _instance_bytes(RLELossless)
    with pytest.raises(ValueError, match="only to Explicit or Implicit"):
        transcoded(data, JPEGBaseline8Bit)


def _fake_compressed(syntax: str) -> bytes:
    ds, _ = _instance_bytes(ExplicitVRLittleEndian)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])  # not a real image: decoding must fail one way or another
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_transcoded_says_what_to_install() -> None:
    from pydicom.pixels.decoders.base import get_decoder
    with pytest.raises(TranscodeError) as caught:
        transcoded(_fake_compressed(JPEGBaseline8Bit), ExplicitVRLittleEndian)
    if not get_decoder(JPEGBaseline8Bit).is_available:
        assert "JPEG Baseline (Process 1)" in str(caught.value)
        assert "pip install pylibjpeg pylibjpeg-libjpeg" in str(caught.value)
    with pytest.raises(TranscodeError) as caught:
        transcoded(_fake_compressed(JPEG2000Lossless), ExplicitVRLittleEndian)
    if not get_decoder(JPEG2000Lossless).is_available:
        assert "pip install pylibjpeg pylibjpeg-openjpeg" in str(caught.value)
    with pytest.raises(TranscodeError, match="pydicom cannot decode MPEG2"):
        transcoded(_fake_compressed(MPEG2MPML), ExplicitVRLittleEndian)


def test_transcoded_rejects_what_is_not_dicom() -> None:
    with pytest.raises(TranscodeError, match="cannot read"):
        transcoded(b"not a DICOM file at all", ExplicitVRLittleEndian)
