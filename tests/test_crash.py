"""Kill an ingest with SIGKILL at random moments: nothing acknowledged is lost, check stays clean.

A file counts as acknowledged when the child has printed its JSON result line: the command prints
it only after the instance is durable. After every kill, ``dicomfs check`` must be clean and every
acknowledged instance present with its exact bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dicomfs.samples import Corpus, write_corpus
from dicomfs.store.store import Store
from tests.conftest import dicomfs_command, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def crash_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    corpus = write_corpus(tmp_path_factory.mktemp("crash") / "c", patients=10, studies_per_patient=2,
                          series_per_study=4, instances_per_series=25, pixels=32, seed=11)
    assert corpus.instances == 2000
    return corpus


def _ingest_until_killed(store: Path, corpus: Path, delay: float) -> list[dict[str, object]]:
    """Run an ingest; kill it ``delay`` seconds after its first acknowledgement; return what it acked."""
    env = {**os.environ, "DICOMFS_CONFIG": os.devnull}
    child = subprocess.Popen([*dicomfs_command(), "--store", str(store), "ingest", "--json", str(corpus)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    acknowledged: list[dict[str, object]] = []
    first = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            acknowledged.append(json.loads(line))
            first.set()
        first.set()

    reader = threading.Thread(target=read)
    reader.start()
    first.wait(timeout=60)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(timeout=30)
    assert not reader.is_alive(), "something the killed ingest started still holds its stdout"
    assert child.stdout is not None
    child.stdout.close()
    return acknowledged


def test_crash_sigkill_loses_nothing_acknowledged(tmp_path: Path, crash_corpus: Corpus) -> None:
    store = tmp_path / "store"
    assert run_cli("init", store=store).returncode == 0
    chooser = random.Random(2026)
    acknowledged: dict[str, str] = {}
    for _ in range(5):
        for result in _ingest_until_killed(store, crash_corpus.root, chooser.uniform(0.0, 0.4)):
            if result["status"] in ("stored", "already_stored"):
                acknowledged[str(result["instance"])] = str(result["path"])
        checked = run_cli("check", store=store)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        _assert_present_and_intact(store, acknowledged)
    assert acknowledged, "no kill came after an acknowledgement: the test proved nothing"
    finished = run_cli("ingest", "--quiet", str(crash_corpus.root), store=store)
    assert finished.returncode == 0, finished.stderr
    stats = json.loads(run_cli("stats", "--json", store=store).stdout)
    assert stats["instances"] == 2000
    assert run_cli("check", store=store).returncode == 0


def _assert_present_and_intact(store: Path, acknowledged: dict[str, str]) -> None:
    with Store(store, readonly=True) as opened:
        for instance, source in acknowledged.items():
            with opened.open_instance(instance) as reader:
                stored = hashlib.sha256(b"".join(reader.iter_chunks())).hexdigest()
            assert stored == hashlib.sha256(Path(source).read_bytes()).hexdigest(), source
