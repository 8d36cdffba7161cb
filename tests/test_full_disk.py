"""A store whose disk fills up: clear verdicts, nothing acknowledged lost, a store that checks clean.

The store lives on a small tmpfs mounted for the test (root only; skipped elsewhere, saying why).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from dicomfs.samples import write_corpus
from dicomfs.store.check import check_store
from dicomfs.store.committer import WriteSettings
from dicomfs.store.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)
            pytest.fail("the store still held files on the disk after it was closed")


@pytest.mark.parametrize("files", [40, 120])  # the committer thread, and the worker processes
def test_full_disk_rejects_clearly_and_loses_nothing(small_disk: Path, tmp_path: Path, files: int) -> None:
    corpus = write_corpus(tmp_path / "c", patients=1, studies_per_patient=1, series_per_study=1,
                          instances_per_series=files, pixels=384, seed=4)  # ~300 KB each: 12+ MB
    with Store.create(small_disk / "store", settings=WriteSettings(batch_files=8)) as store:
        results = list(store.ingest([corpus.root]))
        statuses = Counter(r.status for r in results)
        assert len(results) == files
        assert statuses["stored"] > 0 and statuses["rejected"] > 0
        for result in results:
            if result.status == "rejected":
                assert "no space left" in result.reason, result.reason
            else:
                with store.open_instance(result.ids[3]) as reader:  # type: ignore[index]
                    stored = hashlib.sha256(b"".join(reader.iter_chunks())).digest()
                assert stored == hashlib.sha256(Path(result.path).read_bytes()).digest()
        assert store.stats().instances == statuses["stored"]
        assert check_store(store).clean
