"""Exports with a bearer token, against the real Orthanc of tests/orthanc_server.py.

Orthanc cannot check bearer tokens itself, so each test runs tests/stow_proxy.py in Orthanc's
private network namespace: it answers 401 unless ``Authorization: Bearer <token>`` matches, and
otherwise forwards the request to Orthanc. dicomfs exports to the proxy; what arrives is checked in
Orthanc itself.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest

from dicomfs.samples import Corpus
from tests.conftest import dicomfs_command
from tests.orthanc_server import Orthanc, orthanc
from tests.stow_proxy import stow_proxy

pytestmark = pytest.mark.timeout(180)

TOKEN_VARIABLE = "DICOMFS_TEST_PACS_TOKEN"

def write_config(path: Path, url: str, **fields: object) -> Path:
    """A configuration with one destination, "pacs", at `url`."""
    lines = ["[destinations.pacs]", 'type = "stowrs"', f"url = {json.dumps(url)}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    lines += ["[jobs]", "retry_delay = 1", "retry_max_delay = 1", "max_attempts = 3", "poll_ms = 100"]
    path.write_text("\n".join(lines) + "\n")
    return path


def dicomfs(server: Orthanc, store: Path, config: Path, *args: str,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, run inside Orthanc's namespace (the only place the proxy can be
    reached). Its environment is this process' without TOKEN_VARIABLE, plus `env`."""
    base = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
    base["DICOMFS_CONFIG"] = str(config)
    return server.run([*dicomfs_command(), "--store", str(store), "--config", str(config), *args],
                      capture_output=True, text=True, timeout=120, env={**base, **(env or {})})


def job_id_of(done: subprocess.CompletedProcess[str]) -> str:
    first = done.stdout.split()
    assert len(first) >= 2 and first[0] == "job", done.stdout + done.stderr
    return first[1].rstrip(":")


def sop_uids_of(corpus: Corpus, patient: str) -> set[str]:
    return {f.sop_uid for f in corpus.valid_files if f.patient_id == patient}


def test_bearer_token_file_exports_everything_and_never_shows_the_token(
        tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    token_file = tmp_path / "pacs.token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    with orthanc(tmp_path / "orthanc") as server, stow_proxy(server, tmp_path / "proxy", token=token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token_file=str(token_file),
                              instances_per_request=4)
        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001")
        assert done.returncode == 0, done.stdout + done.stderr
        expected = sop_uids_of(small_corpus, "PAT00001")
        assert expected and server.sop_uids() == expected
        posts = proxy.posts()
        assert posts and all(p["status"] == 200 and not p["chunked"] for p in posts), posts  # all through the proxy
        assert token not in done.stdout + done.stderr

        shown = dicomfs(server, filled_store, config, "jobs", "show", job_id_of(done))
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["state"] == "success" and data["done_items"] == len(expected), shown.stdout
        assert token not in shown.stdout + shown.stderr

        described = dicomfs(server, filled_store, config, "config")
        assert described.returncode == 0, described.stderr
        assert token not in described.stdout + described.stderr
        assert f"bearer_token_file {token_file}" in described.stdout  # where it came from, not what it is


def test_bearer_token_env_right_wrong_and_missing(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    wrong = "bad-" + secrets.token_urlsafe(24)
    with orthanc(tmp_path / "orthanc") as server, stow_proxy(server, tmp_path / "proxy", token=token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token_env=TOKEN_VARIABLE)

        missing = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001")
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert TOKEN_VARIABLE in missing.stderr and "not set" in missing.stderr, missing.stderr
        assert token not in missing.stdout + missing.stderr and not missing.stdout.startswith("job")
        assert proxy.requests() == [] and server.sop_uids() == set()

        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00001",
                       env={TOKEN_VARIABLE: token})
        assert done.returncode == 0, done.stdout + done.stderr
        first = sop_uids_of(small_corpus, "PAT00001")
        assert server.sop_uids() == first
        assert token not in done.stdout + done.stderr

        refused = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00002",
                          env={TOKEN_VARIABLE: wrong})
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "failure" in refused.stdout and wrong not in refused.stdout + refused.stderr, refused.stdout
        assert server.sop_uids() == first  # nothing of PAT00002 got past the proxy
        rejected = [p for p in proxy.posts() if p["status"] == 401]
        assert rejected and all(p["authorization"] == "Bearer" for p in rejected), proxy.requests()

        shown = dicomfs(server, filled_store, config, "jobs", "show", job_id_of(refused), env={TOKEN_VARIABLE: wrong})
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["state"] == "failure", shown.stdout
        assert data["failed_items"] == len(sop_uids_of(small_corpus, "PAT00002")) and data["done_items"] == 0
        assert data["failures"] and all("401" in f["reason"] for f in data["failures"]), data["failures"]
        assert wrong not in shown.stdout


def test_chunked_bodies_through_the_bearer_proxy(tmp_path: Path, filled_store: Path, small_corpus: Corpus) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    with orthanc(tmp_path / "orthanc") as server, stow_proxy(server, tmp_path / "proxy", token=token) as proxy:
        config = write_config(tmp_path / "dicomfs.toml", proxy.url, bearer_token=token, chunked=True,
                              concurrency=2, instances_per_request=2)
        done = dicomfs(server, filled_store, config, "export", "--to", "pacs", "--wait", "PAT00002")
        assert done.returncode == 0, done.stdout + done.stderr
        assert server.sop_uids() == sop_uids_of(small_corpus, "PAT00002")
        posts = proxy.posts()
        assert len(posts) >= 2 and all(p["chunked"] and p["status"] == 200 for p in posts), posts
        assert token not in done.stdout + done.stderr
        described = dicomfs(server, filled_store, config, "config")
        assert described.returncode == 0 and token not in described.stdout + described.stderr
        assert "bearer_token (inline)" in described.stdout
