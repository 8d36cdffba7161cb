"""Setting the mount's read-ahead through sysfs (the real mount's is checked in test_mount.py)."""

from __future__ import annotations

import os
from pathlib import Path

from dicomfs.mount.readahead import set_read_ahead


def test_set_read_ahead_writes_the_sysfs_file_of_the_paths_device(tmp_path: Path) -> None:
    device = os.stat(tmp_path).st_dev
    folder = tmp_path / "bdi" / f"{os.major(device)}:{os.minor(device)}"
    folder.mkdir(parents=True)
    assert set_read_ahead(tmp_path, 1024, bdi=tmp_path / "bdi")
    assert (folder / "read_ahead_kb").read_text() == "1024\n"


def test_set_read_ahead_that_cannot_be_set_only_says_so(tmp_path: Path) -> None:
    assert not set_read_ahead(tmp_path, 1024, bdi=tmp_path / "no-such-bdi")
    assert not set_read_ahead(tmp_path / "missing", 1024, bdi=tmp_path)
