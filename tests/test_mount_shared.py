"""A mount shared with other local users (``--allow-other``): the kernel checks the modes dicomfs
shows, and those give the mount's owner everything, ``mount.group`` reading and uploading, and
everyone else nothing.

Runs as root (the suite does), with ``setpriv`` playing the other users.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from dicomfs.samples import Corpus
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or os.geteuid() != 0
    or shutil.which("setpriv") is None,
    reason="needs /dev/fuse, fusermount3, setpriv and root (to act as other users)")

STRANGER = 65534  # nobody
GROUP = 4242      # a group that exists only as a number: the kernel needs no /etc/group entry


@pytest.fixture
def shared_mount(small_corpus: Corpus) -> Iterator[Path]:
    # Not under pytest's 0700 basetemp: the other users must reach the mountpoint for the modes to matter.
    top = Path(tempfile.mkdtemp(prefix="dicomfs-shared-", dir="/tmp"))
    try:
        top.chmod(0o755)
        store, mountpoint, config = top / "store", top / "m", top / "m.toml"
        mountpoint.mkdir()
        config.write_text(f"[mount]\ngroup = \"{GROUP}\"\n")
        run_cli("init", store=store, config=config, check=True)
        run_cli("ingest", "--quiet", str(small_corpus.root), store=store, config=config)
        done = run_cli("mount", str(mountpoint), "--auto-unmount", "--allow-other", store=store, config=config)
        assert done.returncode == 0, done.stderr
        yield mountpoint
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(top / "m")], check=False, capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def _as(uid: int, gid: int, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command],
                          capture_output=True, text=True, timeout=60)


def _first_instance(mountpoint: Path) -> Path:
    return next(p for p in (mountpoint / "by-patients").rglob("*.dcm"))


def test_mount_shared_stranger_sees_nothing(shared_mount: Path) -> None:
    listed = _as(STRANGER, STRANGER, "ls", str(shared_mount / "by-patients"))
    assert listed.returncode != 0 and "Permission denied" in listed.stderr, listed
    read = _as(STRANGER, STRANGER, "cat", str(_first_instance(shared_mount)))
    assert read.returncode != 0 and "Permission denied" in read.stderr
    upload = _as(STRANGER, STRANGER, "touch", str(shared_mount / "uploads" / "x.dcm"))
    assert upload.returncode != 0 and "Permission denied" in upload.stderr
    assert not (shared_mount / "uploads" / "x.dcm").exists()


def test_mount_shared_group_reads_and_uploads_but_never_deletes(shared_mount: Path, small_corpus: Corpus) -> None:
    listed = _as(STRANGER, GROUP, "ls", str(shared_mount / "by-patients"))
    assert listed.returncode == 0 and listed.stdout.strip(), listed
    instance = _first_instance(shared_mount)
    read = subprocess.run(["setpriv", f"--reuid={STRANGER}", f"--regid={GROUP}", "--clear-groups", "--", "cat", str(instance)],
                          capture_output=True, timeout=60)
    assert read.returncode == 0 and read.stdout == instance.read_bytes()
    removed = _as(STRANGER, GROUP, "rm", "-rf", str(instance.parent))
    assert removed.returncode != 0 and "Permission denied" in removed.stderr
    assert instance.exists()
    patient = instance.relative_to(shared_mount / "by-patients").parts[0]
    protect = _as(STRANGER, GROUP, "/usr/bin/python3", "-c", "import os, sys; os.setxattr(sys.argv[1], 'user.dicomfs.protected', b'1')",
                  str(shared_mount / "by-patients" / patient))
    assert protect.returncode != 0 and "Permission denied" in protect.stderr, protect
    sample = small_corpus.valid_files[0].path.read_bytes()
    copied = subprocess.run(["setpriv", f"--reuid={STRANGER}", f"--regid={GROUP}", "--clear-groups", "--",
                             "dd", f"of={shared_mount / 'uploads' / 'from-group.dcm'}", "status=none"],
                            input=sample, capture_output=True, timeout=60)
    assert copied.returncode == 0, copied.stderr


def test_mount_shared_owner_keeps_every_right(shared_mount: Path) -> None:
    instance = _first_instance(shared_mount)
    series = instance.parent
    shutil.rmtree(series)
    assert not series.exists()
