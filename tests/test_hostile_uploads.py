"""Uploads meant to mislead: names that forge log lines, and uploads cut short by a full disk.

Each goes through a real front end: a `dicomfs mount` daemon (FUSE) or a `dicomfs webdav` bridge,
in child processes, with their real log.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomfs.logformat import LOG_FORMAT, EscapingFormatter
from dicomfs.upload_worker import _Forwarder, _Records
from tests.conftest import run_cli, write_own_instance
from tests.webdav_server import serve

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3 (apt install fuse3)")
FORGED = "2026-01-01 00:00:00,000 INFO dicomfs: forged"
HOSTILE_NAME = f"x\r\n{FORGED}\u202e\x1b[31m"
"""CR LF then a whole log line, a right-to-left override and a terminal colour escape."""


def _wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _reason(path: Path) -> str | None:
    try:
        return os.getxattr(path, "user.dicomfs.error").decode()
    except OSError:
        return None


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A store mounted by a `dicomfs mount` daemon that logs at info into a file: (mountpoint, store, log)."""
    store, mountpoint, config, log = tmp_path / "store", tmp_path / "m", tmp_path / "m.toml", tmp_path / "m.log"
    config.write_text(f'[log]\nlevel = "info"\nfile = "{log}"\n')
    mountpoint.mkdir()
    run_cli("init", store=store, config=config, check=True)
    done = run_cli("mount", str(mountpoint), "--auto-unmount", store=store, config=config)
    assert done.returncode == 0, done.stderr
    try:
        yield mountpoint, store, log
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def _assert_not_forged(log: str) -> None:
    lines = log.splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:10]) or "forged" in line and "\\n" not in line], log
    assert any("x\\r\\n2026-01-01" in line and "\\u202e\\x1b[31m" in line for line in lines), log
    assert "\u202e" not in log and "\x1b" not in log and "\r" not in log


@needs_fuse
def test_a_name_with_cr_lf_uploaded_through_the_mount_forges_no_log_line(mounted: tuple[Path, Path, Path]) -> None:
    mountpoint, store, log = mounted
    (mountpoint / "uploads" / HOSTILE_NAME).write_bytes(b"not an image\n")
    _wait_for(lambda: _reason(store / "uploads" / HOSTILE_NAME) is not None)
    _wait_for(lambda: "not DICOM" in log.read_text())
    _assert_not_forged(log.read_text())


@needs_fuse
def test_a_non_utf8_upload_name_still_gets_its_log_line(mounted: tuple[Path, Path, Path]) -> None:
    """The log file is UTF-8: a name's undecodable bytes (surrogates in Python) must be escaped,
    or the handler fails to encode the record and the line is lost."""
    mountpoint, store, log = mounted
    name = b"bad\xff\xfe.txt"
    with open(os.path.join(os.fsencode(mountpoint / "uploads"), name), "wb") as upload:
        upload.write(b"not an image\n")
    _wait_for(lambda: "not DICOM" in log.read_text(errors="strict"))
    assert "bad\\xff\\xfe.txt" in log.read_text(), log.read_text()


def test_a_name_with_cr_lf_put_to_the_bridge_forges_no_log_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    quoted = "".join(c if c.isalnum() else "".join(f"%{b:02X}" for b in c.encode()) for c in HOSTILE_NAME)
    with serve(store) as bridge:
        assert bridge.request("PUT", f"/uploads/{quoted}", b"not an image\n").status == 201
        _wait_for(lambda: _reason(store / "uploads" / HOSTILE_NAME) is not None)
        _wait_for(lambda: "not DICOM" in bridge.log.read_text())
        _assert_not_forged(bridge.log.read_text())


# -- a full disk ---------------------------------------------------------------------------------

NO_SPACE = "no space left on device"
_LOCK = (b'<?xml version="1.0" encoding="utf-8" ?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/>'
         b'</D:lockscope><D:locktype><D:write/></D:locktype><D:owner><D:href>WORKGROUP\\user</D:href>'
         b'</D:owner></D:lockinfo>')


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A store alone on an 8 MB tmpfs (root only; skipped elsewhere, saying why), and a large
    instance beside it at tmp_path/big.dcm that cannot fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        run_cli("init", store=disk / "store", check=True)
        write_own_instance(tmp_path / "big.dcm", 0, patient="BIG", series="1.2.826.0.1.3680043.10.97.1.1", pixels=2600)
        yield disk / "store"
    finally:
        deadline = time.monotonic() + 30
        while subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:  # the daemon may be ending
            if time.monotonic() > deadline:
                subprocess.run(["umount", "--lazy", str(disk)], check=True)
                break
            time.sleep(0.2)


def _copy_until_full(source: Path, target: Path) -> None:
    with pytest.raises(OSError) as raised:
        shutil.copyfile(source, target)
    assert raised.value.errno == errno.ENOSPC


@needs_fuse
def test_an_upload_the_full_disk_cut_short_through_the_mount_says_no_space(small_store: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "m"
    mountpoint.mkdir()
    done = run_cli("mount", str(mountpoint), "--auto-unmount", store=small_store)
    assert done.returncode == 0, done.stderr
    try:
        _copy_until_full(tmp_path / "big.dcm", mountpoint / "uploads" / "big.dcm")
        _wait_for(lambda: _reason(small_store / "uploads" / "big.dcm") is not None)
        time.sleep(0.5)  # what the ingest might still write over it
        reason = _reason(small_store / "uploads" / "big.dcm")
        assert reason is not None and NO_SPACE in reason, reason
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


@pytest.mark.parametrize("locked", [False, True], ids=["plain-put", "locked-put"])
def test_an_upload_the_full_disk_cut_short_through_the_bridge_says_no_space(small_store: Path, tmp_path: Path,
                                                                            locked: bool) -> None:
    """A plain PUT (answered by bridge.fast_put), and one under a lock as Explorer sends it (wsgidav's)."""
    content = (tmp_path / "big.dcm").read_bytes()
    with serve(small_store) as bridge:
        headers = {}
        if locked:
            answer = bridge.request("LOCK", "/uploads/big.dcm", _LOCK, {"Timeout": "Second-3600"})
            assert answer.status in (200, 201), answer
            headers["If"] = f"({answer.headers['lock-token']})"
        try:
            answer = bridge.request("PUT", "/uploads/big.dcm", content, headers)
            assert answer.status >= 400, answer
        except (BrokenPipeError, ConnectionResetError):
            pass  # the bridge answered before the body was all sent, and closed rather than read the rest
        _wait_for(lambda: _reason(small_store / "uploads" / "big.dcm") is not None)
        if locked:
            assert bridge.request("UNLOCK", "/uploads/big.dcm", headers={"Lock-Token": headers["If"][1:-1]}).status == 204
        time.sleep(0.5)  # what the ingest might still write over it
        reason = _reason(small_store / "uploads" / "big.dcm")
        assert reason is not None and NO_SPACE in reason, reason


def test_log_tracebacks_keep_their_lines_indented_even_from_the_upload_helper() -> None:
    """An exception message may quote a client's string too: its lines stay inside the traceback,
    also for a record the upload helper forwards (pickled) to its front end."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logger = logging.getLogger("dicomfs.test-hostile")
    logger.propagate = False
    logger.addHandler(handler)
    forwarded = _Records()
    helper = logging.getLogger("dicomfs.test-hostile-helper")
    helper.propagate = False
    helper.addHandler(_Forwarder(forwarded))  # type: ignore[arg-type]
    try:
        for log in (logger, helper):
            try:
                raise ValueError(f"bad name {HOSTILE_NAME!s}")
            except ValueError:
                log.exception("ingest of %s failed", HOSTILE_NAME)
        for record in forwarded:
            logger.handle(pickle.loads(pickle.dumps(record)))
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().split("\n")
    records = [line for line in lines if line and not line.startswith("    ")]
    assert len(records) == 2 and all("ingest of x\\r\\n2026-01-01" in line for line in records), lines
    assert sum(line.strip().startswith("Traceback") for line in lines) == 2
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue() and "\u202e" not in out.getvalue()
