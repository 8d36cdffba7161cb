"""One log line per copy into uploads/: through the real queue and its ingest process (#23)."""

from __future__ import annotations

import logging
import re
import time
import zipfile
from typing import Callable

import pytest

from dicomfs.store import Store
from dicomfs.upload_queue import QUIET_SECONDS, UploadQueue
from dicomfs.uploads import UploadArea
from tests.conftest import write_own_instance


def _summaries(caplog: pytest.LogCaptureFixture, label: str) -> list[str]:
    """The INFO lines starting ``label: ``, once one came and a quiet period more passed (for a second one)."""
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.INFO and r.getMessage().startswith(label + ": ")]
    deadline = time.monotonic() + QUIET_SECONDS + 10
    while not lines() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(QUIET_SECONDS)
    return lines()


def test_a_copy_of_40_files_in_several_groups_logs_one_total(open_store: Callable[..., Store],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(batch_files=8)  # groups of 8: five group commits for the copy
    area = UploadArea(store.folder / "uploads")
    paths = [write_own_instance(area.path(("cd1", "sub", f"{i:03d}.dcm")), i, patient="SUM",
                                series="1.2.826.0.1.3680043.10.97.1") for i in range(40)]
    queue = UploadQueue(store, area, origin="fuse")
    try:
        with caplog.at_level(logging.INFO):
            for path in paths:
                queue.submit(("cd1", "sub", path.name))
            assert queue.wait_idle(timeout=60)
            lines = _summaries(caplog, "uploads/cd1/")
    finally:
        queue.close()
    assert store.stats().instances == 40
    assert len(lines) == 1, lines  # not one a group
    assert re.fullmatch(r"uploads/cd1/: 40 files in \d+\.\d s: 40 stored", lines[0]), lines
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.getMessage().startswith("uploads/cd1/sub/")]


def test_a_zip_is_named_in_its_total_and_its_members_in_their_lines(open_store: Callable[..., Store],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    made = [write_own_instance(store.folder / "made" / f"{i}.dcm", i, patient="ZIP", series="1.2.826.0.1.3680043.10.97.2")
            for i in range(3)]
    with zipfile.ZipFile(area.path(("cd.zip",)), "w") as archive:
        for path in made:
            archive.write(path, f"DICOM/{path.name}")
        archive.writestr("README.TXT", "not an image\n")
    queue = UploadQueue(store, area, origin="webdav")
    try:
        with caplog.at_level(logging.INFO):
            queue.submit(("cd.zip",))
            assert queue.wait_idle(timeout=60)
            lines = _summaries(caplog, "uploads/cd.zip")
    finally:
        queue.close()
    assert store.stats().instances == 3
    assert len(lines) == 1, lines
    assert re.fullmatch(r"uploads/cd\.zip: 4 members in \d+\.\d s: 3 stored, 1 not stored \(see the lines above\)",
                        lines[0]), lines
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any(line.startswith("uploads/cd.zip:README.TXT: rejected") for line in said), said


def test_an_empty_file_is_logged_and_counted(open_store: Callable[..., Store], caplog: pytest.LogCaptureFixture) -> None:
    store = open_store()
    area = UploadArea(store.folder / "uploads")
    for i in range(2):
        write_own_instance(area.path(("cd2", f"{i}.dcm")), i, patient="EMPTY", series="1.2.826.0.1.3680043.10.97.3")
    area.path(("cd2", "empty.dcm")).write_bytes(b"")
    queue = UploadQueue(store, area, origin="fuse")
    try:
        with caplog.at_level(logging.INFO):
            for name in ("0.dcm", "empty.dcm", "1.dcm"):
                queue.submit(("cd2", name))
            assert queue.wait_idle(timeout=60)
            lines = _summaries(caplog, "uploads/cd2/")
    finally:
        queue.close()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"uploads/cd2/: 3 files in \d+\.\d s: 2 stored, 1 empty \(see the lines above\)", lines[0]), lines
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert "uploads/cd2/empty.dcm: empty file (0 bytes): nothing to store" in said, said
    assert area.path(("cd2", "empty.dcm")).exists()  # kept with its reason, as before
