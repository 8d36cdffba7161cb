"""XNAT exports (jobs.xnat) against a stand-in XNAT on 127.0.0.1 (tests/xnat_server.py), and the
names inside the zips (jobs.zipnames) as pure functions."""

from __future__ import annotations

import io
import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomfs.config import XnatDestination, load_config
from dicomfs.errors import ConfigError
from dicomfs.jobs import xnat
from dicomfs.jobs.model import FINAL, XNAT_EXPORT, Job, JobState
from dicomfs.jobs.runner import JobRunner, RetryPolicy
from dicomfs.jobs.storage import JobStore, open_jobs
from dicomfs.jobs.xnat import XnatExporter
from dicomfs.jobs.zipnames import check_naming, parse_structure, unique_names
from dicomfs.samples import Corpus, make_instance, write_instance
from dicomfs.store import Instance, Level, Store
from tests.conftest import run_cli
from tests.xnat_server import XnatServer, xnat_server

pytestmark = pytest.mark.timeout(60)

STUDY = "1.2.826.0.1.3680043.99.1"
SERIES = STUDY + ".1"


def xnat_toml(path: Path, server: XnatServer, **fields: object) -> Path:
    lines = ["[destinations.xnat]", 'type = "xnat"', f'url = "{server.url}"', 'username = "alice"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in {"password": "secret", **fields}.items()]
    lines += ["[jobs]", "retry_delay = 0", "retry_max_delay = 1", "max_attempts = 3", "poll_ms = 50"]
    path.write_text("\n".join(lines) + "\n")
    return path


def xnat_destination(tmp_path: Path, server: XnatServer, **fields: object) -> XnatDestination:
    destination = load_config(xnat_toml(tmp_path / "dicomfs.toml", server, **fields)).config.destinations["xnat"]
    assert isinstance(destination, XnatDestination)
    return destination


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.create(tmp_path / "store") as opened:
        yield opened


def instance(number: int, **extra: Any) -> pydicom.FileDataset:
    return make_instance(patient_id="P1", patient_name="Doe^Jane", study_uid=STUDY, series_uid=SERIES,
                         sop_uid=f"{SERIES}.{number}", instance_number=number, rows=8, columns=8, seed=number, **extra)


def ingest(store: Store, folder: Path, datasets: list[pydicom.FileDataset]) -> list[Instance]:
    folder.mkdir()
    for ds in datasets:
        write_instance(folder / f"{ds.SOPInstanceUID}.dcm", ds)
    list(store.ingest([folder]))
    found = {r.sop_uid: r for r in store.walk(Level.INSTANCE) if isinstance(r, Instance)}
    return [found[ds.SOPInstanceUID] for ds in datasets]


def stored(store: Store, record: Instance) -> bytes:
    with store.open_instance(record.id) as reader:
        return b"".join(reader.iter_chunks())


def run_to_end(store: Store, jobs: JobStore, destination: XnatDestination, job_id: str) -> Job:
    """Run the job in this process, through transient errors (no backoff), until it ends."""
    runner = JobRunner(jobs, {XNAT_EXPORT: XnatExporter(store, {"xnat": destination})},
                       retry=RetryPolicy(0.0, 0.0, 5), only=job_id)
    deadline = time.monotonic() + 20
    while (job := jobs.get(job_id)).state not in FINAL and time.monotonic() < deadline:
        if runner.run_once() is None:
            time.sleep(0.01)
    return job


def export(store: Store, destination: XnatDestination, records: list[Instance]) -> Job:
    jobs = open_jobs(store)
    job = jobs.create(XNAT_EXPORT, {"destination": "xnat"}, [(r.id, r.size) for r in records], "test export")
    return run_to_end(store, jobs, destination, job.id)


def sop_of(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)


# -- through the command line ---------------------------------------------------------------------


def test_xnat_export_cli_sends_zips_of_cache_size_in_one_session(tmp_path: Path, filled_store: Path,
                                                                  small_corpus: Corpus) -> None:
    with xnat_server() as server:
        config = xnat_toml(tmp_path / "dicomfs.toml", server, cache_size=3, send_digest_header=True)
        done = run_cli("export", "--to", "xnat", "--wait", "PAT00001", store=filled_store, config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "success" in done.stdout and "secret" not in done.stdout + done.stderr
        with Store(filled_store, readonly=True) as opened:
            expected = {r.sop_uid: stored(opened, r) for selected in opened.resolve("PAT00001")
                        for r in opened.walk(Level.INSTANCE, selected.id) if isinstance(r, Instance)}
        assert server.logins == 1
        assert [i.status for i in server.imports] == [200] * math.ceil(len(expected) / 3)
        assert all(len(i.members) <= 3 and i.content_type == "application/zip" for i in server.imports)
        assert all("import-handler=DICOM-zip" in i.query and "inbody=true" in i.query for i in server.imports)
        assert server.digests_verified == len(server.imports)
        members = {name: data for i in server.imports for name, data in i.members.items()}
        assert len(members) == len(expected)
        for name, data in members.items():
            patient, study, series, file_name = name.split("/")
            assert patient == "PAT00001" and file_name.endswith(".dcm")
            assert data == expected[file_name.removesuffix(".dcm")]


# -- the session ----------------------------------------------------------------------------------


def test_xnat_wrong_password_fails_the_job_with_a_clear_reason(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(1), instance(2)])
    with xnat_server() as server:
        job = export(store, xnat_destination(tmp_path, server, password="nope"), records)
        assert job.state is JobState.FAILURE
        assert "refused the login of 'alice'" in job.last_error and "HTTP 401" in job.last_error
        assert "nope" not in job.last_error
        assert job.pending_items == 2 and job.failed_items == 0  # nothing was sent: `jobs retry` sends it all
        assert server.logins == 0 and server.refused_logins == 1 and not server.imports


def test_xnat_expired_session_logs_in_exactly_once_more(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(n) for n in range(1, 5)])
    with xnat_server() as server:
        server.expire_sessions(after=2)
        job = export(store, xnat_destination(tmp_path, server, cache_size=1), records)
        assert job.state is JobState.SUCCESS and job.done_items == 4
        assert server.logins == 2
        assert [i.status for i in server.imports] == [200, 200, 401, 200, 200]
        assert sorted(sop_of(data) for i in server.accepted for data in i.members.values()) == sorted(r.sop_uid for r in records)


def test_xnat_session_id_answered_as_text_is_the_cookie(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(1)])
    with xnat_server() as server:
        server.set_cookie = False
        job = export(store, xnat_destination(tmp_path, server), records)
        assert job.state is JobState.SUCCESS and server.logins == 1 and len(server.accepted) == 1


def test_xnat_wrong_import_url_fails_the_job_without_quarantine(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(1), instance(2)])
    with xnat_server() as server:
        job = export(store, xnat_destination(tmp_path, server, import_url=server.url + "/data/nothing"), records)
        assert job.state is JobState.FAILURE and job.pending_items == 2
        assert "HTTP 404" in job.last_error and "every batch would get this answer" in job.last_error
        assert not (store.folder / "exports" / "quarantine").exists()


def test_xnat_cache_size_0_posts_each_instance_alone(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(n) for n in range(1, 4)])
    with xnat_server() as server:
        job = export(store, xnat_destination(tmp_path, server, cache_size=0, send_digest_header=True), records)
        assert job.state is JobState.SUCCESS
        assert server.logins == 1 and server.digests_verified == 3
        assert all(i.content_type == "application/dicom" for i in server.imports)
        assert sorted(i.body for i in server.imports) == sorted(stored(store, r) for r in records)


# -- names inside the zip -------------------------------------------------------------------------


@pytest.mark.parametrize(("structure", "fields", "expected"), [
    ("(0010,0020)/(0008,0050)/(0020,0013)", {}, {"P1/UNKNOWN/1.dcm": 1, "P1/UNKNOWN/2.dcm": 2}),
    ("(0008,0050)", {"default_string": "NA"}, {"NA.dcm": None, "NA[1].dcm": None}),
    ("(0010,0020) - (0008,103E)", {}, {"P1_-_CT_Chest_w_contrast.dcm": None, "P1_-_CT_Chest_w_contrast[1].dcm": None}),
    ("(0010,0010)/(0008,103E)", {"whitespace_replacement": "+"}, {"Doe^Jane/CT+Chest+w+contrast.dcm": None,
                                                                  "Doe^Jane/CT+Chest+w+contrast[1].dcm": None}),
    ("(0040,0275)::(0040,1001)/[00200013].dcm", {}, {"RP_7/1.dcm": 1, "UNKNOWN/2.dcm": 2}),
], ids=["missing-element", "default-string", "whitespace-and-slash", "replacement", "sequence-path"])
def test_xnat_zip_names_follow_the_structure(tmp_path: Path, store: Store, structure: str, fields: dict[str, object],
                                             expected: dict[str, int | None]) -> None:
    description = "CT / Chest  w\tcontrast"  # a slash, a double space and a tab in one value
    requested = Sequence([Dataset()])
    requested[0].RequestedProcedureID = "RP 7"
    records = ingest(store, tmp_path / "in", [instance(1, SeriesDescription=description, RequestAttributesSequence=requested),
                                              instance(2, SeriesDescription=description)])
    with xnat_server() as server:
        job = export(store, xnat_destination(tmp_path, server, structure=structure, **fields), records)
        assert job.state is JobState.SUCCESS
        (upload,) = server.imports
        assert sorted(upload.members) == sorted(expected)
        for name, data in upload.members.items():
            number = expected[name]
            if number is not None:
                assert data == stored(store, records[number - 1])
        assert sorted(upload.members.values()) == sorted(stored(store, r) for r in records)


# -- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cache_size", "status", "suffix"), [(2, 400, ".zip"), (0, 422, ".dcm")])
def test_xnat_refused_batch_is_quarantined_then_resent_by_jobs_retry(tmp_path: Path, store: Store, cache_size: int,
                                                                    status: int, suffix: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xnat, "_SPOOL_IN_MEMORY", 1)  # bodies go through temporary files in the store folder
    records = ingest(store, tmp_path / "in", [instance(n) for n in range(1, 6)])
    jobs = open_jobs(store)
    with xnat_server() as server:
        destination = xnat_destination(tmp_path, server, cache_size=cache_size)
        server.refuse_next(1, status)
        job = jobs.create(XNAT_EXPORT, {"destination": "xnat"}, [(r.id, r.size) for r in records], "test export")
        failed = run_to_end(store, jobs, destination, job.id)
        refused = server.imports[0]
        held = max(cache_size, 1)
        assert failed.state is JobState.FAILURE and failed.failed_items == held and failed.done_items == 5 - held
        kept = store.folder / "exports" / "quarantine" / job.id / f"1{suffix}"
        assert kept.read_bytes() == refused.body
        reasons = dict(jobs.failures(job.id))
        assert all(f"HTTP {status}" in reason and str(kept) in reason for reason in reasons.values())
        listing = json.loads(kept.with_suffix(".json").read_text())
        assert sorted(listing["items"]) == sorted(reasons) and f"HTTP {status}" in listing["answer"]
        if suffix == ".zip":
            with zipfile.ZipFile(kept) as archive:
                assert len(archive.namelist()) == held

        retried = run_cli("jobs", "retry", job.id, store=store.folder)
        assert retried.returncode == 0, retried.stderr
        done = run_to_end(store, jobs, destination, job.id)
        assert done.state is JobState.SUCCESS and done.done_items == 5 and done.failed_items == 0
        assert not (store.folder / "exports" / "quarantine" / job.id).exists()
        sent = [data for i in server.accepted for data in (i.members.values() if i.members else [i.body])]
        assert sorted(sent) == sorted(stored(store, r) for r in records)


def test_xnat_server_errors_are_retried_until_accepted(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(n) for n in range(1, 4)])
    with xnat_server() as server:
        server.fail_next(2, 500)
        job = export(store, xnat_destination(tmp_path, server, cache_size=2), records)
        assert job.state is JobState.SUCCESS and job.failed_items == 0
        assert [i.status for i in server.imports] == [500, 500, 200, 200]
        sent = [data for i in server.accepted for data in i.members.values()]
        assert sorted(sent) == sorted(stored(store, r) for r in records)  # each exactly once


def test_xnat_instance_deleted_after_queueing_fails_with_that_reason(tmp_path: Path, store: Store) -> None:
    records = ingest(store, tmp_path / "in", [instance(1), instance(2, PatientID="P2")])
    jobs = open_jobs(store)
    with xnat_server() as server:
        job = jobs.create(XNAT_EXPORT, {"destination": "xnat"}, [(r.id, r.size) for r in records], "test export")
        store.delete(records[1].id)
        ended = run_to_end(store, jobs, xnat_destination(tmp_path, server), job.id)
        assert ended.done_items == 1 and ended.failed_items == 1
        assert jobs.failures(job.id) == [(records[1].id, "deleted from the store after the export was queued")]
        (upload,) = server.imports
        assert list(upload.members.values()) == [stored(store, records[0])]


# -- zipnames -------------------------------------------------------------------------------------


def header() -> Dataset:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.AccessionNumber = "ACC1"
    ds.StudyInstanceUID = "1.2.3"
    ds.Modality = "CT"
    ds.StudyDate = "20240101"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 2
    ds.InstanceNumber = 7
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0xA2, "SL", 42)  # (0019,10A2)
    return ds


@pytest.mark.parametrize(("structure", "name"), [
    ("(0010,0020)/[00080050]/(0020,000D)", "P1/ACC1/1.2.3.dcm"),
    ("(0010,0020)/(0020,000D) - [00080050]", "P1/1.2.3_-_ACC1.dcm"),
    (" (0010,0020) / (0020,000D) ", "P1/1.2.3.dcm"),
    ("(0010,0020).(0008,0060).(0008,0020).(0008,0030).(0020,0011).(0020,0013).(0019,10A2)",
     "P1.CT.20240101.101500.2.7.42.dcm"),
    ("(10,0020)_[100020]_(0010,0020)_[00100020]", "P1_P1_P1_P1.dcm"),
    ("(0008,0018).dcm", "1.2.3.4.5.dcm"),
    ("(0008,0018).DCM", "1.2.3.4.5.DCM"),
    ("(0010,0020)::(0010,0010)/(0010,0010)", "UNKNOWN/UNKNOWN.dcm"),
    ("", "UNKNOWN.dcm"),
], ids=["ctp-folders", "ctp-text-and-tags", "elements-trimmed", "ctp-xnat-example", "leading-zeros", "dcm-kept", "dcm-any-case",
        "not-a-sequence", "no-structure"])
def test_zipnames_ctp_examples(structure: str, name: str) -> None:
    assert parse_structure(structure).name_for(header(), "UNKNOWN", "_") == name


def test_zipnames_values_become_safe_path_elements() -> None:
    ds = header()
    ds.PatientID = ".."
    ds.AccessionNumber = "A\x01B\x7fC"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName = "  Doe^Jane  "
    structure = parse_structure("(0010,0020)/(0008,0050)/(0008,0008)/(0010,0010)")
    assert structure.name_for(ds, "UNKNOWN", "_") == "UNKNOWN/A_B_C/ORIGINAL_PRIMARY_AXIAL/Doe^Jane.dcm"


@pytest.mark.parametrize(("structure", "message"), [
    ("(20,D)", "character 6: expected 4 hex digits of the element (leading zeros are required there), found ')'"),
    ("(0010,0020", "character 11: expected ')' closing the tag opened at character 1, found the end"),
    ("a//b", "character 3: expected a folder name before '/'"),
    ("/a", "character 1: expected a folder name before '/'"),
    ("(0010,0020)/", "character 13: expected a file name after the last '/', found the end"),
    ("(0040,0275)::x", "character 14: expected a tag after '::', found 'x'"),
    ("(0010;0020)", "character 6: expected a hex digit, ',' or ')' in the tag opened at character 1, found ';'"),
    ("x/[1234]", "character 8: expected 5 to 8 hex digits"),
    ("(00010,0020)", "character 6: expected 1 to 4 hex digits of the group, found '0'"),
    ("(0010,0020,0030)", "character 11: expected one ',' at most in a tag, found ','"),
    ("x)", "character 2: expected text or a tag"),
])
def test_zipnames_parse_errors_give_the_position(structure: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_structure(structure)
    assert str(raised.value).startswith(message)


def test_unique_names_number_repeats_as_ctp_does() -> None:
    assert unique_names(["UNKNOWN.dcm"] * 3) == ["UNKNOWN.dcm", "UNKNOWN[1].dcm", "UNKNOWN[2].dcm"]
    assert unique_names(["a/x.dcm", "a/x[1].dcm", "a/x.dcm", "A/X.DCM", "b", "b"]) == [
        "a/x.dcm", "a/x[1].dcm", "a/x[2].dcm", "A/X[3].DCM", "b", "b[1]"]


@pytest.mark.parametrize(("default_string", "replacement"), [("UNKNOWN", ""), ("UNKNOWN", "a/b"), ("UNKNOWN", " "),
                                                            ("", "_"), ("..", "_")])
def test_zipnames_refuse_options_that_make_unsafe_names(default_string: str, replacement: str) -> None:
    with pytest.raises(ConfigError):
        check_naming(default_string, replacement)


@pytest.mark.parametrize(("fields", "message"), [
    ({"structure": "(0010,0020)/(20,D)"}, "destinations.xnat: structure '(0010,0020)/(20,D)': character 18: expected 4"),
    ({"whitespace_replacement": "a/b"}, "destinations.xnat: whitespace_replacement must be"),
])
def test_xnat_config_refuses_bad_naming_at_load(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    with xnat_server() as server:
        path = xnat_toml(tmp_path / "dicomfs.toml", server, **fields)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert message in str(raised.value)
