"""The hrefs the bridge writes: percent-encoded but for RFC 3986's unreserved characters and ``/``,
the same in every place (the fast PROPFIND, wsgidav's own, lock discovery, redirects, the HTML
listing), whatever form of the name the request used. neon (cadaver) escapes ``(`` as ``%28``
and compares the href it asked for with the one it got: ``(no name)`` folders failed to open."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from dicomfs.samples import Corpus, write_corpus
from tests.test_webdav import fast_and_default, running, written_here

DAV = "{DAV:}"
ENCODED = re.compile(r"(?:[A-Za-z0-9._~/-]|%[0-9A-F]{2})*")
"""An href as RFC 3986 unreserved characters, ``/`` and upper-case escapes, nothing else."""
PATIENT = "TRICKY-EMPTY-VALUES - (no name)"
STUDY = "(no date) - (no description)"
LOCKINFO = (b'<?xml version="1.0"?><lockinfo xmlns="DAV:"><lockscope><exclusive/></lockscope>'
            b"<locktype><write/></locktype><owner>test</owner></lockinfo>")


@pytest.fixture(scope="module")
def tricky(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The edge cases: a patient without a name, a study without date nor description."""
    return write_corpus(tmp_path_factory.mktemp("tricky") / "corpus", patients=0, tricky=True, seed=5)


def hrefs(answer_body: bytes) -> list[str]:
    return [element.text or "" for element in ET.fromstring(answer_body).iter(DAV + "href")]


def assert_encoded(found: list[str]) -> None:
    assert found
    for href in found:
        assert ENCODED.fullmatch(href), href


def test_propfind_hrefs_are_encoded_alike_on_both_paths_whatever_the_request_sent(tmp_path: Path, tricky: Corpus) -> None:
    patient = "/by-patients/" + quote(PATIENT) + "/"
    assert "%28no%20name%29" in patient
    with running(tmp_path, corpus=tricky) as bridge:
        answers = []
        for sent in (patient, patient.replace("%28", "(").replace("%29", ")")):
            fast, default = fast_and_default(bridge, sent)
            assert written_here(fast) and not written_here(default)
            assert hrefs(fast.body) == hrefs(default.body)
            answers.append(hrefs(fast.body))
        assert answers[0] == answers[1]
        found = answers[0]
        assert_encoded(found)
        # the target comes back as the client would escape it, its members inside it
        assert found[0] == patient
        assert patient + quote(STUDY) + "/" in found
        assert [unquote(href) for href in found][:2] == [f"/by-patients/{PATIENT}/", f"/by-patients/{PATIENT}/{STUDY}/"]
        # Depth 0 of a file, both paths
        series = next(href for href in hrefs(bridge.request("PROPFIND", found[1], headers={"Depth": "1"}).body)
                      if href != found[1])
        file = next(href for href in hrefs(bridge.request("PROPFIND", series, headers={"Depth": "1"}).body)
                    if href.endswith(".dcm"))
        fast, default = fast_and_default(bridge, file, depth="0")
        assert hrefs(fast.body) == hrefs(default.body) == [file]
        assert_encoded([series, file])
        # the root and uploads/ are wsgidav's: the same rule
        assert bridge.request("MKCOL", "/uploads/cd%20(1)/").status == 201
        assert bridge.request("PUT", "/uploads/cd%20(1)/a%27s%20notes%20%5B2%5D.txt", b"not dicom").status == 201
        for folder in ("/", "/uploads/", "/uploads/cd%20(1)/"):
            answer = bridge.request("PROPFIND", folder, headers={"Depth": "1"})
            assert answer.status == 207 and not written_here(answer)
            assert_encoded(hrefs(answer.body))
        assert hrefs(bridge.request("PROPFIND", "/uploads/cd%20(1)/", headers={"Depth": "1"}).body) == [
            "/uploads/cd%20%281%29/", "/uploads/cd%20%281%29/a%27s%20notes%20%5B2%5D.txt"]


def test_lock_discovery_and_its_lockroot_are_encoded(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        target = "/uploads/scan%20(1).dcm"
        locked = bridge.request("LOCK", target, LOCKINFO, {"Timeout": "Second-60"})
        assert locked.status in (200, 201), locked.body[:300]
        root = ET.fromstring(locked.body).findtext(f".//{DAV}lockroot/{DAV}href")
        assert root == "/uploads/scan%20%281%29.dcm"
        discovered = bridge.request("PROPFIND", "/uploads/", b'<propfind xmlns="DAV:"><prop><lockdiscovery/></prop></propfind>',
                                    {"Depth": "1"})
        assert discovered.status == 207
        assert_encoded([href for href in hrefs(discovered.body) if not href.startswith("opaquelocktoken:")])
        assert "/uploads/scan%20%281%29.dcm" in hrefs(discovered.body)


def test_redirect_and_html_listing_links_are_encoded(tmp_path: Path, tricky: Corpus) -> None:
    with running(tmp_path, corpus=tricky) as bridge:
        patient = "/by-patients/" + quote(PATIENT)
        moved = bridge.request("GET", patient.replace("%28", "("), headers={"Accept": "text/html"})
        assert moved.status == 301 and moved.headers["location"] == patient + "/"
        page = bridge.request("GET", patient + "/", headers={"Accept": "text/html"})
        assert page.status == 200
        links = re.findall(r"""<a [^>]*href=["']([^"']*)["']""", page.body.decode())
        study = "./" + quote(STUDY) + "/"
        assert study in links, links
        assert all(ENCODED.fullmatch(link.removeprefix("./")) for link in links if link.startswith("./")), links
        # the link works
        assert bridge.request("GET", patient + "/" + study[2:], headers={"Accept": "text/html"}).status == 200


def test_hrefs_of_an_ordinary_listing_keep_their_shape(tmp_path: Path, tricky: Corpus) -> None:
    """Unreserved characters and '/' stay as they are; a space and '^' as before."""
    with running(tmp_path, corpus=tricky) as bridge:
        found = hrefs(bridge.request("PROPFIND", "/by-patients/", headers={"Depth": "1"}).body)
        assert "/by-patients/TRICKY-DEFLATED%20-%20TRICKY%5EDEFLATED/" in found
        assert_encoded(found)
