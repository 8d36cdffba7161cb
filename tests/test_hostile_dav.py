"""Hostile WebDAV requests through a real cheroot bridge on 127.0.0.1 (issue #22): rights on every
method and path, locks, dead properties and XML bodies, names the bridge cannot show, hostile
roots and destinations, and ranges that are not what they seem."""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dicomfs.passwords import hash_password
from dicomfs.samples import Corpus
from tests.test_webdav import (ALICE_PASSWORD, BOB_PASSWORD, CAROL_PASSWORD, DAV, dicom_file, propfind, running, uid_path,
                               users_config)

pytestmark = pytest.mark.timeout(120)

ALICE, BOB, CAROL = ("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD), ("carol", CAROL_PASSWORD)
DAVE, ERIN, FRANK = ("dave", "dave uploads only"), ("erin", "erin deletes only"), ("frank", "frank transfers only")
LOCK = (b'<?xml version="1.0" encoding="utf-8" ?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
        b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>someone</D:href></D:owner></D:lockinfo>')


def hostile_users() -> str:
    """alice (all), bob (read), carol (read, upload), and users without the read right."""
    extra = "".join(f'[users.{name}]\npassword_hash = "{hash_password(password)}"\nrights = ["{right}"]\n'
                    for (name, password), right in ((DAVE, "upload"), (ERIN, "delete"), (FRANK, "transfer")))
    return users_config() + extra


def patch(name: str, value: bytes) -> bytes:
    return (b'<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:x="urn:example"><D:set><D:prop>'
            + f"<x:{name}>".encode() + value + f"</x:{name}>".encode() + b"</D:prop></D:set></D:propertyupdate>")


# -- rights --------------------------------------------------------------------------------------


def test_nothing_of_the_views_answers_a_user_without_the_read_right(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, hostile_users(), corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        patient = next(href for href in propfind(bridge, "/by-patients/", auth=ALICE) if href != "/by-patients/")
        paths = ["/by-patients/", "/by-patients", patient, "/BY-PATIENTS/", "/jobs/", f"/by-uids/{sample.study_uid}/",
                 uid_path(sample), f"/by-uids/{sample.study_uid}/study.json", "/by-patients/nobody/"]
        for user in (DAVE, ERIN, FRANK):
            for path in paths:
                for method, headers in (("GET", {}), ("HEAD", {}), ("OPTIONS", {}), ("PROPFIND", {"Depth": "1"}),
                                        ("PROPPATCH", {})):
                    answer = bridge.request(method, path, patch("a", b"b") if method == "PROPPATCH" else None,
                                            headers, auth=user)
                    assert answer.status == 403, (user[0], method, path, answer.status, answer.body[:200])
                    assert sample.patient_id.encode() not in answer.body and b"by-patients/" not in answer.body
        # the root shows only the fixed names of the views; uploads/ is the uploader's to see
        assert propfind(bridge, "/", auth=DAVE)
        assert bridge.request("GET", "/", auth=DAVE).status == 200
        assert sample.patient_id.encode() not in bridge.request("GET", "/", auth=DAVE).body
        assert bridge.request("PUT", "/uploads/mine.txt", b"mine", auth=DAVE).status == 201
        assert "/uploads/mine.txt" in propfind(bridge, "/uploads/", auth=DAVE)
        assert bridge.request("GET", "/uploads/", auth=DAVE).status == 200
        assert bridge.request("GET", "/:dir_browser/style.css", auth=DAVE).status == 200  # the listing's style
        assert bridge.request("GET", "/uploads/mine.txt", auth=DAVE).body == b"mine"
        for user in (ERIN, FRANK):  # neither reads nor uploads: uploads/ is not theirs either
            assert bridge.request("PROPFIND", "/uploads/", headers={"Depth": "1"}, auth=user).status == 403
            assert bridge.request("GET", "/uploads/mine.txt", auth=user).status == 403
        assert bridge.request("DELETE", uid_path(sample), auth=ERIN).status == 204


def test_a_lock_needs_the_right_to_write_what_it_covers_and_expires_within_the_cap(tmp_path: Path) -> None:
    with running(tmp_path, hostile_users()) as bridge:
        for path, depth in (("/", "infinity"), ("/uploads/", "infinity"), ("/UPLOADS/x.txt", "0"),
                            ("/Uploads/y.txt", "0"), ("/by-patients/", "infinity")):
            refused = bridge.request("LOCK", path, LOCK, {"Depth": depth, "Timeout": "Infinite"}, auth=BOB)
            assert refused.status == 403, (path, refused.status, refused.body[:200])
        assert bridge.uploads() == []
        assert bridge.request("PUT", "/uploads/a.txt", b"a", auth=CAROL).status == 201
        assert bridge.request("MKCOL", "/uploads/f", auth=CAROL).status == 201
        # a path in another case is the same resource: its lock is the lock of the canonical path
        locked = bridge.request("LOCK", "/UPLOADS/b.txt", LOCK, {"Depth": "0", "Timeout": "Infinite"}, auth=CAROL)
        assert locked.status == 201, locked.body[:200]
        timeout = ET.fromstring(locked.body).findtext(f".//{DAV}timeout")
        assert timeout is not None and timeout.startswith("Second-") and int(timeout[7:]) <= 3600
        assert bridge.request("PUT", "/uploads/b.txt", b"b", auth=ALICE).status == 423
        token = locked.headers["lock-token"]
        assert bridge.request("UNLOCK", "/uploads/b.txt", headers={"Lock-Token": token}, auth=CAROL).status == 204
        assert bridge.request("PUT", "/uploads/b.txt", b"b", auth=ALICE).status in (201, 204)


# -- names ---------------------------------------------------------------------------------------


def test_a_name_that_is_not_utf8_in_uploads_never_breaks_a_listing(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        uploads = os.fsencode(bridge.store.folder / "uploads")
        os.mkdir(os.path.join(uploads, b"folder\xff"))
        Path(os.fsdecode(os.path.join(uploads, b"bad\xff\xfe.txt"))).write_bytes(b"x")
        assert bridge.request("PUT", "/uploads/good.txt", b"good").status == 201
        listed = propfind(bridge, "/uploads/")
        assert "/uploads/good.txt" in listed and len(listed) == 2, sorted(listed)
        page = bridge.request("GET", "/uploads/")
        assert page.status == 200 and b"good.txt" in page.body
        assert bridge.request("PROPFIND", "/", headers={"Depth": "1"}).status == 207
        assert bridge.request("DELETE", "/uploads/folder%FF").status in (400, 404)


def test_overlong_names_hostile_roots_and_destinations_get_4xx(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        url, long = bridge.client.url, "n" * 300
        assert bridge.request("PUT", "/uploads/a.txt", b"a").status == 201
        answers = {
            "MKCOL long": bridge.request("MKCOL", f"/uploads/{long}"),
            "PUT long": bridge.request("PUT", f"/uploads/{long}", b"x", {"Content-Range": "bytes 0-0/1"}),
            "COPY to long": bridge.request("COPY", "/uploads/a.txt", headers={"Destination": f"{url}uploads/{long}"}),
            "MOVE to long": bridge.request("MOVE", "/uploads/a.txt", headers={"Destination": f"{url}uploads/{long}"}),
            "DELETE /": bridge.request("DELETE", "/"),
            "COPY /": bridge.request("COPY", "/", headers={"Destination": f"{url}uploads/root"}),
            "MOVE /": bridge.request("MOVE", "/", headers={"Destination": f"{url}uploads/root"}),
            "MOVE to /": bridge.request("MOVE", "/uploads/a.txt", headers={"Destination": url}),
            "COPY to empty": bridge.request("COPY", "/uploads/a.txt", headers={"Destination": ""}),
            "COPY to another host": bridge.request("COPY", "/uploads/a.txt",
                                                   headers={"Destination": "http://elsewhere.example/uploads/b.txt"}),
            "MOVE to junk": bridge.request("MOVE", "/uploads/a.txt", headers={"Destination": "http://[::1"}),
        }
        for what, answer in answers.items():
            assert 400 <= answer.status < 500 or answer.status == 502, (what, answer.status, answer.body[:200])
        assert answers["DELETE /"].status == 403 and answers["COPY to another host"].status == 502
        assert answers["COPY to empty"].status == 400
        assert bridge.uploads() == ["a.txt"]
        deep = "/uploads"
        for _ in range(20):  # names of 250 bytes, until the path is longer than the file system takes
            deep += "/" + "d" * 250
            made = bridge.request("MKCOL", deep)
            if made.status != 201:
                break
        assert made.status == 400, (made.status, made.body[:200])
        assert b"too long" in made.body and bridge.request("PUT", deep + "/x.txt", b"x").status == 409
        assert bridge.store.folder.joinpath("uploads").is_dir() and len(bridge.instances()) == small_corpus.instances


def test_a_lock_refused_with_423_leaves_no_file(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        assert bridge.request("MKCOL", "/uploads/held").status == 201
        held = bridge.request("LOCK", "/uploads/held/", LOCK, {"Depth": "infinity", "Timeout": "Second-60"})
        assert held.status == 200
        refused = bridge.request("LOCK", "/uploads/held/new.txt", LOCK, {"Depth": "0"})
        assert refused.status == 423
        assert bridge.uploads() == [] and not (bridge.store.folder / "uploads" / "held" / "new.txt").exists()


# -- bodies and properties -----------------------------------------------------------------------


def test_dead_properties_are_bounded(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        assert bridge.request("PUT", "/uploads/a.txt", b"a").status == 201
        small = bridge.request("PROPPATCH", "/uploads/a.txt", patch("small", b"v"))
        assert small.status == 207 and b"200 OK" in small.body
        big = bridge.request("PROPPATCH", "/uploads/a.txt", patch("big", b"v" * (100 << 10)))
        assert big.status == 207 and b"507" in big.body and b"200 OK" not in big.body
        huge = bridge.request("PROPPATCH", "/uploads/a.txt", patch("huge", b"v" * (2 << 20)))
        assert huge.status == 413
        for index in range(99):
            assert b"200 OK" in bridge.request("PROPPATCH", "/uploads/a.txt", patch(f"p{index}", b"v")).body
        over = bridge.request("PROPPATCH", "/uploads/a.txt", patch("one_too_many", b"v"))
        assert over.status == 207 and b"507" in over.body
        assert len(bridge.bridge.properties.get_properties("/uploads/a.txt")) == 100
        again = bridge.request("PROPPATCH", "/uploads/a.txt", patch("p0", b"w"))  # a new value of one kept is fine
        assert b"200 OK" in again.body
        for index in range(4):
            assert b"200 OK" in bridge.request("PROPPATCH", "/uploads/a.txt", patch(f"p{index}", b"v" * (60 << 10))).body
        total = bridge.request("PROPPATCH", "/uploads/a.txt", patch("p5", b"v" * (60 << 10)))
        assert b"507" in total.body  # 5 x 60 KiB is more than a resource keeps


def test_xml_bodies_are_bounded_and_entities_refused(tmp_path: Path, small_corpus: Corpus) -> None:
    laughs = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
              + b"".join(f'<!ENTITY lol{n + 1} "{("&lol" + str(n) + ";") * 10 if n else "&lol;" * 10}">'.encode()
                         for n in range(9))
              + b']><propfind xmlns="DAV:"><prop><getcontentlength>&lol9;</getcontentlength></prop></propfind>')
    with running(tmp_path, corpus=small_corpus) as bridge:
        assert bridge.request("PUT", "/uploads/a.txt", b"a").status == 201
        for path in ("/by-uids/", "/uploads/", "/"):
            started = time.monotonic()
            answer = bridge.request("PROPFIND", path, laughs, {"Depth": "1"})
            assert answer.status == 400 and time.monotonic() - started < 5, (path, answer.status, answer.body[:200])
            big = bridge.request("PROPFIND", path, b"<a>" + b" " * (2 << 20) + b"</a>", {"Depth": "0"})
            assert big.status == 413, (path, big.status)
        for method in ("PROPPATCH", "LOCK"):
            answer = bridge.request(method, "/uploads/a.txt", laughs.replace(b"propfind", b"propertyupdate"))
            assert answer.status == 400, (method, answer.status, answer.body[:200])
        assert propfind(bridge, "/by-uids/")


def test_dead_properties_go_with_their_upload(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        properties = bridge.bridge.properties
        data = dicom_file(tmp_path / "in", 1).read_bytes()
        assert bridge.request("PUT", "/uploads/kept.dcm", b"").status == 201
        locked = bridge.request("LOCK", "/uploads/kept.dcm", LOCK, {"Timeout": "Second-600"})
        token = locked.headers["lock-token"]
        assert bridge.request("PUT", "/uploads/kept.dcm", data, {"If": f"({token})"}).status == 204
        assert b"200 OK" in bridge.request("PROPPATCH", "/uploads/kept.dcm", patch("x", b"1"), {"If": f"({token})"}).body
        assert properties.get_properties("/uploads/kept.dcm")
        assert bridge.request("UNLOCK", "/uploads/kept.dcm", headers={"Lock-Token": token}).status == 204
        time.sleep(0.1)
        bridge.wait_ingested()
        assert bridge.uploads() == [] and len(bridge.instances()) == 1
        assert properties.get_properties("/uploads/kept.dcm") == []
        # removed by the janitor (a rejected file's time ran out) or by the mount: its properties go too
        assert bridge.request("MKCOL", "/uploads/d").status == 201
        assert bridge.request("PUT", "/uploads/d/note.txt", b"not dicom").status == 201
        assert b"200 OK" in bridge.request("PROPPATCH", "/uploads/d/note.txt", patch("x", b"1")).body
        assert bridge.request("DELETE", "/uploads/d").status == 204
        assert not properties.any_under("/uploads/d")
        assert bridge.request("PUT", "/uploads/swept.txt", b"not dicom").status == 201
        assert b"200 OK" in bridge.request("PROPPATCH", "/uploads/swept.txt", patch("x", b"1")).body
        (bridge.store.folder / "uploads" / "swept.txt").unlink()
        deadline = time.monotonic() + 15  # the janitor passes every 5 s
        while properties.any_under("/uploads/swept.txt") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not properties.any_under("/uploads/swept.txt")


# -- ranges --------------------------------------------------------------------------------------


def test_a_range_is_honoured_exactly_or_ignored(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        path, source = uid_path(sample), sample.path.read_bytes()
        size = len(source)
        for header in ("bytes=5-2", "items=0-1", "bytes=-0", "bytes 0-1", "bytes=0-1,5-6", "bytes=x-", "bytes=--1",
                       "bytes=0-1, 1-2, 0-0", "bytes=1-2junk"):
            answer = bridge.request("GET", path, headers={"Range": header})
            assert answer.status in (200, 416), (header, answer.status, answer.headers.get("content-range"))
            if answer.status == 200:
                assert answer.body == source, header
            else:
                assert answer.headers.get("content-range") == f"bytes */{size}", header
        exact = {"bytes=0-1": source[0:2], "bytes=-3": source[-3:], f"bytes={size - 2}-": source[-2:],
                 f"bytes=0-{size * 2}": source, "BYTES=2-3": source[2:4]}
        for header, expected in exact.items():
            answer = bridge.request("GET", path, headers={"Range": header})
            assert answer.status == 206 and answer.body == expected, (header, answer.status)
        assert bridge.request("GET", path, headers={"Range": f"bytes={size}-"}).status == 416
