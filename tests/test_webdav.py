"""The WebDAV bridge through a real cheroot server on 127.0.0.1: reads, uploads, locks, deletes,
properties, users and rights, hostile paths, HTTPS, load, and the command line around it."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from bridge.propfind import PIECE_CHARACTERS
from bridge.server import Bridge, BridgeError
from dicomfs.cli import open_store
from dicomfs.config import load_config
from dicomfs.errors import ConfigError
from dicomfs.passwords import hash_password, verify_password
from dicomfs.samples import Corpus, SampleFile, make_instance, write_corpus, write_instance
from dicomfs.store import Instance, Store
from dicomfs.store.ids import Level
from tests.conftest import dicomfs_command, run_cli, self_signed_certificate
from tests.webdav_server import Answer, Client, serve

pytestmark = pytest.mark.timeout(120)

DAV = "{DAV:}"
UPLOADED_SERIES = "/by-uids/1.2.826.0.1.3680043.10.1/1.2.826.0.1.3680043.10.1.1"
"""Where the instances ``dicom_file`` makes are shown."""
ALICE_PASSWORD, BOB_PASSWORD, CAROL_PASSWORD = "correct horse battery", "bob's own secret", "carol uploads"


@dataclass
class Running:
    client: Client
    store: Store
    bridge: Bridge

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                auth: tuple[str, str] | None = None) -> Answer:
        return self.client.request(method, path, body, headers, auth)

    def instances(self) -> list[Instance]:
        return [r for r in self.store.walk(Level.INSTANCE) if isinstance(r, Instance)]

    def uploads(self) -> list[str]:
        root = self.store.folder / "uploads"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def wait_ingested(self, timeout: float = 20) -> None:
        assert self.bridge.provider.queue.wait_idle(timeout), "uploads still queued"


@contextlib.contextmanager
def running(tmp_path: Path, config: str = "", corpus: Corpus | None = None) -> Iterator[Running]:
    """A bridge in this process over a fresh store (holding ``corpus``), on a free loopback port."""
    config_file = tmp_path / "dicomfs.toml"
    config_file.write_text(config)
    loaded = load_config(config_file, store_folder=tmp_path / "store")
    store = open_store(loaded, create=True)
    try:
        if corpus is not None:
            list(store.ingest([corpus.root]))
        bridge = Bridge(store, loaded.config, bind="127.0.0.1:0")
        bridge.start()
        try:
            yield Running(Client(bridge.url), store, bridge)
        finally:
            bridge.stop()
    finally:
        store.close()


def propfind(target: Running | Client, path: str, depth: str = "1", body: bytes | None = None,
             auth: tuple[str, str] | None = None) -> dict[str, dict[str, ET.Element]]:
    """href -> {property name: element} of a 207 answer (properties found, status 200)."""
    answer = target.request("PROPFIND", path, body, {"Depth": depth}, auth=auth)
    assert answer.status == 207, (answer.status, answer.body[:300])
    found: dict[str, dict[str, ET.Element]] = {}
    for response in ET.fromstring(answer.body).iter(DAV + "response"):
        href = response.findtext(DAV + "href") or ""
        props: dict[str, ET.Element] = {}
        for propstat in response.iter(DAV + "propstat"):
            if "200" in (propstat.findtext(DAV + "status") or ""):
                for prop in propstat.find(DAV + "prop") or []:
                    props[prop.tag] = prop
        found[href] = props
    return found


def unique_files(corpus: Corpus) -> list[SampleFile]:
    """Valid files whose SOP Instance UID no other file shares (the store keeps the first of those)."""
    counts = Counter(f.sop_uid for f in corpus.valid_files)
    return [f for f in corpus.valid_files if counts[f.sop_uid] == 1]


def uid_path(corpus_file: object) -> str:
    f = corpus_file
    return f"/by-uids/{f.study_uid}/{f.series_uid}/{f.sop_uid}.dcm"  # type: ignore[attr-defined]


def dicom_file(folder: Path, index: int, *, patient: str = "WEBDAV") -> Path:
    """A small valid instance of its own (new UIDs for each ``index``)."""
    ds = make_instance(patient_id=patient, patient_name="UP^LOAD", study_uid="1.2.826.0.1.3680043.10.1",
                       series_uid="1.2.826.0.1.3680043.10.1.1", sop_uid=f"1.2.826.0.1.3680043.10.1.1.{index}",
                       instance_number=index, rows=16, columns=16, seed=index)
    path = folder / f"up{index:04d}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    write_instance(path, ds)
    return path


# -- reading -------------------------------------------------------------------------------------


def test_root_lists_the_views_and_uploads_and_infinite_depth_is_refused(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        listing = propfind(bridge, "/")
        assert sorted(listing) == ["/", "/by-dates/", "/by-patients/", "/by-studies/", "/by-uids/", "/jobs/", "/uploads/"]
        for depth in ("infinity", None):
            headers = {"Depth": depth} if depth else {}
            refused = bridge.request("PROPFIND", "/by-uids/", headers=headers)
            assert refused.status == 403
            assert b"propfind-finite-depth" in refused.body
        studies = propfind(bridge, "/by-uids/")
        assert len(studies) - 1 == small_corpus.studies
        options = bridge.request("OPTIONS", "/")
        assert "2" in options.headers["dav"] and options.headers.get("ms-author-via") == "DAV"
        assert bridge.request("PROPFIND", "/by-uids/desktop.ini", headers={"Depth": "0"}).status == 404


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_get_streams_exact_bytes_with_range_etag_and_types(tmp_path: Path, large_corpus: Corpus, codec: str) -> None:
    with running(tmp_path, f"[storage]\ncompression = '{codec}'\n", corpus=large_corpus) as bridge:
        for sample in large_corpus.valid_files:
            path = uid_path(sample)
            source = sample.path.read_bytes()
            whole = bridge.request("GET", path)
            assert whole.status == 200 and whole.body == source
            assert whole.headers["content-type"] == "application/dicom"
            assert int(whole.headers["content-length"]) == len(source)
            etag, modified = whole.headers["etag"], whole.headers["last-modified"]
            assert etag.startswith('"') and modified.endswith("GMT")
            start, length = len(source) // 2 + 123, min(100_000, len(source) // 3)  # a later block when large
            part = bridge.request("GET", path, headers={"Range": f"bytes={start}-{start + length - 1}"})
            assert part.status == 206 and part.body == source[start:start + length]
            assert part.headers["content-range"] == f"bytes {start}-{start + length - 1}/{len(source)}"
            assert bridge.request("GET", path, headers={"If-None-Match": etag}).status == 304
            head = bridge.request("HEAD", path)
            assert head.status == 200 and int(head.headers["content-length"]) == len(source)
            props = propfind(bridge, path, depth="0")[path]
            assert props[DAV + "getcontentlength"].text == str(len(source))
            assert DAV + "collection" not in ET.tostring(props[DAV + "resourcetype"]).decode()


def test_study_json_is_served_as_json(tmp_path: Path, small_corpus: Corpus) -> None:
    import json

    with running(tmp_path, corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        answer = bridge.request("GET", f"/by-uids/{sample.study_uid}/study.json")
        assert answer.status == 200 and answer.headers["content-type"] == "application/json"
        assert json.loads(answer.body)["MainDicomTags"]["StudyInstanceUID"] == sample.study_uid


def test_tags_and_metadata_are_properties_and_metadata_is_writable(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, "[metadata]\nReviewed = 1024\n", corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        path = uid_path(sample)
        ask = (b'<?xml version="1.0"?><propfind xmlns="DAV:" xmlns:d="urn:dicomfs"><prop>'
               b'<d:dicom.PatientID/><d:dicom.SOPInstanceUID/></prop></propfind>')
        props = propfind(bridge, path, depth="0", body=ask)[path]
        assert props["{urn:dicomfs}dicom.PatientID"].text == sample.patient_id
        assert props["{urn:dicomfs}dicom.SOPInstanceUID"].text == sample.sop_uid
        patch = (b'<?xml version="1.0"?><propertyupdate xmlns="DAV:" xmlns:d="urn:dicomfs"><set><prop>'
                 b'<d:dicomfs.meta.Reviewed>yes, by Dr Who</d:dicomfs.meta.Reviewed></prop></set></propertyupdate>')
        assert bridge.request("PROPPATCH", path, patch).status == 207
        instance_id = bridge.store.resolve_one(sample.sop_uid).id
        assert bridge.store.metadata(instance_id)["Reviewed"] == "yes, by Dr Who"
        unknown = patch.replace(b"Reviewed", b"NotConfigured")
        refused = bridge.request("PROPPATCH", path, unknown)
        assert refused.status == 207 and b"403" in refused.body  # refused inside the 207, stored nowhere
        assert "NotConfigured" not in bridge.store.metadata(instance_id)


# -- uploads -------------------------------------------------------------------------------------


def test_put_ingests_dicom_and_keeps_the_rest_with_its_reason(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        good = dicom_file(tmp_path / "in", 1)
        assert bridge.request("PUT", "/uploads/CD/good.dcm", good.read_bytes()).status == 409  # no such folder
        assert bridge.request("MKCOL", "/uploads/CD").status == 201
        assert bridge.request("PUT", "/uploads/CD/good.dcm", good.read_bytes()).status == 201
        assert bridge.request("PUT", "/uploads/CD/notes.txt", b"not an image").status == 201
        assert bridge.request("PUT", "/uploads/CD/empty.dcm", b"").status == 201
        bridge.wait_ingested()
        assert [i.sop_uid for i in bridge.instances()] == ["1.2.826.0.1.3680043.10.1.1.1"]
        assert bridge.uploads() == ["CD/empty.dcm", "CD/notes.txt"]
        reasons = propfind(bridge, "/uploads/CD/", body=b'<?xml version="1.0"?><propfind xmlns="DAV:">'
                           b'<prop><error xmlns="urn:dicomfs" /><dicomfs.error xmlns="urn:dicomfs" /></prop></propfind>')
        assert "not DICOM" in reasons["/uploads/CD/notes.txt"]["{urn:dicomfs}dicomfs.error"].text  # type: ignore[operator]
        assert "empty" in reasons["/uploads/CD/empty.dcm"]["{urn:dicomfs}dicomfs.error"].text  # type: ignore[operator]
        stored = bridge.request("GET", f"{UPLOADED_SERIES}/1.2.826.0.1.3680043.10.1.1.1.dcm")
        assert stored.status == 200 and stored.body == good.read_bytes()
        for clutter in (".DS_Store", "._good.dcm", "desktop.ini"):
            assert bridge.request("PUT", f"/uploads/CD/{clutter}", b"junk").status == 403
        assert bridge.uploads() == ["CD/empty.dcm", "CD/notes.txt"]


def test_plain_puts_are_written_before_wsgidav_and_the_rest_still_reach_it(tmp_path: Path) -> None:
    """bridge.fast_put answers a plain authenticated PUT itself; conditions, locks and ranges go on."""
    with running(tmp_path, users_config()) as bridge:
        carol = ("carol", CAROL_PASSWORD)
        good = dicom_file(tmp_path / "in", 7).read_bytes()
        created = bridge.request("PUT", "/uploads/scan%20%C3%A9.dcm", good, auth=carol)
        assert created.status == 201 and created.headers.get("etag") and created.body == b""  # wsgidav's has a page
        bridge.wait_ingested()
        (stored,) = bridge.instances()
        assert stored.remote == "carol@127.0.0.1" and stored.origin == "webdav"
        assert bridge.request("PUT", "/uploads/n.txt", b"one", auth=carol).status == 201
        replaced = bridge.request("PUT", "/uploads/n.txt", b"two", auth=carol)
        assert replaced.status == 204  # kept (not DICOM): replaced
        bridge.wait_ingested()  # n.txt stays, rejected; its ETag is wsgidav's own for the same file
        assert bridge.request("HEAD", "/uploads/n.txt", auth=carol).headers.get("etag") == replaced.headers.get("etag")
        assert bridge.request("MKCOL", "/uploads/a-folder", auth=carol).status == 201
        assert bridge.request("PUT", "/uploads/a-folder", b"x", auth=carol).status not in (201, 204)  # wsgidav refuses
        assert bridge.request("PUT", "/uploads/x.dcm", good, auth=("bob", BOB_PASSWORD)).status == 403  # read only
        assert bridge.request("PUT", "/uploads/x.dcm", good, auth=("carol", "wrong")).status == 401
        assert bridge.request("PUT", "/uploads/x.dcm", good, {"Content-Range": "bytes 0-9/99"}, auth=carol).status == 400
        conditional = bridge.request("PUT", "/uploads/x.dcm", good, {"If-Match": '"nope"'}, auth=carol)
        assert conditional.status == 201 and b"WsgiDAV" in conditional.body  # wsgidav's answer (and its reading of it)
        assert bridge.request("MKCOL", "/uploads/held", auth=carol).status == 201
        lock = bridge.request("LOCK", "/uploads/held", b'<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope>'
                              b"<D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype></D:lockinfo>",
                              {"Depth": "infinity"}, auth=carol)
        assert lock.status == 200
        assert bridge.request("PUT", "/uploads/held/a.dcm", good, auth=carol).status == 423  # no token: wsgidav says so
        # A client that leaves half-way: the part that came stays, with its reason, and is not ingested.
        with socket.create_connection((bridge.client.host, bridge.client.port), timeout=10) as raw:
            token = base64.b64encode(f"carol:{CAROL_PASSWORD}".encode()).decode()
            raw.sendall(f"PUT /uploads/cut.dcm HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                        f"Content-Length: {len(good)}\r\n\r\n".encode() + good[:100])
        cut = bridge.store.folder / "uploads" / "cut.dcm"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and bridge.bridge.provider.uploads.reason(cut) is None:
            time.sleep(0.05)
        reason = bridge.bridge.provider.uploads.reason(cut)
        assert reason is not None and "interrupted" in reason and cut.stat().st_size == 100
        assert len(bridge.instances()) == 1


def test_a_new_version_of_an_upload_never_rewrites_the_file_the_ingest_may_be_reading(tmp_path: Path) -> None:
    """A PUT over an existing upload writes a new file and renames it over the name once whole:
    whoever holds the earlier file (the ingest, mid-group) reads it unchanged, and a client that
    leaves half-way through the new version leaves the earlier one as it was."""
    with running(tmp_path) as bridge:
        assert bridge.request("PUT", "/uploads/n.txt", b"first version").status == 201
        bridge.wait_ingested()  # not DICOM: it stays, with its reason
        real = bridge.store.folder / "uploads" / "n.txt"
        with real.open("rb") as held:  # as the ingest process holds a file it is reading
            replaced = bridge.request("PUT", "/uploads/n.txt", b"second version, longer")
            assert replaced.status == 204
            assert held.read() == b"first version"
        assert real.read_bytes() == b"second version, longer"
        assert bridge.request("HEAD", "/uploads/n.txt").headers.get("etag") == replaced.headers.get("etag")
        bridge.wait_ingested()
        with socket.create_connection((bridge.client.host, bridge.client.port), timeout=10) as raw:
            raw.sendall(b"PUT /uploads/n.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and real.read_bytes() == b"second version, longer":
            time.sleep(0.05)  # nothing should change: this waits out a wrong outcome
        assert real.read_bytes() == b"second version, longer"
        assert sorted(p.name for p in real.parent.iterdir()) == ["n.txt"]  # no staged name left behind
        # The same through wsgidav's own PUT (a condition sends it there), and an empty file
        # (never read by the ingest) is still written in place.
        with real.open("rb") as held:
            conditional = bridge.request("PUT", "/uploads/n.txt", b"third, through wsgidav",
                                         {"If-Unmodified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
            assert conditional.status == 204
            assert held.read() == b"second version, longer"
        assert real.read_bytes() == b"third, through wsgidav"
        assert sorted(p.name for p in real.parent.iterdir()) == ["n.txt"]
        assert bridge.request("PUT", "/uploads/e.txt", b"").status == 201
        empty = real.parent / "e.txt"
        inode = empty.stat().st_ino
        assert bridge.request("PUT", "/uploads/e.txt", b"now with content").status == 204
        assert empty.stat().st_ino == inode and empty.read_bytes() == b"now with content"


@pytest.mark.parametrize("slash", ["", "/"])  # wsgidav keeps the destination's files only when its URLs end in one
def test_copy_of_a_folder_over_a_folder_replaces_its_files_never_rewrites_them(tmp_path: Path, slash: str) -> None:
    """COPY of a folder over one holding a file of the same name: wsgidav keeps such files and
    copies over them, but that file may be in the ingest's hands (or linked into the store), so
    it gets a new one; whoever holds the earlier file reads it unchanged."""
    with running(tmp_path) as bridge:
        for folder, content in (("a", b"from the source"), ("b", b"in the destination")):
            assert bridge.request("MKCOL", f"/uploads/{folder}").status == 201
            assert bridge.request("PUT", f"/uploads/{folder}/n.txt", content).status == 201
        bridge.wait_ingested()  # not DICOM: both stay, with their reasons
        real = bridge.store.folder / "uploads" / "b" / "n.txt"
        with real.open("rb") as held:
            copied = bridge.request("COPY", f"/uploads/a{slash}", headers={
                "Destination": bridge.client.url + f"uploads/b{slash}", "Overwrite": "T", "Depth": "infinity"})
            assert copied.status == 204, copied.body[:300]
            assert held.read() == b"in the destination"
        assert real.read_bytes() == b"from the source"
        assert (bridge.store.folder / "uploads" / "a" / "n.txt").read_bytes() == b"from the source"
        assert sorted(p.name for p in real.parent.iterdir()) == ["n.txt"]


def test_uploads_a_killed_bridge_answered_for_are_ingested_at_the_next_start(tmp_path: Path) -> None:
    Store.create(tmp_path / "store").close()
    uploads = tmp_path / "store" / "uploads"
    uploads.mkdir(exist_ok=True)
    left = dicom_file(uploads / "CD", 3)  # answered 201, then the bridge was SIGKILLed before ingesting it
    os.utime(left, (time.time() - 60, time.time() - 60))
    writing = dicom_file(uploads / "CD", 4)  # being written right now through a mount beside the bridge
    rejected = uploads / "notes.txt"
    rejected.write_bytes(b"not DICOM")
    os.utime(rejected, (time.time() - 60, time.time() - 60))
    os.setxattr(rejected, "user.dicomfs.error", b"not DICOM: no DICM prefix")
    with running(tmp_path) as bridge:
        bridge.wait_ingested()
        assert [i.sop_uid for i in bridge.instances()] == ["1.2.826.0.1.3680043.10.1.1.3"]
        assert bridge.uploads() == ["CD/up0004.dcm", "notes.txt"]  # too fresh to adopt; already judged
    assert writing.exists()


def test_an_upload_whose_date_is_set_after_its_put_is_still_ingested(tmp_path: Path) -> None:
    """A PUT queues its file with its size and date; a PROPPATCH of its date right after (no lock:
    Explorer's comes under one) moves them on, and the queue passes over a file whose stamp moved.
    The PROPPATCH queues it again, so it is ingested all the same."""
    win32 = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
             b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
             b'<Z:Win32LastModifiedTime>Mon, 23 Nov 2026 10:00:00 GMT</Z:Win32LastModifiedTime>'
             b'</D:prop></D:set></D:propertyupdate>')
    count = 12
    with running(tmp_path) as bridge:
        for index in range(count):
            target = f"/uploads/d{index:02d}.dcm"
            assert bridge.request("PUT", target, dicom_file(tmp_path / "in", index).read_bytes()).status == 201
            assert bridge.request("PROPPATCH", target, win32).status in (207, 404)  # 404: ingested already
        time.sleep(0.3)
        bridge.wait_ingested()
        assert bridge.uploads() == [] and len(bridge.instances()) == count


def test_a_folder_moved_within_uploads_has_its_files_ingested(tmp_path: Path) -> None:
    """A MOVE of a folder brings its files to names nothing queued: files queued under their old
    names (a MOVE right after the PUTs) are passed over as gone by their turn. The MOVE queues
    them. Here the files are put in place behind the bridge's back, so that only the MOVE can."""
    with running(tmp_path) as bridge:
        assert bridge.request("MKCOL", "/uploads/inc").status == 201
        for index in range(5):
            dicom_file(bridge.store.folder / "uploads" / "inc", index)
        moved = bridge.request("MOVE", "/uploads/inc", headers={"Destination": bridge.client.url + "uploads/done"})
        assert moved.status == 201, moved.body[:300]
        time.sleep(0.3)
        bridge.wait_ingested()
        assert bridge.uploads() == [] and len(bridge.instances()) == 5


def test_windows_explorer_copy_is_ingested_at_unlock_not_before(tmp_path: Path) -> None:
    win32 = (b'<?xml version="1.0" encoding="utf-8" ?><D:propertyupdate xmlns:D="DAV:" '
             b'xmlns:Z="urn:schemas-microsoft-com:"><D:set><D:prop>'
             b'<Z:Win32CreationTime>Mon, 23 Nov 2026 10:00:00 GMT</Z:Win32CreationTime>'
             b'<Z:Win32LastModifiedTime>Mon, 23 Nov 2026 10:00:00 GMT</Z:Win32LastModifiedTime>'
             b'<Z:Win32FileAttributes>00000020</Z:Win32FileAttributes></D:prop></D:set></D:propertyupdate>')
    lock = (b'<?xml version="1.0" encoding="utf-8" ?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
            b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>WORKGROUP\\user</D:href>'
            b'</D:owner></D:lockinfo>')
    with running(tmp_path) as bridge:
        data = dicom_file(tmp_path / "in", 2).read_bytes()
        target = "/uploads/IM0002.dcm"
        assert bridge.request("PUT", target, b"").status == 201
        locked = bridge.request("LOCK", target, lock, {"Timeout": "Second-3600"})
        assert locked.status == 200
        token = locked.headers["lock-token"]
        assert locked.body.count(b"<ns0:locktoken>") == 1 and token.strip("<>").encode() in locked.body
        assert bridge.request("PROPPATCH", target, win32, {"If": f"({token})"}).status == 207
        assert bridge.request("HEAD", target).status == 200
        assert bridge.request("PUT", target, data, {"If": f"({token})"}).status == 204
        ask_error = b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop><dicomfs.error xmlns="urn:dicomfs"/></prop></propfind>'
        assert not propfind(bridge, target, depth="0", body=ask_error)[target]  # the 0-byte PUT's reason is gone
        assert bridge.request("PROPPATCH", target, win32, {"If": f"({token})"}).status == 207
        time.sleep(0.3)
        bridge.wait_ingested()
        assert bridge.uploads() == ["IM0002.dcm"] and not bridge.instances()  # whole, and still there
        assert bridge.request("GET", target).body == data
        assert bridge.request("UNLOCK", target, headers={"Lock-Token": token}).status == 204
        time.sleep(0.1)
        bridge.wait_ingested()
        assert bridge.uploads() == [] and len(bridge.instances()) == 1


def test_new_folder_is_renamed_like_explorer_does(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        assert bridge.request("MKCOL", "/uploads/New%20folder").status == 201
        moved = bridge.request("MOVE", "/uploads/New%20folder",
                               headers={"Destination": bridge.client.url + "uploads/Scans%20%C3%A9t%C3%A9", "Overwrite": "F"})
        assert moved.status == 201
        assert (bridge.store.folder / "uploads" / "Scans été").is_dir()
        assert bridge.request("MKCOL", "/uploads/New%20folder").status == 201
        clash = bridge.request("MOVE", "/uploads/New%20folder",
                               headers={"Destination": bridge.client.url + "uploads/Scans%20%C3%A9t%C3%A9", "Overwrite": "F"})
        assert clash.status == 412
        outside = bridge.request("MOVE", "/uploads/New%20folder", headers={"Destination": bridge.client.url + "by-uids/x"})
        assert outside.status == 403
        assert bridge.request("MKCOL", "/uploads/New%20folder").status == 405  # rclone makes folders in parallel
        assert bridge.request("DELETE", "/uploads/New%20folder").status == 204
        assert bridge.request("DELETE", "/uploads").status == 403


def test_writes_outside_uploads_get_403_never_500(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        instance, series = uid_path(sample), f"/by-uids/{sample.study_uid}/{sample.series_uid}"
        url = bridge.client.url
        attempts = [
            ("PUT", "/by-uids/new.dcm", b"x", {}),
            ("PUT", instance, b"x", {}),
            ("MKCOL", "/by-patients/new", None, {}),
            ("MOVE", instance, None, {"Destination": url + "by-uids/renamed.dcm"}),
            ("COPY", instance, None, {"Destination": url + "uploads/copy.dcm"}),
            ("MOVE", series, None, {"Destination": url + "by-uids/x"}),
            ("DELETE", "/by-uids", None, {}),
            ("DELETE", f"/by-uids/{sample.study_uid}/study.json", None, {}),
        ]
        for method, path, body, headers in attempts:
            answer = bridge.request(method, path, body, headers)
            assert answer.status == 403, (method, path, answer.status, answer.body[:200])
            assert b"Traceback" not in answer.body
        assert len(bridge.instances()) == small_corpus.instances


def test_delete_removes_an_instance_and_a_study(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        first, = [f for f in small_corpus.valid_files[:1]]
        assert bridge.request("DELETE", uid_path(first)).status == 204
        assert bridge.request("GET", uid_path(first)).status == 404
        assert len(bridge.instances()) == small_corpus.instances - 1
        in_study = {f.sop_uid for f in small_corpus.valid_files if f.study_uid == first.study_uid}
        assert bridge.request("DELETE", f"/by-uids/{first.study_uid}").status == 204
        assert {i.sop_uid for i in bridge.instances()}.isdisjoint(in_study)
        assert bridge.request("PROPFIND", f"/by-uids/{first.study_uid}", headers={"Depth": "0"}).status == 404


def test_delete_of_a_folder_its_last_member_took_along_succeeds(tmp_path: Path, small_corpus: Corpus) -> None:
    """A recursive delete member by member (davfs2's rm -r) ends with DELETE of folders that went with
    their last instance: 204, not 404; a folder that never existed still answers 404."""
    with running(tmp_path, corpus=small_corpus) as bridge:
        first = small_corpus.valid_files[0]
        in_series = [f for f in small_corpus.valid_files if f.series_uid == first.series_uid]
        for sample in in_series:
            assert bridge.request("DELETE", uid_path(sample)).status == 204
        series = f"/by-uids/{first.study_uid}/{first.series_uid}/"
        assert bridge.request("PROPFIND", series, headers={"Depth": "0"}).status == 404
        assert bridge.request("DELETE", series).status == 204
        assert bridge.request("DELETE", series).status == 404  # once
        assert bridge.request("DELETE", f"/by-uids/{first.study_uid}/1.2.3.4.5/").status == 404


def test_delete_refused_when_turned_off(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, "[webdav]\ndelete_allowed = false\n", corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        answer = bridge.request("DELETE", uid_path(sample))
        assert answer.status == 403 and b"delete_allowed" in answer.body
        assert len(bridge.instances()) == small_corpus.instances


def test_uploads_refused_when_turned_off(tmp_path: Path) -> None:
    with running(tmp_path, "[webdav]\nupload_allowed = false\n") as bridge:
        assert bridge.request("PUT", "/uploads/a.dcm", b"x").status == 403
        assert bridge.request("MKCOL", "/uploads/a").status == 403
        assert bridge.uploads() == []


# -- who may do what -----------------------------------------------------------------------------


def users_config() -> str:
    return (f'[users.alice]\npassword_hash = "{hash_password(ALICE_PASSWORD)}"\nrights = ["read", "upload", "delete"]\n'
            f'[users.bob]\npassword_hash = "{hash_password(BOB_PASSWORD)}"\nrights = ["read"]\n'
            f'[users.carol]\npassword_hash = "{hash_password(CAROL_PASSWORD)}"\nrights = ["read", "upload"]\n')


def test_users_need_the_right_password_and_the_right_right(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, users_config(), corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        anonymous = bridge.request("PROPFIND", "/", headers={"Depth": "0"})
        assert anonymous.status == 401 and anonymous.headers["www-authenticate"] == 'Basic realm="dicomfs"'
        assert bridge.request("GET", uid_path(sample), auth=("alice", "wrong")).status == 401
        assert bridge.request("GET", uid_path(sample), auth=("mallory", ALICE_PASSWORD)).status == 401
        assert bridge.request("GET", uid_path(sample), headers={"Authorization": "Basic bm90LWJhc2U2NA=="}).status == 401
        assert bridge.request("GET", uid_path(sample), headers={"Authorization": "Basic %%%"}).status == 401
        assert bridge.request("GET", uid_path(sample), auth=("bob", BOB_PASSWORD)).body == sample.path.read_bytes()
        refused = bridge.request("PUT", "/uploads/x.dcm", b"x", auth=("bob", BOB_PASSWORD))
        assert refused.status == 403 and b"upload right" in refused.body
        assert bridge.request("DELETE", uid_path(sample), auth=("bob", BOB_PASSWORD)).status == 403
        assert bridge.request("PUT", "/uploads/x.txt", b"x", auth=("alice", ALICE_PASSWORD)).status == 201
        started = time.monotonic()
        for _ in range(20):  # a remembered check, not 20 scrypt runs
            assert bridge.request("GET", uid_path(sample), auth=("alice", ALICE_PASSWORD)).status == 200
        assert time.monotonic() - started < 5
        protect = (b'<?xml version="1.0"?><propertyupdate xmlns="DAV:"><set><prop><dicomfs.protected xmlns="urn:dicomfs">'
                   b'1</dicomfs.protected></prop></set></propertyupdate>')
        listed = propfind(bridge, "/by-patients/", auth=("carol", CAROL_PASSWORD))
        patient = next(href for href in listed if href != "/by-patients/")
        refused = bridge.request("PROPPATCH", patient, protect, auth=("carol", CAROL_PASSWORD))
        assert refused.status == 207 and b"403" in refused.body  # lifting protection could expose it to recycling
        granted = bridge.request("PROPPATCH", patient, protect, auth=("alice", ALICE_PASSWORD))
        assert granted.status == 207 and b"200 OK" in granted.body
        assert bridge.request("DELETE", uid_path(sample), auth=("alice", ALICE_PASSWORD)).status == 204


def test_open_bind_without_users_is_refused_unless_asked(tmp_path: Path) -> None:
    loaded = load_config(Path(os.devnull), store_folder=tmp_path / "store")
    with open_store(loaded, create=True) as store:
        with pytest.raises(BridgeError, match="without users"):
            Bridge(store, loaded.config, bind="0.0.0.0:8042")
        Bridge(store, loaded.config, bind="0.0.0.0:8042", allow_anonymous=True).provider.close()  # built, never started


def test_users_config_refuses_plaintext_and_bad_hashes(tmp_path: Path) -> None:
    path = tmp_path / "dicomfs.toml"
    for text, expected in (
        ('[users.a]\npassword = "secret"\n', "unknown field"),
        ('[users.a]\npassword_hash = "secret"\n', "never a plaintext"),
        (f'[users.a]\npassword_hash = "{hash_password("x" * 8)}"\nrights = ["admin"]\n', "unknown right"),
        ("[webdav]\ncertificate = '/x.pem'\n", "private_key"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            load_config(path)


def test_passwd_prints_a_hash_the_config_accepts(tmp_path: Path) -> None:
    done = subprocess.run([*dicomfs_command(), "passwd", "carol", "--rights", "read,upload"], input="a long password\n",
                          capture_output=True, text=True, timeout=60, env={**os.environ, "DICOMFS_CONFIG": os.devnull})
    assert done.returncode == 0, done.stderr
    assert "a long password" not in done.stdout
    config_file = tmp_path / "dicomfs.toml"
    config_file.write_text(done.stdout)
    user = load_config(config_file).config.users["carol"]
    assert user.rights == {"read", "upload"} and verify_password("a long password", user.password_hash)
    dotted = subprocess.run([*dicomfs_command(), "passwd", "jane.doe@site"], input="a long password\n", capture_output=True,
                            text=True, timeout=60, env={**os.environ, "DICOMFS_CONFIG": os.devnull})
    config_file.write_text(dotted.stdout)
    assert set(load_config(config_file).config.users) == {"jane.doe@site"}
    short = subprocess.run([*dicomfs_command(), "passwd", "carol"], input="short\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "8 characters" in short.stderr


# -- hostile requests ------------------------------------------------------------------------------


def test_paths_that_try_to_escape_reach_nothing(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    with running(tmp_path) as bridge:
        attempts = [
            ("GET", "/../secret.txt"), ("GET", "/uploads/../../secret.txt"), ("GET", "/uploads/%2e%2e/%2e%2e/secret.txt"),
            ("GET", "/uploads/..%2F..%2Fsecret.txt"), ("GET", "/uploads/%2E%2E%2Fsecret.txt"), ("GET", "/uploads/a%00b"),
            ("PUT", "/uploads/..%2F..%2Fescaped.txt"), ("PUT", "/uploads/%2e%2e/escaped.txt"), ("MKCOL", "/uploads/%2e%2e"),
            ("GET", "http://evil.example/../secret.txt"), ("GET", "//etc/passwd"), ("GET", "/uploads//..//secret.txt"),
        ]
        for method, path in attempts:
            answer = bridge.request(method, path, b"x" if method == "PUT" else None)
            assert 400 <= answer.status < 500, (method, path, answer.status)
            assert b"do not serve" not in answer.body and b"root:" not in answer.body
        escape = bridge.request("MOVE", "/uploads", headers={"Destination": bridge.client.url + "../x"})
        assert 400 <= escape.status < 500
    assert not list(tmp_path.rglob("escaped.txt"))


def test_https_with_a_self_signed_certificate(tmp_path: Path, small_corpus: Corpus) -> None:
    cert, key = self_signed_certificate(tmp_path)
    config = f"[webdav]\ncertificate = '{cert}'\nprivate_key = '{key}'\n" + users_config()
    with running(tmp_path, config, corpus=small_corpus) as bridge:
        assert bridge.client.url.startswith("https://")
        secure = Client(bridge.client.url, ssl.create_default_context(cafile=str(cert)), ("alice", ALICE_PASSWORD))
        sample = small_corpus.valid_files[0]
        assert secure.request("GET", uid_path(sample)).body == sample.path.read_bytes()
        assert secure.request("GET", uid_path(sample), auth=("alice", "nope")).status == 401
        with pytest.raises((ssl.SSLError, ConnectionError)):  # a client that does not trust the certificate
            Client(bridge.client.url, ssl.create_default_context()).request("GET", "/")
        plain = http.client.HTTPConnection("127.0.0.1", bridge.bridge.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/")
            plain.getresponse().read()


# -- load and size ---------------------------------------------------------------------------------


def test_eight_uploaders_and_four_readers_at_once(tmp_path: Path, small_corpus: Corpus) -> None:
    per_uploader = 12
    sources = [[dicom_file(tmp_path / f"u{u}", u * 100 + i) for i in range(per_uploader)] for u in range(8)]
    with running(tmp_path, corpus=small_corpus) as bridge:
        failures: list[str] = []
        stop = threading.Event()
        reads = [0]

        def upload(files: list[Path], who: int) -> None:
            for path in files:
                answer = bridge.request("PUT", f"/uploads/{who}-{path.name}", path.read_bytes())
                if answer.status != 201:
                    failures.append(f"PUT {path.name}: {answer.status}")

        def read() -> None:
            samples = unique_files(small_corpus)
            while not stop.is_set():
                sample = samples[reads[0] % len(samples)]
                if bridge.request("GET", uid_path(sample)).body != sample.path.read_bytes():
                    failures.append(f"GET {sample.sop_uid}: wrong bytes")
                reads[0] += 1

        readers = [threading.Thread(target=read) for _ in range(4)]
        uploaders = [threading.Thread(target=upload, args=(files, who)) for who, files in enumerate(sources)]
        for thread in readers + uploaders:
            thread.start()
        for thread in uploaders:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
        bridge.wait_ingested()
        assert failures == []
        assert reads[0] > 0
        assert len(bridge.instances()) == small_corpus.instances + 8 * per_uploader
        assert bridge.uploads() == []
        assert len(propfind(bridge, UPLOADED_SERIES + "/")) - 2 == 8 * per_uploader  # less the folder, series.json


@pytest.mark.timeout(300)
def test_a_2_gib_upload_streams_with_bounded_memory(tmp_path: Path) -> None:
    run_cli("init", store=tmp_path / "store", check=True)
    size, chunk = 2 << 30, b"\0" * (1 << 20)
    with serve(tmp_path / "store") as server:
        assert server.process is not None
        connection = server.connection()
        connection.putrequest("PUT", "/uploads/big.bin")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        for _ in range(size // len(chunk)):
            connection.send(chunk)
        answer = connection.getresponse()
        assert answer.status == 201, answer.read()
        answer.read()
        connection.close()
        peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{server.process.pid}/status").read_text())[1])  # type: ignore[index]
        assert (tmp_path / "store" / "uploads" / "big.bin").stat().st_size == size
        assert peak_kib < 300 * 1024, f"the server peaked at {peak_kib // 1024} MiB for a 2 GiB upload"
        assert server.request("DELETE", "/uploads/big.bin").status == 204


# -- the command line --------------------------------------------------------------------------------


def test_a_read_only_bridge_starts_no_ingest_and_changes_nothing_in_uploads(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(small_corpus.root), store=store)
    leftovers = store / "uploads" / "cd"  # a folder idle past empty_folder_idle, a file past rejected_ttl
    leftovers.mkdir(parents=True)
    (leftovers / "notes.txt").write_text("not an image")
    long_ago = time.time() - 7 * 86400
    for path in (leftovers / "notes.txt", leftovers):
        os.utime(path, (long_ago, long_ago))
    config = tmp_path / "dicomfs.toml"
    config.write_text("[uploads]\nrejected_ttl = 1\nempty_folder_idle = 1\n")
    with serve(store, config=config, args=("--read-only",)) as server:
        assert server.process is not None
        sample = unique_files(small_corpus)[0]
        assert server.request("GET", uid_path(sample)).status == 200
        assert server.request("PUT", "/uploads/x.dcm", sample.path.read_bytes()).status == 409  # no uploads/ shown
        assert not (store / "uploads" / "x.dcm").exists()
        time.sleep(6)  # a janitor pass (every 5 s) of a bridge that takes uploads would sweep both
        children = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True).stdout
        assert children == ""  # no ingest process
        assert (leftovers / "notes.txt").read_text() == "not an image"
        assert "upload ingest process" not in server.log.read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_mount_and_bridge_in_one_process(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(small_corpus.root), store=store)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    port = free_port()
    done = run_cli("mount", str(mountpoint), "--auto-unmount", "--webdav", f"127.0.0.1:{port}", store=store)
    assert done.returncode == 0, done.stderr
    try:
        client = Client(f"http://127.0.0.1:{port}/")
        good = dicom_file(tmp_path / "in", 7)
        assert client.request("PUT", "/uploads/seven.dcm", good.read_bytes()).status == 201
        deadline = time.monotonic() + 10
        shown = mountpoint / f"{UPLOADED_SERIES[1:]}/1.2.826.0.1.3680043.10.1.1.7.dcm"
        while not shown.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shown.read_bytes() == good.read_bytes()  # uploaded over WebDAV, read through FUSE
        assert len(propfind(client, "/by-uids/")) - 1 == small_corpus.studies + 1
    finally:
        run_cli("umount", str(mountpoint), store=store)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            time.sleep(0.1)
            continue
        break
    else:
        raise AssertionError("the bridge outlived its mount")


def test_webdav_command_serves_and_stops_on_sigterm(tmp_path: Path, small_corpus: Corpus) -> None:
    run_cli("init", store=tmp_path / "store", check=True)
    run_cli("ingest", str(small_corpus.root), store=tmp_path / "store")
    with serve(tmp_path / "store") as server:
        assert len(propfind(server, "/by-patients/")) - 1 == small_corpus.patients
        assert server.process is not None
        server.process.terminate()
        assert server.process.wait(timeout=30) == 0



def test_janitor_removes_old_rejected_and_never_filled_files_only(tmp_path: Path) -> None:
    from dicomfs.uploads import UploadArea

    area = UploadArea(tmp_path / "uploads")
    locked_then_left = area.path(["left.dcm"])
    locked_then_left.write_bytes(b"")  # what a LOCK on a new name leaves when its client goes away
    rejected, waiting = area.path(["notes.txt"]), area.path(["fresh.dcm"])
    rejected.write_bytes(b"text")
    area.set_reason(rejected, "not DICOM")
    waiting.write_bytes(b"DICM")  # complete, not judged yet: never the janitor's to remove
    now = time.time() + 3600
    removed = area.sweep(rejected_ttl=600, empty_folder_idle=30, now=now)
    assert sorted(p.name for p in removed) == ["left.dcm", "notes.txt"] and waiting.exists()


def test_jobs_folder_shows_each_job_as_json_and_is_read_only(tmp_path: Path, small_corpus: Corpus) -> None:
    import json

    from dicomfs.jobs.storage import open_jobs

    with running(tmp_path, corpus=small_corpus) as bridge:
        assert list(propfind(bridge, "/jobs/")) == ["/jobs/"]  # none yet
        jobs = open_jobs(bridge.store)
        job = jobs.create("export", {"destination": "pacs2"}, [(i.id, i.size) for i in bridge.instances()[:3]], "three")
        listed = propfind(bridge, "/jobs/")
        assert f"/jobs/{job.id}.json" in listed
        shown = json.loads(bridge.request("GET", f"/jobs/{job.id}.json").body)
        assert shown["state"] == "pending" and shown["total_items"] == 3
        jobs.pause(job.id)
        assert json.loads(bridge.request("GET", f"/jobs/{job.id}.json").body)["state"] == "paused"  # at once
        assert bridge.request("PUT", f"/jobs/{job.id}.json", b"{}").status == 403
        assert bridge.request("DELETE", f"/jobs/{job.id}.json").status == 403


# -- PROPFIND of the views, answered by bridge.propfind ------------------------------------------------

Properties = dict[str, dict[str, tuple[str, object]]]
"""href -> {property name: (status, value as a nested tuple of tag, text and children)}."""

LIVE_PROPS = (b'<?xml version="1.0"?><propfind xmlns="DAV:" xmlns:z="urn:schemas-microsoft-com:" '
              b'xmlns:a="http://apache.org/dav/props/"><prop><getetag/><resourcetype/><getcontentlength/>'
              b'<getcontenttype/><getlastmodified/><creationdate/><displayname/><quota-used-bytes/>'
              b'<quota-available-bytes/><lockdiscovery/><supportedlock/><no-such-property/><z:Win32FileAttributes/>'
              b'<a:executable/><unqualified xmlns=""/></prop></propfind>')
DICOMFS_PROPS = (b'<?xml version="1.0"?><propfind xmlns="DAV:" xmlns:d="urn:dicomfs"><prop><d:dicom.PatientID/>'
                 b'<displayname/><d:dicom.StudyDescription/><d:dicom.SOPInstanceUID/><d:dicomfs.id/><d:dicomfs.protected/>'
                 b'<d:dicomfs.meta.Reviewed/><d:dicom.NoSuchTag/><getetag/></prop></propfind>')


def _element(element: ET.Element) -> object:
    return (element.tag, element.text or "", tuple(_element(child) for child in element))


def multistatus(answer: Answer) -> Properties:
    assert answer.status == 207, (answer.status, answer.body[:300])
    found: Properties = {}
    for response in ET.fromstring(answer.body).iter(DAV + "response"):
        href = response.findtext(DAV + "href") or ""
        assert href not in found, href
        props: dict[str, tuple[str, object]] = {}
        for propstat in response.iter(DAV + "propstat"):
            status = propstat.findtext(DAV + "status") or ""
            for prop in propstat.find(DAV + "prop") or []:
                assert prop.tag not in props, (href, prop.tag)
                props[prop.tag] = (status, _element(prop))
        found[href] = props
    return found


def fast_and_default(bridge: Running, path: str, depth: str = "1", body: bytes | None = None,
                     headers: dict[str, str] | None = None) -> tuple[Answer, Answer]:
    """The same PROPFIND answered by the bridge as it is, then by wsgidav's own handler alone."""
    ask = {"Depth": depth, **(headers or {})}
    fast = bridge.request("PROPFIND", path, body, ask)
    bridge.bridge.provider.fast_propfind = False
    try:
        default = bridge.request("PROPFIND", path, body, ask)
    finally:
        bridge.bridge.provider.fast_propfind = True
    return fast, default


def written_here(answer: Answer) -> bool:
    """Whether bridge.propfind wrote the answer (its prefix for DAV: is D; ElementTree's is ns0)."""
    return b"<D:multistatus" in answer.body[:200]


def assert_same(bridge: Running, path: str, depth: str = "1", body: bytes | None = None, *, fast: bool = True) -> Properties:
    first, default = fast_and_default(bridge, path, depth, body)
    assert written_here(first) is fast, (path, first.body[:200])
    assert not written_here(default)
    shown, expected = multistatus(first), multistatus(default)
    if not fast:  # the free space of uploads/ changes between the two answers
        for props in (*shown.values(), *expected.values()):
            props.pop(DAV + "quota-available-bytes", None)
            props.pop(DAV + "quota-used-bytes", None)
    assert shown == expected, path
    assert first.headers["content-type"] == default.headers["content-type"]
    assert sorted(first.headers) == sorted(default.headers)
    return shown


def test_propfind_of_views_answers_as_wsgidav_does(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, "[metadata]\nReviewed = 1024\n", corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        study, series = f"/by-uids/{sample.study_uid}/", f"/by-uids/{sample.study_uid}/{sample.series_uid}/"
        patients = assert_same(bridge, "/by-patients/")
        assert len(patients) - 1 == small_corpus.patients
        assert patients["/by-patients/"][DAV + "getlastmodified"][0] == "HTTP/1.1 200 OK"
        allprop = b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/></propfind>'
        assert assert_same(bridge, "/by-patients/", body=allprop) == patients
        for patient in sorted(patients):  # study folders named from the tricky descriptions (< > " & ...)
            assert_same(bridge, patient)
        listed = assert_same(bridge, series)  # instance files and series.json
        instance = f"{series}{sample.sop_uid}.dcm"
        assert listed[instance][DAV + "getetag"][0] == "HTTP/1.1 200 OK"
        assert listed[instance][DAV + "getcontentlength"][1] == (DAV + "getcontentlength", str(sample.size), ())
        assert_same(bridge, study)  # series folders and study.json
        for path in ("/by-studies/", "/by-dates/", "/by-uids/", "/jobs/"):
            assert_same(bridge, path)
        for body in (LIVE_PROPS, DICOMFS_PROPS, b'<?xml version="1.0"?><propfind xmlns="DAV:"><prop/></propfind>'):
            for path in ("/by-patients/", study, series):
                named = assert_same(bridge, path, body=body)
            if body == LIVE_PROPS:
                assert named[series][DAV + "getetag"][0] == "HTTP/1.1 404 Not Found"  # folders have none
                assert named[instance][DAV + "getetag"][0] == "HTTP/1.1 200 OK"
                assert named[instance]["{http://apache.org/dav/props/}executable"][0] == "HTTP/1.1 404 Not Found"
            if body == DICOMFS_PROPS:
                assert named[instance]["{urn:dicomfs}dicom.SOPInstanceUID"][1][1] == sample.sop_uid  # type: ignore[index]
        for path in (study, series, instance, f"{study}study.json", "/by-patients"):
            for body in (None, LIVE_PROPS, DICOMFS_PROPS):
                assert len(assert_same(bridge, path, depth="0", body=body)) == 1
        assert_same(bridge, instance, depth="1")  # a file lists itself only

        # user metadata is a live property: set by PROPPATCH, shown by the fast answer
        patch = (b'<?xml version="1.0"?><propertyupdate xmlns="DAV:" xmlns:d="urn:dicomfs"><set><prop>'
                 b'<d:dicomfs.meta.Reviewed>yes &amp; &lt;done&gt;</d:dicomfs.meta.Reviewed></prop></set></propertyupdate>')
        assert bridge.request("PROPPATCH", study, patch).status == 207
        shown = assert_same(bridge, f"/by-uids/{sample.study_uid}", depth="0", body=DICOMFS_PROPS)
        assert shown[study]["{urn:dicomfs}dicomfs.meta.Reviewed"][1][1] == "yes & <done>"  # type: ignore[index]
        assert assert_same(bridge, "/by-uids/", body=DICOMFS_PROPS)[study] == shown[study]


def test_a_propfind_answer_of_many_pieces_is_the_one_wsgidav_gives(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", patients=1, studies_per_patient=1, series_per_study=1,
                          instances_per_series=240, pixels=8, seed=11)
    sample = corpus.valid_files[0]
    series = f"/by-uids/{sample.study_uid}/{sample.series_uid}/"
    with running(tmp_path, corpus=corpus) as bridge:
        for body in (None, LIVE_PROPS, DICOMFS_PROPS):
            answer = bridge.request("PROPFIND", series, body, {"Depth": "1"})
            assert len(answer.body) > 2 * PIECE_CHARACTERS  # written in several pieces
            assert int(answer.headers["content-length"]) == len(answer.body)
            listed = assert_same(bridge, series, body=body)
            assert len(listed) == 1 + 240 + 1  # the folder, its instances and series.json


def test_propfind_leaves_what_it_cannot_answer_exactly_to_wsgidav(tmp_path: Path, small_corpus: Corpus) -> None:
    with running(tmp_path, corpus=small_corpus) as bridge:
        sample = small_corpus.valid_files[0]
        study, series = f"/by-uids/{sample.study_uid}/", f"/by-uids/{sample.study_uid}/{sample.series_uid}/"
        instance = f"{series}{sample.sop_uid}.dcm"
        propname = b'<?xml version="1.0"?><propfind xmlns="DAV:"><propname/></propfind>'
        assert_same(bridge, series, body=propname, fast=False)
        assert_same(bridge, "/", fast=False)  # it lists uploads/, a real folder
        assert bridge.request("MKCOL", "/uploads/CD").status == 201
        assert bridge.request("PUT", "/uploads/CD/notes.txt", b"not an image").status == 201
        bridge.wait_ingested()
        for path in ("/uploads/", "/uploads/CD/", "/uploads/CD/notes.txt"):
            assert_same(bridge, path, fast=False)
        for headers in ({"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}, {"If-None-Match": '"x"'}):
            first, default = fast_and_default(bridge, series, headers=headers)
            assert not written_here(first) and multistatus(first) == multistatus(default)
        for body in (b"<propfind", b'<?xml version="1.0"?><propfind xmlns="DAV:"><allprop/><prop/></propfind>'):
            assert bridge.request("PROPFIND", series, body, {"Depth": "1"}).status == 400  # wsgidav's answer
        assert bridge.request("PROPFIND", f"{series}nothing.dcm", headers={"Depth": "0"}).status == 404
        for depth in ("infinity", "2"):
            assert bridge.request("PROPFIND", series, headers={"Depth": depth}).status in (400, 403)

        # views refuse dead properties...
        dead = (b'<?xml version="1.0"?><propertyupdate xmlns="DAV:" xmlns:x="urn:example"><set><prop>'
                b'<x:colour>blue</x:colour></prop></set></propertyupdate>')
        refused = bridge.request("PROPPATCH", series, dead)
        assert refused.status == 207 and b"403" in refused.body
        assert_same(bridge, study)
        # ... but one kept from elsewhere (an older bridge) is shown, by wsgidav
        bridge.bridge.properties.write_property(series, "{urn:example}colour",
                                                b'<ns0:colour xmlns:ns0="urn:example">blue</ns0:colour>')
        for path, depth in ((study, "1"), (series, "0")):
            shown = assert_same(bridge, path, depth, fast=False)
            assert shown[series]["{urn:example}colour"] == ("HTTP/1.1 200 OK", ("{urn:example}colour", "blue", ()))
        assert_same(bridge, instance, "0")  # elsewhere, still answered here
        bridge.bridge.properties.remove_property(series, "{urn:example}colour")
        assert_same(bridge, study)

        # a lock shows in lockdiscovery: wsgidav writes it
        lock = (b'<?xml version="1.0" encoding="utf-8" ?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
                b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>someone</D:href></D:owner></D:lockinfo>')
        locked = bridge.request("LOCK", instance, lock, {"Timeout": "Second-3600"})
        assert locked.status == 200
        for path, depth in ((series, "1"), (instance, "0")):
            shown = assert_same(bridge, path, depth, fast=False)
            assert shown[instance][DAV + "lockdiscovery"][1] != (DAV + "lockdiscovery", "", ())
        assert_same(bridge, study)  # the lock is below what this lists
        assert bridge.request("UNLOCK", instance, headers={"Lock-Token": locked.headers["lock-token"]}).status == 204
        assert_same(bridge, series)


def test_propfind_dates_are_written_as_wsgidav_writes_them() -> None:
    from wsgidav import util

    from bridge.propfind import dates

    for mtime in (0.0, 1.5, 1_700_000_000.0, 1_700_000_000.9999996, 1_700_000_059.999999, 1_763_912_345.123456,
                  2_000_000_000.25, 951_782_400.0):  # 2000-02-29
        assert dates(mtime) == (util.get_rfc3339_time(mtime), util.get_rfc1123_time(mtime)), mtime


def test_dead_properties_are_found_under_a_folder_by_one_scan(tmp_path: Path) -> None:
    from bridge.properties import StorePropertyManager

    properties = StorePropertyManager(tmp_path / "properties")
    try:
        assert not properties.any_under("/by-patients/")
        properties.write_property("/by-patients-old/x", "{urn:x}y", b"<y/>")  # a sibling sharing the prefix
        properties.write_property("/by-patientsX", "{urn:x}y", b"<y/>")
        assert not properties.any_under("/by-patients/") and not properties.any_under("/by-patients")
        properties.write_property("/by-patients/P1 - A/S1/", "{urn:x}y", b"<y/>")
        assert properties.any_under("/by-patients/") and properties.any_under("/by-patients/P1 - A")
        assert not properties.any_under("/by-patients/P1 - AB/")
    finally:
        properties.close()
