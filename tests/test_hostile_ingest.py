"""One hostile file among good ones: it alone is rejected, with its reason; every other file is stored.

Each bad file here once failed its whole ingest group or the whole command: a UID too long for an
LMDB key (``MDB_BAD_VALSIZE``), sequences nested 2,000 deep (``RecursionError``), a 10 MB
PatientName. They go in through the real command line, the store API, the group committer and a
WebDAV upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dicomfs.samples import make_instance, write_instance
from dicomfs.store.candidates import REJECTED, STORED, Candidate
from dicomfs.store.committer import Submission
from dicomfs.store.dicomparse import parse_header
from dicomfs.store.records import Instance
from dicomfs.store.store import Store
from tests.conftest import run_cli
from tests.test_webdav import propfind, running

pytestmark = pytest.mark.timeout(180)

STUDY = "1.2.826.0.1.3680043.10.22"
SERIES = f"{STUDY}.1"
PIXEL_DATA = struct.pack("<HH", 0x7FE0, 0x0010)


def instance_bytes(folder: Path, number: int, *, implicit: bool = False, **extra: object) -> bytes:
    """A small valid instance of the test series (its own SOPInstanceUID per ``number``)."""
    syntax = {"transfer_syntax": ImplicitVRLittleEndian} if implicit else {}
    ds = make_instance(patient_id="HOSTILE", patient_name="GOOD^FILE", study_uid=STUDY, series_uid=SERIES,
                       sop_uid=f"{SERIES}.{number}", instance_number=number, rows=16, columns=16, seed=number,
                       **syntax, **extra)  # type: ignore[arg-type]
    path = folder / f"made-{number}.dcm"
    folder.mkdir(parents=True, exist_ok=True)
    write_instance(path, ds)
    data = path.read_bytes()
    path.unlink()
    return data


def _meta_end(data: bytes) -> int:
    """Where the dataset starts: after the file meta group (its group length is the first element)."""
    (group_length,) = struct.unpack_from("<I", data, 140)
    return 144 + group_length


def with_value(data: bytes, group: int, element: int, value: bytes, *, implicit: bool = False) -> bytes:
    """``data`` with the value of the dataset element (group, element) replaced by ``value`` (a
    short-VR element in explicit VR, so at most 65,534 bytes; any length in implicit VR)."""
    value += b"\0" * (len(value) % 2)
    tag = struct.pack("<HH", group, element)
    at = data.index(tag, _meta_end(data))
    if implicit:
        (length,) = struct.unpack_from("<I", data, at + 4)
        return data[:at + 4] + struct.pack("<I", len(value)) + value + data[at + 8 + length:]
    (length,) = struct.unpack_from("<H", data, at + 6)
    return data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length:]


def nested_sequences(depth: int, *, implicit: bool = False) -> bytes:
    """ContentSequence items nested ``depth`` deep, every sequence and item of undefined length."""
    header = struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) if implicit else \
        struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", 0xFFFFFFFF)
    opening = header + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def with_before_pixels(data: bytes, inserted: bytes) -> bytes:
    at = data.index(PIXEL_DATA, _meta_end(data))
    return data[:at] + inserted + data[at:]


def bad_files(folder: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (content, a word its rejection reason must hold), one per kind of hostile file."""
    base = instance_bytes(folder, 900)
    implicit = instance_bytes(folder, 901, implicit=True)
    long_uid = f"{SERIES}." + "1" * 600
    return {
        "long-study-uid.dcm": (with_value(base, 0x0020, 0x000D, long_uid.encode()), "StudyInstanceUID"),
        "long-sop-uid.dcm": (with_value(base, 0x0008, 0x0018, long_uid.encode()), "SOPInstanceUID"),
        "huge-uid.dcm": (with_value(implicit, 0x0020, 0x000E, b"1." * 50_000, implicit=True), "SeriesInstanceUID"),
        "letters-in-uid.dcm": (with_value(base, 0x0008, 0x0018, b"1.2.3.abc"), "SOPInstanceUID"),
        "deep-nesting.dcm": (with_before_pixels(base, nested_sequences(2000)), "nested"),
        "deep-nesting-implicit.dcm": (with_before_pixels(implicit, nested_sequences(2000, implicit=True)), "nested"),
        "huge-patient-name.dcm": (with_value(implicit, 0x0010, 0x0010, b"A" * 10_000_000, implicit=True), "PatientName"),
        "huge-instance-number.dcm": (with_value(implicit, 0x0020, 0x0013, b"9" * 5000, implicit=True), "InstanceNumber"),
        "long-instance-number.dcm": (with_value(base, 0x0020, 0x0013, b"9" * 400), ""),
    }


def hostile_folder(folder: Path, good: int = 5) -> tuple[list[str], dict[str, str]]:
    """``good`` valid files and every bad file in ``folder``: (good names, bad name -> reason word)."""
    folder.mkdir(parents=True)
    names = []
    for number in range(1, good + 1):
        (folder / f"good-{number:03d}.dcm").write_bytes(instance_bytes(folder, number))
        names.append(f"good-{number:03d}.dcm")
    expected = {}
    for name, (content, word) in bad_files(folder).items():
        (folder / name).write_bytes(content)
        expected[name] = word
    return names, expected


def assert_outcomes(results: dict[str, tuple[str, str]], good: list[str], bad: dict[str, str]) -> None:
    """Every good file stored; every bad file stored as pydicom reads it, or rejected with its reason."""
    for name in good:
        assert results[name][0] == STORED, (name, results[name])
    for name, word in bad.items():
        status, reason = results[name]
        if name == "long-instance-number.dcm":  # an InstanceNumber that is no number is only left out
            assert status == STORED, (name, status, reason)
            continue
        assert status == REJECTED, (name, status, reason)
        assert word in reason, (name, reason)
        assert "Traceback" not in reason and len(reason) < 300, reason


@pytest.mark.parametrize("good", [5, 70], ids=["committer-thread", "worker-processes"])
def test_hostile_ingest_cli_stores_the_good_files_and_rejects_each_bad_one(tmp_path: Path, good: int) -> None:
    names, bad = hostile_folder(tmp_path / "in", good)
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    done = run_cli("ingest", "--json", str(tmp_path / "in"), store=store)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)  # the CLI's answer to "some files rejected"
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    results = {Path(line["path"]).name: (line["status"], line["reason"]) for line in lines}
    assert_outcomes(results, names, bad)
    checked = run_cli("check", store=store)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = run_cli("ls", "instances", "--json", store=store, check=True)
    assert listed.stdout.count(f"{SERIES}.") == good + 1  # the good files and the odd InstanceNumber


def test_hostile_ingest_store_api_stores_the_good_files_and_rejects_each_bad_one(
        tmp_path: Path, open_store: Callable[..., Store]) -> None:
    names, bad = hostile_folder(tmp_path / "in")
    store = open_store()
    results = {Path(r.path).name: (r.status, r.reason) for r in store.ingest([tmp_path / "in"])}
    assert_outcomes(results, names, bad)
    for name in names:
        read = pydicom.dcmread(tmp_path / "in" / name)
        found = store.resolve_one(str(read.SOPInstanceUID))
        assert isinstance(found, Instance) and found.sop_uid == read.SOPInstanceUID


def test_hostile_ingest_a_group_commit_that_fails_isolates_the_one_file_that_broke_it(
        tmp_path: Path, open_store: Callable[..., Store]) -> None:
    """The committer's own safety net, beneath the parser's checks: a candidate the index cannot
    take (a 600-digit UID, too long for an LMDB key) is offered in one group with five good ones."""
    store = open_store(batch_delay=5.0, batch_files=100)
    committer = store._writer()
    submissions = []
    for number in range(1, 7):
        data = instance_bytes(tmp_path, number)
        header = parse_header(data)
        if number == 4:
            header = dataclasses.replace(header, tags={**header.tags, "SOPInstanceUID": "1." + "2" * 600})
        candidate = Candidate.of(f"file-{number}", header, data, "cli", "")
        submissions.append(Submission(candidate, data, None, contextlib.ExitStack(), last=number == 6))
    futures = [committer.submit(s) for s in submissions]
    results = [f.result(timeout=60) for f in futures]
    assert [r.status for r in results] == [STORED, STORED, STORED, REJECTED, STORED, STORED], results
    assert "could not be indexed" in results[3].reason, results[3].reason
    assert store.stats().instances == 5


def test_hostile_ingest_webdav_upload_beside_a_bad_file_is_stored(tmp_path: Path) -> None:
    with running(tmp_path) as bridge:
        assert bridge.request("MKCOL", "/uploads/CD").status == 201
        for number in range(1, 6):
            assert bridge.request("PUT", f"/uploads/CD/good-{number}.dcm", instance_bytes(tmp_path, number)).status == 201
        bad = bad_files(tmp_path)
        for name in ("long-study-uid.dcm", "deep-nesting.dcm"):
            assert bridge.request("PUT", f"/uploads/CD/{name}", bad[name][0]).status == 201
        bridge.wait_ingested(60)
        assert sorted(i.sop_uid for i in bridge.instances()) == [f"{SERIES}.{n}" for n in range(1, 6)]
        assert bridge.uploads() == ["CD/deep-nesting.dcm", "CD/long-study-uid.dcm"]
        reasons = propfind(bridge, "/uploads/CD/", body=b'<?xml version="1.0"?><propfind xmlns="DAV:">'
                           b'<prop><dicomfs.error xmlns="urn:dicomfs" /></prop></propfind>')
        assert "nested" in (reasons["/uploads/CD/deep-nesting.dcm"]["{urn:dicomfs}dicomfs.error"].text or "")
        assert "StudyInstanceUID" in (reasons["/uploads/CD/long-study-uid.dcm"]["{urn:dicomfs}dicomfs.error"].text or "")


def test_hostile_ingest_indexes_what_pydicom_reads_where_the_fast_walker_would_read_otherwise(
        tmp_path: Path, open_store: Callable[..., Store]) -> None:
    """An item delimiter at the top level ends the dataset for pydicom: a StudyInstanceUID behind
    it is not the file's. A VR code that is none makes pydicom unable to read the value: rejected."""
    base = instance_bytes(tmp_path, 1)
    other = struct.pack("<HH", 0x0020, 0x000D) + b"UI" + struct.pack("<H", 8) + b"9.9.9.9\0"
    behind = with_before_pixels(base, struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + other)
    at = base.index(struct.pack("<HH", 0x0020, 0x000E) + b"UI", _meta_end(base))
    no_vr = base[:at + 4] + b"QQ" + base[at + 6:]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "behind-delimiter.dcm").write_bytes(behind)
    (folder / "no-vr.dcm").write_bytes(no_vr)
    store = open_store()
    results = {Path(r.path).name: r for r in store.ingest([folder])}
    assert results["behind-delimiter.dcm"].status == STORED, results
    assert results["behind-delimiter.dcm"].ids is not None
    study = store.get(results["behind-delimiter.dcm"].ids[1])
    assert study.study_uid == STUDY == pydicom.dcmread(folder / "behind-delimiter.dcm").StudyInstanceUID  # type: ignore[attr-defined]
    assert results["no-vr.dcm"].status == REJECTED and "pydicom cannot read it" in results["no-vr.dcm"].reason, results["no-vr.dcm"]
