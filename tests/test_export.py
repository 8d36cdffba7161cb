"""Exports to a real DICOMweb archive: Debian's Orthanc with its DICOMweb plugin, in a private
network namespace (tests/orthanc_server.py). The exporting ``dicomfs`` runs in that namespace."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator

import pydicom
import pytest

from dicomfs.samples import Corpus, make_instance, write_corpus, write_instance
from tests.conftest import dicomfs_command, run_cli
from tests.orthanc_server import Orthanc, orthanc
from tests.stow_proxy import stow_proxy

pytestmark = pytest.mark.timeout(180)


def export_config(path: Path, server: Orthanc, url: str | None = None, **fields: object) -> Path:
    """A configuration with one destination, "orthanc": ``server``, or ``url`` in front of it."""
    lines = ['[destinations.orthanc]', 'type = "stowrs"', f'url = "{url or server.dicomweb_url}"']
    if server.credentials is not None:
        lines.append(f'basic_auth = "{server.credentials[0]}:{server.credentials[1]}"')
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    lines += ["[jobs]", "retry_delay = 1", "retry_max_delay = 1", "max_attempts = 3", "poll_ms = 100"]
    path.write_text("\n".join(lines) + "\n")
    return path


def dicomfs_in(server: Orthanc, store: Path, config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command line, run inside Orthanc's namespace (the only place it can be reached)."""
    return server.run([*dicomfs_command(), "--store", str(store), "--config", str(config), *args],
                      capture_output=True, text=True, timeout=timeout)


def job_json(store: Path, config: Path, job_id: str) -> dict[str, object]:
    return json.loads(run_cli("jobs", "show", job_id, store=store, config=config, check=True).stdout)  # type: ignore[no-any-return]


def stored_sources(corpus: Corpus) -> dict[str, bytes]:
    """SOP Instance UID -> the bytes the store kept (the first file of a duplicated UID)."""
    kept: dict[str, bytes] = {}
    for sample in corpus.valid_files:
        kept.setdefault(sample.sop_uid, sample.path.read_bytes())
    return kept


@contextlib.contextmanager
def worker_running(server: Orthanc, store: Path, config: Path) -> Iterator[None]:
    """``dicomfs worker`` in Orthanc's namespace, from the moment it runs jobs to the block's end."""
    worker = server.popen([*dicomfs_command(), "--store", str(store), "--config", str(config), "worker"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("running jobs")
        yield
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if worker.stdout is not None:
            worker.stdout.close()


def wait_until(condition: Callable[[], bool], seconds: float, step: float = 0.2) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(step)


def test_export_delivers_every_instance_byte_for_byte(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    with orthanc(tmp_path / "orthanc", users={"alice": "secret"}) as server:
        config = export_config(tmp_path / "dicomfs.toml", server, instances_per_request=5)
        done = dicomfs_in(server, filled_store, config, "export", "--to", "orthanc", "--wait", "PAT00001", "PAT00002")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = {uid: data for uid, data in stored_sources(small_corpus).items()
                    if any(f.sop_uid == uid and f.patient_id in ("PAT00001", "PAT00002") for f in small_corpus.valid_files)}
        assert server.sop_uids() == set(expected)
        for uid, data in expected.items():
            assert server.file_of(uid) == data
        job_id = done.stdout.split()[1].rstrip(":")
        shown = job_json(filled_store, config, job_id)
        assert shown["state"] == "success" and shown["done_items"] == len(expected) and "secret" not in json.dumps(shown)


def test_concurrency_chunked_and_refused_credentials(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    with orthanc(tmp_path / "orthanc", users={"alice": "secret"}) as server:
        config = export_config(tmp_path / "dicomfs.toml", server, concurrency=4, chunked=True, instances_per_request=2)
        done = dicomfs_in(server, filled_store, config, "export", "--to", "orthanc", "--wait", "PAT00001")
        assert done.returncode == 0, done.stderr
        assert len(server.sop_uids()) == len({f.sop_uid for f in small_corpus.valid_files if f.patient_id == "PAT00001"})
        wrong = tmp_path / "wrong.toml"
        wrong.write_text(config.read_text().replace("alice:secret", "alice:nope"))
        refused = dicomfs_in(server, filled_store, wrong, "export", "--to", "orthanc", "--wait", "PAT00002")
        assert refused.returncode == 1 and "401" in refused.stdout
        assert "nope" not in refused.stdout + refused.stderr


def test_a_destination_refusing_the_stored_syntax_gets_implicit_vr(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    source = tmp_path / "in" / "one.dcm"
    source.parent.mkdir()
    write_instance(source, make_instance(patient_id="SYNTAX", patient_name="TS", study_uid="1.2.826.0.1.3680043.11.1",
                                         series_uid="1.2.826.0.1.3680043.11.1.1", sop_uid="1.2.826.0.1.3680043.11.1.1.1"))
    run_cli("ingest", str(source), store=store, check=True)
    with orthanc(tmp_path / "orthanc") as server:
        config = export_config(tmp_path / "dicomfs.toml", server, transfer_syntaxes=["ImplicitVRLittleEndian"])
        done = dicomfs_in(server, store, config, "export", "--to", "orthanc", "--wait", "SYNTAX")
        assert done.returncode == 0, done.stderr
        arrived = pydicom.dcmread(io.BytesIO(server.file_of("1.2.826.0.1.3680043.11.1.1.1")))
        original = pydicom.dcmread(source)
        assert arrived.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        assert arrived.PixelData == original.PixelData and arrived.PatientID == "SYNTAX"


def test_an_archive_that_goes_away_mid_job_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", patients=1, studies_per_patient=2, series_per_study=3,
                          instances_per_series=25, pixels=32, seed=11)
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(corpus.root), store=store, check=True)
    expected = {f.sop_uid for f in corpus.valid_files}
    # The proxy holds the 21st request until Orthanc is down: the job is caught mid-way however
    # fast this machine sends (unheld, the whole job took 0.3 s, less than a poll or two).
    with orthanc(tmp_path / "orthanc") as server, stow_proxy(server, tmp_path / "proxy", hold_after=20) as proxy:
        config = export_config(tmp_path / "dicomfs.toml", server, url=proxy.url, instances_per_request=1)
        config.write_text(config.read_text().replace("max_attempts = 3", "max_attempts = 50"))
        queued = run_cli("export", "--to", "orthanc", "PAT00001", store=store, config=config, check=True)
        job_id = queued.stdout.split()[1].rstrip(":")
        with worker_running(server, store, config):
            wait_until(proxy.holding, 30, step=0.02)
            server.stop()  # killed mid-job
            proxy.open_gate()
            wait_until(lambda: proxy.unanswered() >= 2, 30)  # the held request, and a retry
            stalled = job_json(store, config, job_id)
            assert stalled["state"] in ("pending", "running"), json.dumps(stalled)
            assert stalled["done_items"] == 20, json.dumps(stalled)
            server.start()
            wait_until(lambda: job_json(store, config, job_id)["state"] == "success", 60)
        final = job_json(store, config, job_id)
        assert final["state"] == "success", json.dumps(final)
        assert server.sop_uids() == expected and final["done_items"] == len(expected)
        # Nothing acknowledged was sent twice: Orthanc counts one stored instance per receipt.
        status, body = server.rest("GET", "/statistics")
        assert status == 200 and json.loads(body)["CountInstances"] == len(expected)


def test_failures_then_jobs_retry_succeeds(tmp_path: Path, filled_store: Path) -> None:
    with orthanc(tmp_path / "orthanc") as server:
        config = export_config(tmp_path / "dicomfs.toml", server)
        server.stop()
        failed = dicomfs_in(server, filled_store, config, "export", "--to", "orthanc", "--wait", "PAT00001")
        assert failed.returncode == 1 and "failure" in failed.stdout and "refused" in failed.stdout.lower()
        job_id = failed.stdout.split()[1].rstrip(":")
        server.start()
        assert "pending" in run_cli("jobs", "retry", job_id, store=filled_store, config=config, check=True).stdout
        with worker_running(server, filled_store, config):
            wait_until(lambda: job_json(filled_store, config, job_id)["state"] == "success", 60)
        assert job_json(filled_store, config, job_id)["state"] == "success"


def test_a_job_outside_the_schedule_waits_visibly(tmp_path: Path, filled_store: Path) -> None:
    with orthanc(tmp_path / "orthanc") as server:
        later = (datetime.now() + timedelta(hours=3)).hour
        config = export_config(tmp_path / "dicomfs.toml", server, schedule=f"hour={later}")
        queued = run_cli("export", "--to", "orthanc", "PAT00001", store=filled_store, config=config, check=True)
        job_id = queued.stdout.split()[1].rstrip(":")
        with worker_running(server, filled_store, config):
            wait_until(lambda: bool(job_json(filled_store, config, job_id)["waiting_for"]), 20, step=0.1)
        waiting = job_json(filled_store, config, job_id)
        assert waiting["state"] == "pending" and f"hour={later}" in str(waiting["waiting_for"])
        assert server.sop_uids() == set()


def test_a_routing_rule_exports_matching_series_as_they_arrive(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    with orthanc(tmp_path / "orthanc") as server:
        config = export_config(tmp_path / "dicomfs.toml", server)
        config.write_text(config.read_text() + '[[routes]]\ndestination = "orthanc"\nmatch = { Modality = "CT" }\n'
                          "quiet_seconds = 1\n")
        with worker_running(server, store, config):
            time.sleep(0.5)  # the router's first step marks where routing starts
            run_cli("ingest", str(small_corpus.root), store=store)
            ct = {f.sop_uid for f in small_corpus.valid_files
                  if pydicom.dcmread(f.path, stop_before_pixels=True).get("Modality") == "CT"}
            assert ct
            wait_until(lambda: server.sop_uids() == ct, 30)
        assert server.sop_uids() == ct
        listed = run_cli("jobs", "ls", store=store, config=config, check=True).stdout
        assert "route Modality=CT" in listed and "success" in listed


def test_a_job_whose_destination_this_process_lacks_names_the_file_that_defined_it(tmp_path: Path, filled_store: Path) -> None:
    with orthanc(tmp_path / "orthanc") as server:
        config = export_config(tmp_path / "dicomfs.toml", server)
        queued = run_cli("export", "--to", "orthanc", "PAT00001", store=filled_store, config=config, check=True)
    job_id = queued.stdout.split()[1].rstrip(":")
    other = tmp_path / "other.toml"
    other.write_text("")  # a worker started with another configuration, one without that destination
    worker = subprocess.Popen([*dicomfs_command(), "--store", str(filled_store), "--config", str(other), "worker"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("running jobs")
        wait_until(lambda: bool(job_json(filled_store, other, job_id)["waiting_for"]), 20, step=0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if worker.stdout is not None:
            worker.stdout.close()
    waiting = str(job_json(filled_store, other, job_id)["waiting_for"])
    assert waiting == f"destination 'orthanc' is not configured in this process (the job was queued under {config})", waiting
