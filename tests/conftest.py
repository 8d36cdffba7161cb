"""Shared fixtures: stores in temporary folders and synthetic corpora made by dicomfs.samples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomfs.samples import Corpus, make_instance, write_corpus, write_instance
from dicomfs.store.committer import WriteSettings
from dicomfs.store.store import Store

SHARED_CORPUS_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "make_corpus.py"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """2 patients x 2 studies x 2 series x 3 instances, plus bad and tricky files (read-only!)."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", bad=True, tricky=True, seed=7)


@pytest.fixture(scope="session")
def large_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """A few 512x512 instances, several compression blocks each (read-only!)."""
    return write_corpus(tmp_path_factory.mktemp("large") / "c", patients=1, studies_per_patient=1,
                        series_per_study=1, instances_per_series=1, large=3, seed=3)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    """Open a fresh store (or reopen one) with the given WriteSettings fields; closed at the end."""
    opened: list[Store] = []

    def opener(folder: Path | None = None, **settings: object) -> Store:
        store = Store.create(folder or tmp_path / "store", settings=WriteSettings(**settings))  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def shared_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The team's independent corpus (../shared/corpus), when this checkout has it beside it."""
    if not SHARED_CORPUS_SCRIPT.exists():
        pytest.skip(f"independent cross-check skipped: {SHARED_CORPUS_SCRIPT} is not here (a user's clone has no ../shared)")
    out = tmp_path_factory.mktemp("shared") / "unit"
    subprocess.run(
        [sys.executable, str(SHARED_CORPUS_SCRIPT), str(out), "--patients", "3", "--studies-per-patient", "2",
         "--series-per-study", "2", "--instances-per-series", "3", "--seed", "1", "--tricky", "--dicomdir",
         "--zip", "--jobs", "1"],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture
def filled_store(tmp_path: Path, small_corpus: Corpus) -> Path:
    """A store made with the command line and holding ``small_corpus``."""
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(small_corpus.root), store=store)
    return store


def dicomfs_command() -> list[str]:
    """How tests run the real command line: this interpreter, module mode."""
    return [sys.executable, "-m", "dicomfs"]


def run_cli(*args: str, store: Path, config: Path | None = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [*dicomfs_command(), "--store", str(store)]
    if config is not None:
        command += ["--config", str(config)]
    env = {**os.environ, "DICOMFS_CONFIG": os.devnull if config is None else str(config)}
    return subprocess.run([*command, *args], capture_output=True, text=True, check=check, timeout=timeout, env=env)


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl (skips the test without it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/setup installs it)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def write_own_instance(path: Path, index: int, *, patient: str, series: str, pixels: int = 16) -> Path:
    """A small valid instance with UIDs of its own (SOP ``series.index``, study ``series`` less its
    last part), written at ``path``, its folder made."""
    ds = make_instance(patient_id=patient, patient_name=f"{patient}^TEST", study_uid=series.rsplit(".", 1)[0],
                       series_uid=series, sop_uid=f"{series}.{index}", instance_number=index + 1,
                       rows=pixels, columns=pixels, seed=index)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_instance(path, ds)
    return path
