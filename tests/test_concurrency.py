"""Several processes use one store at once: the LMDB index serialises them, counts stay exact."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dicomfs.samples import write_corpus
from tests.conftest import dicomfs_command, run_cli

pytestmark = pytest.mark.slow


def test_concurrency_two_processes_ingest_into_one_store(tmp_path: Path) -> None:
    first = write_corpus(tmp_path / "a", patients=3, studies_per_patient=2, series_per_study=2, instances_per_series=20, seed=1)
    second = write_corpus(tmp_path / "b", patients=3, studies_per_patient=2, series_per_study=2, instances_per_series=20, seed=2)
    store = tmp_path / "store"
    assert run_cli("init", store=store).returncode == 0
    env = {**os.environ, "DICOMFS_CONFIG": os.devnull}
    # each process also ingests the other's folder: both race to store the same instances
    children = [subprocess.Popen([*dicomfs_command(), "--store", str(store), "ingest", "--json", str(a), str(b)],
                                 stdout=subprocess.PIPE, text=True, env=env)
                for a, b in ((first.root, second.root), (second.root, first.root))]
    outputs = [child.communicate(timeout=300)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    results = [json.loads(line) for output in outputs for line in output.splitlines()]
    stored = [r for r in results if r["status"] == "stored"]
    assert len(stored) == first.instances + second.instances  # each instance stored by exactly one
    stats = json.loads(run_cli("stats", "--json", store=store).stdout)
    assert stats["instances"] == first.instances + second.instances
    assert stats["patients"] == len({f.patient_id for f in (*first.files, *second.files)})
    assert run_cli("check", store=store).returncode == 0


def test_concurrency_reader_sees_a_writer_commit(tmp_path: Path) -> None:
    from dicomfs.store.store import Store

    corpus = write_corpus(tmp_path / "c", seed=5)
    store = tmp_path / "store"
    Store.create(store).close()
    with Store(store, readonly=True) as reader:
        before = reader.change_number()
        assert run_cli("ingest", "--quiet", str(corpus.root), store=store).returncode == 0
        assert reader.change_number() > before
        assert reader.stats().instances == corpus.instances
