"""Where a background ``dicomfs mount`` logs: its stdin, stdout and stderr are /dev/null, so by
default a file in the store (``STORE/log/mount.log``), ``--log FILE`` or ``log.file`` elsewhere;
the command says which before it returns."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3 (apt install fuse3)")


@contextlib.contextmanager
def background_mount(tmp_path: Path, *options: str, config: str = "") -> Iterator[tuple[Path, Path, str]]:
    """A fresh store mounted in the background: (store, mountpoint, what ``dicomfs mount`` printed)."""
    store, mountpoint, config_file = tmp_path / "store", tmp_path / "mnt", tmp_path / "dicomfs.toml"
    config_file.write_text(config)
    mountpoint.mkdir()
    run_cli("init", store=store, config=config_file, check=True)
    done = run_cli("mount", str(mountpoint), "--auto-unmount", *options, store=store, config=config_file)
    try:
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mountpoint)
        yield store, mountpoint, done.stdout
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def logged_upload(mountpoint: Path, log: Path) -> str:
    """Copy a file that is not DICOM into uploads/ and return the log's line about it."""
    (mountpoint / "uploads" / "notes.txt").write_bytes(b"these are not the pixels you are looking for\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in (log.read_text() if log.exists() else "").splitlines() if "notes.txt" in line]
        if lines:
            return lines[0]
        time.sleep(0.2)
    raise AssertionError(f"no line about notes.txt in {log}:\n{log.read_text() if log.exists() else '(no file)'}")


def test_a_background_mount_logs_into_the_store_and_says_so(tmp_path: Path) -> None:
    with background_mount(tmp_path) as (store, mountpoint, printed):
        log = store / "log" / "mount.log"
        assert printed == f"mounted {mountpoint}; logging to {log}\n"
        line = logged_upload(mountpoint, log)
        assert "uploads/notes.txt: rejected (not DICOM" in line, line
        assert f"mounted {store}" in log.read_text()


def test_log_option_chooses_the_file(tmp_path: Path) -> None:
    chosen = tmp_path / "logs" / "pacs.log"
    chosen.parent.mkdir()
    with background_mount(tmp_path, "--log", str(chosen)) as (store, mountpoint, printed):
        assert printed == f"mounted {mountpoint}; logging to {chosen}\n"
        assert "rejected (not DICOM" in logged_upload(mountpoint, chosen)
        assert not (store / "log" / "mount.log").exists()


def test_log_file_of_the_configuration_wins_over_the_default(tmp_path: Path) -> None:
    configured = tmp_path / "configured.log"
    with background_mount(tmp_path, config=f'[log]\nfile = "{configured}"\n') as (store, mountpoint, printed):
        assert printed == f"mounted {mountpoint}; logging to {configured}\n"
        assert "rejected (not DICOM" in logged_upload(mountpoint, configured)
        assert not (store / "log" / "mount.log").exists()


def test_a_log_that_cannot_be_written_is_said_before_mounting(tmp_path: Path) -> None:
    store, mountpoint = tmp_path / "store", tmp_path / "mnt"
    mountpoint.mkdir()
    run_cli("init", store=store, check=True)
    done = run_cli("mount", str(mountpoint), "--auto-unmount", "--log", str(tmp_path / "missing" / "x.log"), store=store)
    assert done.returncode == 1 and not os.path.ismount(mountpoint)
    assert "x.log" in done.stderr and "No such file or directory" in done.stderr, done.stderr


def test_why_the_daemon_stopped_is_in_its_log(tmp_path: Path) -> None:
    """The parent prints it, but only until the mount is up; the log keeps it for later failures."""
    mountpoint, log = tmp_path / "mnt", tmp_path / "mount.log"
    mountpoint.mkdir()
    done = run_cli("mount", str(mountpoint), "--auto-unmount", "--log", str(log), store=tmp_path / "no-store")
    assert done.returncode == 1 and not os.path.ismount(mountpoint)
    reason = done.stderr.strip().removeprefix("dicomfs: ")
    assert reason and reason in log.read_text(), (done.stderr, log.read_text())


def test_a_mount_of_an_empty_folder_leaves_it_empty_for_dicomfs_init(tmp_path: Path) -> None:
    """`dicomfs init` refuses a folder that holds anything and is no store: no log folder is made there."""
    store, mountpoint = tmp_path / "not-yet", tmp_path / "mnt"
    store.mkdir()
    mountpoint.mkdir()
    done = run_cli("mount", str(mountpoint), "--auto-unmount", store=store)
    assert done.returncode == 1 and "no dicomfs store" in done.stderr, done.stderr
    assert list(store.iterdir()) == []
    run_cli("init", store=store, check=True)
