"""Peer transfers between two real dicomfs instances on 127.0.0.1: each its own store and bridge
(``dicomfs webdav``), the job run by the real command line (``dicomfs send|pull --wait``)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomfs.passwords import hash_password
from dicomfs.samples import Corpus, write_corpus
from dicomfs.store import Instance, Level, Store
from tests.conftest import dicomfs_command, run_cli, self_signed_certificate
from tests.webdav_server import serve

USER, PASSWORD = "hospital-a", "s3cret-transfer"
BUCKET = 64 << 10
"""Small buckets, so 2,000 small instances take ~40 requests and the large ones go in chunks."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """2,000 small instances (10 patients) and 3 large ones of ~0.5 MB."""
    return write_corpus(tmp_path_factory.mktemp("transfer-corpus") / "c", patients=10, studies_per_patient=2,
                        series_per_study=2, instances_per_series=50, pixels=16, large=3, seed=11)


@pytest.fixture(scope="module")
def sender(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus) -> Path:
    store = tmp_path_factory.mktemp("sender") / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(corpus.root), store=store, check=True)
    return store


@dataclass(frozen=True)
class Contents:
    instances: dict[str, str]
    """id -> SHA-256."""
    size: int

    @classmethod
    def of(cls, folder: Path) -> Contents:
        with Store(folder, readonly=True) as store:
            found = [r for r in store.walk(Level.INSTANCE) if isinstance(r, Instance)]
            return cls({r.id: r.sha256 for r in found}, sum(r.size for r in found))


def receiver_config(folder: Path, rights: str = "read,transfer") -> Path:
    path = folder / "receiver.toml"
    path.write_text(f'[users.{USER}]\npassword_hash = "{hash_password(PASSWORD)}"\n'
                    f"rights = {json.dumps(rights.split(','))}\n")
    return path


def peer_config(folder: Path, url: str, *, gzip_on: bool = False, password: str = PASSWORD, peer: str = "",
                extra: str = "") -> Path:
    """The sending side's configuration: ``peer`` adds keys to [peers.remote], ``extra`` tables at the end."""
    path = folder / "sender.toml"
    path.write_text(f'[peers.remote]\nurl = "{url}"\nusername = "{USER}"\npassword_env = "PEER_SECRET"\n'
                    f'bucket_size = {BUCKET}\nworkers = 4\ngzip = {"true" if gzip_on else "false"}\n{peer}'
                    f"[jobs]\nretry_delay = 1\nretry_max_delay = 2\npoll_ms = 100\nmax_attempts = 3\n{extra}")
    os.environ["PEER_SECRET"] = password
    return path


def patient_ids(store: Path) -> list[str]:
    with Store(store, readonly=True) as opened:
        return [r.id for r in opened.walk(Level.PATIENT)]


def job_of(output: str, store: Path, config: Path) -> dict[str, object]:
    job_id = output.split()[1].rstrip(":")
    shown = run_cli("jobs", "show", job_id, store=store, config=config, check=True)
    return dict(json.loads(shown.stdout))


def new_store(folder: Path) -> Path:
    run_cli("init", store=folder, check=True)
    return folder


@pytest.mark.parametrize("gzip_on", [False, True], ids=["plain", "gzip"])
def test_push_then_pull_moves_everything_exactly(tmp_path: Path, sender: Path, gzip_on: bool) -> None:
    original = Contents.of(sender)
    assert len(original.instances) == 2003
    receiver = new_store(tmp_path / "b")
    with serve(receiver, config=receiver_config(tmp_path)) as bridge:
        config = peer_config(tmp_path, bridge.url, gzip_on=gzip_on)
        pushed = run_cli("send", "--to", "remote", "--wait", *patient_ids(sender), store=sender, config=config)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert "success: 2003 of 2003 done, 0 failed" in pushed.stdout
        assert Contents.of(receiver) == original  # every instance, byte for byte (SHA-256), none twice
        job = job_of(pushed.stdout, sender, config)
        extra = job["extra"]
        assert isinstance(extra, dict)
        assert extra["content_bytes"] == original.size and extra["skipped_items"] == 0
        if gzip_on:
            assert extra["wire_bytes"] < original.size / 1.5
        else:  # the instances and the buckets' manifests (~130 bytes per instance: ids and SHA-256s)
            assert original.size < extra["wire_bytes"] < original.size * 1.1

        # And back the other way: a third store pulls it all from the receiver's bridge.
        third = new_store(tmp_path / "c")
        pulled = run_cli("pull", "--from", "remote", "--wait", *patient_ids(receiver), store=third, config=config)
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert Contents.of(third) == original
        assert run_cli("check", store=third).returncode == 0
    with Store(receiver, readonly=True) as opened:
        some = next(r for r in opened.walk(Level.INSTANCE) if isinstance(r, Instance))
        assert (some.origin, some.remote) == ("transfer", f"{USER}@127.0.0.1")
    assert run_cli("check", store=receiver).returncode == 0
    assert not any((receiver / "transfers" / "partial").iterdir())  # every chunk became an instance


def test_only_what_the_peer_lacks_travels(tmp_path: Path, sender: Path, corpus: Corpus) -> None:
    receiver = new_store(tmp_path / "b")
    half = sorted(p for p in corpus.root.iterdir() if p.name.startswith("PAT"))[:5]
    run_cli("ingest", *map(str, half), store=receiver, check=True)
    already = Contents.of(receiver)
    original = Contents.of(sender)
    assert 0 < len(already.instances) < len(original.instances)
    with serve(receiver, config=receiver_config(tmp_path)) as bridge:
        config = peer_config(tmp_path, bridge.url)
        pushed = run_cli("send", "--to", "remote", "--wait", *patient_ids(sender), store=sender, config=config)
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    extra = job_of(pushed.stdout, sender, config)["extra"]
    assert isinstance(extra, dict)
    assert extra["skipped_items"] == len(already.instances)
    assert extra["content_bytes"] == original.size - already.size  # the other half, exactly
    assert Contents.of(receiver) == original


def test_push_resumes_after_the_receiver_is_killed(tmp_path: Path, sender: Path) -> None:
    original = Contents.of(sender)
    receiver = new_store(tmp_path / "b")
    port = _free_port()
    receiving = receiver_config(tmp_path)
    with serve(receiver, config=receiving, args=("--bind", f"127.0.0.1:{port}")) as bridge:
        config = peer_config(tmp_path, bridge.url)
        env = {**os.environ, "DICOMFS_CONFIG": str(config)}
        sending = subprocess.Popen([*dicomfs_command(), "--store", str(sender), "--config", str(config), "send",
                                    "--to", "remote", "--wait", *patient_ids(sender)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        with Store(receiver, readonly=True) as watched:
            deadline = time.monotonic() + 60
            while watched.stats().instances < 300 and time.monotonic() < deadline and sending.poll() is None:
                time.sleep(0.01)
            assert bridge.process is not None
            bridge.process.send_signal(signal.SIGKILL)  # mid-transfer, without a chance to tidy up
            bridge.process.wait()
            stored_at_kill = watched.stats().instances
    assert 0 < stored_at_kill < len(original.instances), "the kill must land mid-transfer"
    time.sleep(1.5)  # the sender meets a closed port, and backs off
    with serve(receiver, config=receiving, args=("--bind", f"127.0.0.1:{port}")):
        output, errors = sending.communicate(timeout=120)
    assert sending.returncode == 0, output + errors
    assert "success: 2003 of 2003 done" in output
    assert Contents.of(receiver) == original
    assert run_cli("check", store=receiver).returncode == 0
    extra = job_of(output, sender, config)["extra"]
    assert isinstance(extra, dict)
    # What was committed before the kill was found by the lookup and not sent again: at most the
    # buckets in flight at the kill travelled twice.
    assert extra["skipped_items"] >= stored_at_kill - 4 * 100
    assert extra["content_bytes"] <= original.size + 4 * BUCKET


def test_a_receiver_that_is_full_defers_the_job_and_loses_nothing(tmp_path: Path, sender: Path, corpus: Corpus) -> None:
    receiver = new_store(tmp_path / "b")
    run_cli("ingest", str(corpus.root / "PAT00001"), store=receiver, check=True)
    run_cli("protect", "PAT00001", store=receiver, check=True)
    receiving = receiver_config(tmp_path)
    receiving.write_text("[storage]\nmax_patients = 1\n" + receiving.read_text())  # and that one is protected
    with serve(receiver, config=receiving) as bridge:
        config = peer_config(tmp_path, bridge.url)
        pushed = run_cli("send", "--to", "remote", "--wait", "PAT00002", store=sender, config=config)
        assert pushed.returncode == 1
        job = job_of(pushed.stdout, sender, config)
        # Not one instance failed for good: the receiver's state, not the data, stopped them.
        assert job["failed_items"] == 0 and job["done_items"] == 0 and job["pending_items"] == 200
        assert "could not be stored now" in str(job["last_error"]) and "protected" in str(job["last_error"])
    run_cli("unprotect", "PAT00001", store=receiver, check=True)  # room may be made by recycling it now
    with serve(receiver, config=receiving) as bridge:
        config = peer_config(tmp_path, bridge.url)
        assert run_cli("jobs", "retry", str(job["id"]), store=sender, config=config).returncode == 0
        with _worker(sender, config):
            waited = _when_final(sender, config, str(job["id"]))
    assert waited["state"] == "success" and waited["done_items"] == 200
    with Store(sender, readonly=True) as opened:
        wanted = {r.id for r in opened.walk(Level.INSTANCE, opened.resolve_one("PAT00002").id)}
    assert set(Contents.of(receiver).instances) == wanted  # PAT00001 was recycled to make room


def test_wrong_password_fails_the_job_clearly(tmp_path: Path, sender: Path) -> None:
    receiver = new_store(tmp_path / "b")
    with serve(receiver, config=receiver_config(tmp_path)) as bridge:
        config = peer_config(tmp_path, bridge.url, password="not-the-password")
        pushed = run_cli("send", "--to", "remote", "--wait", patient_ids(sender)[0], store=sender, config=config)
        pulled = run_cli("pull", "--from", "remote", "--wait", "anything", store=new_store(tmp_path / "c"), config=config)
    assert pushed.returncode == 1
    assert "failure: 0 of" in pushed.stdout
    assert "refused the credentials (401): check username and password of [peers.remote]" in pushed.stdout
    assert "not-the-password" not in pushed.stdout + pushed.stderr
    assert pulled.returncode == 1 and "refused the credentials (401)" in pulled.stderr
    assert Contents.of(receiver).instances == {}


def test_a_user_without_the_transfer_right_is_refused(tmp_path: Path, sender: Path) -> None:
    receiver = new_store(tmp_path / "b")
    with serve(receiver, config=receiver_config(tmp_path, rights="read,upload")) as bridge:
        config = peer_config(tmp_path, bridge.url)
        pushed = run_cli("send", "--to", "remote", "--wait", patient_ids(sender)[0], store=sender, config=config)
    assert pushed.returncode == 1
    assert "forbidden (403): the peer's user needs the 'transfer' right" in pushed.stdout


def test_push_over_https_checks_the_peer_certificate(tmp_path: Path, sender: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    receiver = new_store(tmp_path / "b")
    receiving = receiver_config(tmp_path)
    receiving.write_text(f"[webdav]\ncertificate = '{cert}'\nprivate_key = '{key}'\n" + receiving.read_text())
    patient = patient_ids(sender)[0]
    with serve(receiver, config=receiving, context=ssl.create_default_context(cafile=str(cert))) as bridge:
        assert bridge.url.startswith("https://")
        untrusted = run_cli("send", "--to", "remote", "--wait", patient, store=sender,
                            config=peer_config(tmp_path, bridge.url))
        assert untrusted.returncode == 1 and "the peer's TLS certificate is not trusted" in untrusted.stdout
        trusted = run_cli("send", "--to", "remote", "--wait", patient, store=sender,
                          config=peer_config(tmp_path, bridge.url, gzip_on=True, peer=f"tls_ca_file = '{cert}'\n"))
        assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    with Store(sender, readonly=True) as opened:
        wanted = {r.id for r in opened.walk(Level.INSTANCE, patient)}
    assert set(Contents.of(receiver).instances) == wanted


def test_the_endpoints_refuse_bad_input_with_clear_answers(tmp_path: Path) -> None:
    receiver = new_store(tmp_path / "b")
    auth = (USER, PASSWORD)
    with serve(receiver, config=receiver_config(tmp_path), auth=auth) as bridge:
        assert bridge.request("GET", "/transfers/", auth=(USER, "wrong")).status == 401
        hello = bridge.request("GET", "/transfers/")
        assert hello.status == 200 and json.loads(hello.body)["protocol"] == 1
        garbage = bridge.request("POST", "/transfers/buckets", b"not a bucket", {"Content-Type": "application/octet-stream"})
        assert garbage.status == 400 and b"bad magic" in garbage.body
        cut = bridge.request("POST", "/transfers/buckets", gzip.compress(b"DFSB")[:-6], {"Content-Encoding": "gzip"})
        assert cut.status == 400
        deflate, block = zlib.compressobj(1, wbits=31), bytes(1 << 20)
        bomb = b"".join(deflate.compress(block) for _ in range(200)) + deflate.flush()  # 200 MiB in ~200 kB
        refused = bridge.request("POST", "/transfers/buckets", bomb, {"Content-Encoding": "gzip"})
        assert refused.status == 400 and b"bad magic" in refused.body  # read no further than its header
        assert bridge.request("POST", "/transfers/lookup", b"[1,2]").status == 400
        assert bridge.request("POST", "/transfers/lookup", b'{"instances": [["x"]]}').status == 400
        assert bridge.request("GET", "/transfers/plans/" + "0" * 64 + "/0").status == 404
        assert bridge.request("DELETE", "/transfers/lookup").status == 405
        # The WebDAV tree beside the endpoints is untouched.
        assert bridge.request("PROPFIND", "/", headers={"Depth": "0"}).status == 207
    assert Contents.of(receiver).instances == {}


def test_a_route_sends_new_series_to_a_peer(tmp_path: Path, corpus: Corpus) -> None:
    origin = new_store(tmp_path / "a")
    receiver = new_store(tmp_path / "b")
    with serve(receiver, config=receiver_config(tmp_path)) as bridge:
        config = peer_config(tmp_path, bridge.url, extra='[[routes]]\ndestination = "remote"\n'
                                                          'match = { PatientID = "PAT00002" }\nquiet_seconds = 0\n')
        with _worker(origin, config):
            time.sleep(1)  # the router starts from the store's state when it first runs
            run_cli("ingest", str(corpus.root / "PAT00001"), str(corpus.root / "PAT00002"), store=origin, check=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(Contents.of(receiver).instances) < 200:
                time.sleep(0.2)
    sent = Contents.of(receiver)
    with Store(origin, readonly=True) as opened:
        wanted = {r.id for r in opened.walk(Level.INSTANCE, opened.resolve_one("PAT00002").id)}
    assert set(sent.instances) == wanted and len(wanted) == 200


def _when_final(store: Path, config: Path, job_id: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        job = json.loads(run_cli("jobs", "show", job_id, store=store, config=config, check=True).stdout)
        if job["state"] in ("success", "failure", "canceled") or time.monotonic() > deadline:
            return dict(job)
        time.sleep(0.3)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _worker:
    """``dicomfs worker`` on a store, stopped at the end of the block."""

    def __init__(self, store: Path, config: Path) -> None:
        self.command = [*dicomfs_command(), "--store", str(store), "--config", str(config), "worker"]
        self.env = {**os.environ, "DICOMFS_CONFIG": str(config)}

    def __enter__(self) -> subprocess.Popen[str]:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        return self.process

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
