"""The FUSE mount, for real: `dicomfs mount` in the background, then plain file operations on it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomfs.samples import Corpus, make_instance, write_instance
from tests.conftest import dicomfs_command, run_cli, write_own_instance

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                reason="needs /dev/fuse and fusermount3 (apt install fuse3)")

VIEWS = ("by-patients", "by-studies", "by-dates", "by-uids")


class Mounted:
    def __init__(self, store: Path, mountpoint: Path, config: Path) -> None:
        self.store, self.path, self.config = store, mountpoint, config


def _unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """Mount a store (created, and filled from ``ingest`` paths) with extra `dicomfs mount` options."""
    mounted: list[Path] = []

    def mounter(*options: str, ingest: tuple[Path, ...] = (), config: str = "", name: str = "m") -> Mounted:
        store, mountpoint, config_file = tmp_path / f"store-{name}", tmp_path / name, tmp_path / f"{name}.toml"
        config_file.write_text(config)
        mountpoint.mkdir()
        run_cli("init", store=store, config=config_file, check=True)
        if ingest:
            run_cli("ingest", "--quiet", *map(str, ingest), store=store, config=config_file)
        done = run_cli("mount", str(mountpoint), "--auto-unmount", *options, store=store, config=config_file)
        assert done.returncode == 0, done.stderr
        mounted.append(mountpoint)
        assert os.path.ismount(mountpoint)
        return Mounted(store, mountpoint, config_file)

    yield mounter
    for mountpoint in mounted:
        _unmount(mountpoint)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _instances(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_mount_every_view_lists_every_instance_byte_equal(mount: Callable[..., Mounted], small_corpus: Corpus, compression: str) -> None:
    m = mount(ingest=(small_corpus.root,), config=f'[storage]\ncompression = "{compression}"\n')
    assert sorted(os.listdir(m.path)) == ["by-dates", "by-patients", "by-studies", "by-uids", "jobs", "uploads"]
    sources: dict[str, set[str]] = defaultdict(set)
    for sample in small_corpus.valid_files:
        sources[sample.sop_uid].add(_sha(sample.path))
    for view in VIEWS:
        files = _instances(m.path / view)
        assert len(files) == small_corpus.instances, view
        for path in files:
            sop = os.getxattr(path, "user.dicom.SOPInstanceUID").decode()
            assert _sha(path) in sources[sop], path
            assert path.stat().st_size == len(path.read_bytes())
    one = _instances(m.path / "by-uids")[0]
    sop = os.getxattr(one, "user.dicom.SOPInstanceUID").decode()
    same = [p for view in VIEWS for p in _instances(m.path / view) if os.getxattr(p, "user.dicom.SOPInstanceUID").decode() == sop]
    assert len({p.stat().st_ino for p in same}) == 1  # one inode in every view
    assert same[0].stat().st_nlink == 4


def test_mount_copy_into_uploads_ingests_valid_and_keeps_bad_with_reasons(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount()
    done = subprocess.run(["cp", "-r", str(small_corpus.root), str(m.path / "uploads" / "cd")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    expected_left = {s.path.name for s in small_corpus.invalid_files}
    while time.monotonic() < deadline:
        left = {p.name for p in (m.path / "uploads").rglob("*") if p.is_file()}
        if left <= expected_left:
            break
        time.sleep(0.2)
    left_paths = [p for p in (m.path / "uploads").rglob("*") if p.is_file()]
    assert {p.name for p in left_paths} == expected_left
    for path in left_paths:
        assert os.getxattr(path, "user.dicomfs.error").decode()
    stats = run_cli("stats", "--json", store=m.store, config=m.config)
    assert f'"instances": {small_corpus.instances}' in stats.stdout
    assert len(_instances(m.path / "by-uids")) == small_corpus.instances


def test_mount_rm_r_of_a_study_deletes_it_everywhere(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount(ingest=(small_corpus.root,))
    study = sorted((m.path / "by-studies").iterdir())[0]
    study_uid = os.getxattr(study, "user.dicom.StudyInstanceUID").decode()
    count = len(_instances(study))
    assert count > 0
    done = subprocess.run(["rm", "-r", str(study)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not study.exists()
    for view in VIEWS:
        assert len(_instances(m.path / view)) == small_corpus.instances - count
    assert all(os.getxattr(p, "user.dicom.StudyInstanceUID").decode() != study_uid for p in _instances(m.path / "by-uids"))
    assert run_cli("check", store=m.store, config=m.config).returncode == 0


def test_mount_deletes_refused_when_not_allowed_and_renames_refused(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount(ingest=(small_corpus.root,), config="[mount]\ndelete_allowed = false\n")
    one = _instances(m.path / "by-uids")[0]
    with pytest.raises(PermissionError):
        one.unlink()
    with pytest.raises(OSError) as error:
        one.rename(one.with_name("renamed.dcm"))
    assert error.value.errno == errno.EPERM
    assert one.exists()


def test_mount_read_only_refuses_every_write(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount("--read-only", ingest=(small_corpus.root,))
    one = _instances(m.path / "by-uids")[0]
    for attempt in (one.unlink, lambda: (m.path / "by-uids" / "x").mkdir(), lambda: one.open("ab")):
        with pytest.raises(OSError) as error:
            attempt()  # type: ignore[operator]
        assert error.value.errno == errno.EROFS
    assert "uploads" not in os.listdir(m.path)


def test_mount_eight_concurrent_readers(mount: Callable[..., Mounted], large_corpus: Corpus) -> None:
    m = mount(ingest=(large_corpus.root,), config='[storage]\ncompression = "zlib"\n')
    files = _instances(m.path / "by-uids")
    expected = {p: _sha(p) for p in files}
    failures: list[str] = []

    def reader(seed: int) -> None:
        for round_ in range(3):
            for path in files[seed % len(files):] + files[:seed % len(files)]:
                if _sha(path) != expected[path]:
                    failures.append(f"{path} round {round_}")

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures


def test_mount_sees_an_ingest_by_the_cli_within_two_seconds(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    m = mount()
    source = tmp_path / "new.dcm"
    write_instance(source, make_instance(patient_id="LATE", patient_name="LATE^ARRIVAL", study_uid="7.1", series_uid="7.1.1", sop_uid="7.1.1.1"))
    assert os.listdir(m.path / "by-patients") == []
    started = time.monotonic()
    run_cli("ingest", "--quiet", str(source), store=m.store, config=m.config, check=True)
    while "LATE - LATE^ARRIVAL" not in os.listdir(m.path / "by-patients"):
        assert time.monotonic() - started < 2.0, "the mount did not show the CLI's ingest within 2 s"
        time.sleep(0.05)


def test_mount_xattrs_show_tags_and_set_metadata_and_protection(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount(ingest=(small_corpus.root,), config="[metadata]\nreviewed = 1024\n")
    patient = sorted((m.path / "by-patients").iterdir())[0]
    assert os.getxattr(patient, "user.dicom.PatientID")
    assert os.getxattr(patient, "user.dicomfs.protected") == b"0"
    os.setxattr(patient, "user.dicomfs.protected", b"1")
    assert os.getxattr(patient, "user.dicomfs.protected") == b"1"
    one = _instances(patient)[0]
    os.setxattr(one, "user.dicomfs.meta.reviewed", b"yes")
    assert os.getxattr(one, "user.dicomfs.meta.reviewed") == b"yes"
    assert "user.dicomfs.meta.ReceptionDate" in os.listxattr(one)
    with pytest.raises(OSError):
        os.setxattr(one, "user.dicomfs.meta.Origin", b"forged")  # core metadata is read-only
    os.removexattr(one, "user.dicomfs.meta.reviewed")
    assert "user.dicomfs.meta.reviewed" not in os.listxattr(one)
    with pytest.raises(OSError) as missing:
        os.getxattr(one, "user.dicomfs.meta.nothing")
    assert missing.value.errno == errno.ENODATA
    # Other namespaces are "not supported", so `ls -l` asks about SELinux and ACLs once, not per file
    for name in ("security.selinux", "system.posix_acl_access"):
        with pytest.raises(OSError) as unsupported:
            os.getxattr(one, name)
        assert unsupported.value.errno == errno.EOPNOTSUPP


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may drop the kernel's caches")
def test_mount_lists_alike_after_the_kernel_forgot_its_entries(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount(ingest=(small_corpus.root,))

    def walk() -> dict[str, int]:
        return {str(p.relative_to(m.path)): p.stat().st_ino for view in VIEWS for p in (m.path / view).rglob("*")}

    before = walk()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # dentries and inodes: the kernel sends FORGETs
    after = walk()  # listings are served again from what opendir built before, where still valid
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k.endswith(".dcm")} == {k: v for k, v in before.items() if k.endswith(".dcm")}


def _read_ahead_kb(mountpoint: Path) -> int:
    device = os.stat(mountpoint).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a device's read-ahead")
def test_mount_reads_ahead_as_configured(mount: Callable[..., Mounted]) -> None:
    assert _read_ahead_kb(mount().path) == 1024  # one READ request per MiB, not per 128 KiB
    assert _read_ahead_kb(mount(config="[mount]\nread_ahead_kb = 256\n", name="n").path) == 256


def test_mount_sigterm_unmounts_cleanly(mount: Callable[..., Mounted]) -> None:
    m = mount()
    pids = subprocess.run(["pgrep", "-f", f"mount {m.path} "], capture_output=True, text=True).stdout.split()
    assert pids
    for pid in pids:
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while os.path.ismount(m.path):
        assert time.monotonic() < deadline, "still mounted 10 s after SIGTERM"
        time.sleep(0.05)


def test_mount_refuses_bad_mountpoints_with_one_line(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    m = mount()
    missing = run_cli("mount", str(tmp_path / "nowhere"), store=m.store, config=m.config)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    again = run_cli("mount", str(m.path), store=m.store, config=m.config)
    assert again.returncode == 1 and "already a mountpoint" in again.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    refused = run_cli("mount", str(full), store=m.store, config=m.config)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    done = subprocess.run([*dicomfs_command(), "umount", str(m.path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(m.path)


def _has_reason(path: Path) -> bool:
    try:
        return bool(os.getxattr(path, "user.dicomfs.error"))
    except OSError:
        return False


def _kept_upload(m: Mounted, content: bytes) -> tuple[Path, Path]:
    """uploads/notes.txt written through the mount and kept (not DICOM: it stays, with its
    reason); its path through the mount and in the store."""
    through_mount, real = m.path / "uploads" / "notes.txt", m.store / "uploads" / "notes.txt"
    through_mount.write_bytes(content)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _has_reason(real):
        time.sleep(0.05)
    assert _has_reason(real)
    return through_mount, real


def test_writing_over_an_upload_gives_the_new_version_a_new_file(mount: Callable[..., Mounted]) -> None:
    """cp or > over a file in uploads/ that nobody is writing: the file may be in the ingest's
    hands, so the new version gets a new inode; whoever holds the earlier one reads it unchanged."""
    m = mount()
    through_mount, real = _kept_upload(m, b"first version")
    with real.open("rb") as held:  # as the ingest process holds a file of the group it reads
        with through_mount.open("wb") as rewrite:  # O_TRUNC on a file nobody writes
            rewrite.write(b"second version, longer")
        assert held.read() == b"first version"
    assert through_mount.read_bytes() == real.read_bytes() == b"second version, longer"
    with through_mount.open("ab") as more:  # appending keeps writing the same (new) file
        more.write(b"!")
    assert real.read_bytes() == b"second version, longer!"
    assert sorted(p.name for p in real.parent.iterdir()) == ["notes.txt"]  # no staged name left behind
    with pytest.raises(FileExistsError):
        os.close(os.open(through_mount, os.O_WRONLY | os.O_CREAT | os.O_EXCL))


def test_a_complete_upload_is_never_changed_in_place(mount: Callable[..., Mounted]) -> None:
    """Appending to, rewriting part of or truncating a file in uploads/ that nobody is writing
    makes a new file with the change: the earlier one may be in the ingest's hands, or linked
    into the store already, and whoever holds it reads it unchanged. A writer's own open file is
    changed in place, as asked."""
    m = mount()
    through_mount, real = _kept_upload(m, b"first version")

    def changed(change: Callable[[], None], expected: bytes) -> None:
        with real.open("rb") as held:  # as the ingest holds it, or as blobs/ holds it once linked
            before = held.read()
            change()
            held.seek(0)
            assert held.read() == before
        assert through_mount.read_bytes() == real.read_bytes() == expected

    def append() -> None:
        with through_mount.open("ab") as more:
            more.write(b" and more")

    def overwrite_start() -> None:
        fd = os.open(through_mount, os.O_RDWR)
        try:
            os.pwrite(fd, b"F", 0)
        finally:
            os.close(fd)

    changed(append, b"first version and more")
    changed(overwrite_start, b"First version and more")
    changed(lambda: os.truncate(through_mount, 5), b"First")
    changed(lambda: os.truncate(through_mount, 8), b"First\0\0\0")
    with through_mount.open("r+b") as writer:  # its own file from here on: changed in place
        inode = real.stat().st_ino
        writer.truncate(2)
        writer.seek(0, os.SEEK_END)
        writer.write(b"!")
        writer.flush()
        assert real.stat().st_ino == inode
    assert real.read_bytes() == b"Fi!"
    with through_mount.open("rb") as reader:  # reading is no change
        inode = real.stat().st_ino
        assert reader.read() == b"Fi!"
    assert real.stat().st_ino == inode
    assert sorted(p.name for p in real.parent.iterdir()) == ["notes.txt"]  # no staged name left behind


def test_an_upload_touched_after_it_was_written_is_still_ingested(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    """Closing a file queues it with its size and date; `touch` (or `truncate`) right after moves
    them on, and the queue passes over a file whose stamp moved (it is being rewritten). The
    change re-queues it, so it is ingested all the same, at once rather than at a janitor pass."""
    m = mount()
    count = 20
    for index in range(count):
        target = write_own_instance(m.path / "uploads" / f"t{index:02d}.dcm", index, patient="TOUCH",
                                    series="1.2.826.0.1.3680043.10.7.1")
        try:
            os.utime(target, (1_000_000_000 + index, 1_000_000_000 + index))
        except FileNotFoundError:
            pass  # ingested already
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any((m.store / "uploads").iterdir()):
        time.sleep(0.05)
    assert not list((m.store / "uploads").iterdir())
    stats = json.loads(run_cli("stats", "--json", store=m.store, config=m.config).stdout)
    assert stats["instances"] == count


def test_uploads_renamed_once_written_are_ingested(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    """rsync writes each file under a temporary name and renames it when done, and `mv` moves a
    folder of finished files: the names they were queued under are gone by their turn, so the
    rename queues what it brought. Without that, they waited for a janitor pass, minutes later."""
    m = mount()
    uploads = m.path / "uploads"

    def instance(index: int, folder: Path, name: str) -> Path:
        return write_own_instance(folder / name, index, patient="MOVE", series="1.2.826.0.1.3680043.10.8.1")

    for index in range(10):  # as rsync does
        written = instance(index, uploads / "rsync", f".i{index:02d}.dcm.{index:06d}")
        try:
            written.rename(written.with_name(f"i{index:02d}.dcm"))
        except FileNotFoundError:
            pass  # ingested under its temporary name already
    for index in range(10, 20):  # a folder filled, then moved
        instance(index, uploads / "incoming", f"i{index:02d}.dcm")
    try:
        (uploads / "incoming").rename(uploads / "done")
    except FileNotFoundError:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [p for p in (m.store / "uploads").rglob("*") if p.is_file()]:
        time.sleep(0.05)
    assert not [p for p in (m.store / "uploads").rglob("*") if p.is_file()]
    stats = json.loads(run_cli("stats", "--json", store=m.store, config=m.config).stdout)
    assert stats["instances"] == 20


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync (scripts/setup installs it)")
def test_rsync_into_uploads_is_ingested(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    """The real rsync: temporary names, times set, renamed once written; every file is ingested
    within seconds, and rsync sees no error."""
    m = mount()
    done = subprocess.run(["rsync", "-a", f"{small_corpus.root}/", str(m.path / "uploads" / "cd")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected_left = {s.path.name for s in small_corpus.invalid_files}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and {p.name for p in (m.store / "uploads").rglob("*") if p.is_file()} - expected_left:
        time.sleep(0.05)
    assert {p.name for p in (m.store / "uploads").rglob("*") if p.is_file()} <= expected_left
    stats = json.loads(run_cli("stats", "--json", store=m.store, config=m.config).stdout)
    assert stats["instances"] == small_corpus.instances


def test_mount_uploads_janitor_removes_idle_empty_folders_rejected_files_and_junk(mount: Callable[..., Mounted]) -> None:
    m = mount(config="[uploads]\nrejected_ttl = 1\nempty_folder_idle = 1\n")
    uploads = m.path / "uploads"
    (uploads / "empty").mkdir()
    (uploads / "bad.txt").write_text("not DICOM")
    (uploads / ".DS_Store").write_bytes(b"\0" * 16)
    deadline = time.monotonic() + 2
    while (uploads / ".DS_Store").exists():  # OS clutter goes at once
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert os.getxattr(uploads / "bad.txt", "user.dicomfs.error")
    deadline = time.monotonic() + 15  # the janitor runs every 5 s
    while os.listdir(uploads):
        assert time.monotonic() < deadline, os.listdir(uploads)
        time.sleep(0.2)


def test_mount_jobs_folder_follows_the_jobs(mount: Callable[..., Mounted], small_corpus: Corpus) -> None:
    m = mount(ingest=(small_corpus.root,), config='[destinations.pacs2]\ntype = "stowrs"\n'
              'url = "http://127.0.0.1:9/dicom-web"\n[jobs]\nrun = false\n')
    assert os.listdir(m.path / "jobs") == []
    queued = run_cli("export", "--to", "pacs2", "PAT00001", store=m.store, config=m.config, check=True)
    job_id = queued.stdout.split()[1].rstrip(":")
    shown = m.path / "jobs" / f"{job_id}.json"
    deadline = time.monotonic() + 5
    while not shown.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(shown.read_text())["state"] == "pending"
    run_cli("jobs", "pause", job_id, store=m.store, config=m.config, check=True)
    deadline = time.monotonic() + 5
    while json.loads(shown.read_text())["state"] != "paused" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(shown.read_text())["state"] == "paused"
    with pytest.raises(OSError):
        shown.write_text("{}")


def test_uploads_left_by_a_killed_front_end_are_ingested_when_the_mount_starts(mount: Callable[..., Mounted]) -> None:
    m = mount()
    assert run_cli("umount", str(m.path), store=m.store).returncode == 0
    left = m.store / "uploads" / "left.dcm"  # answered for by a front end killed before it ingested the file
    write_instance(left, make_instance(patient_id="LEFT", patient_name="LEFT^OVER", study_uid="1.2.826.0.1.3680043.10.9",
                                       series_uid="1.2.826.0.1.3680043.10.9.1", sop_uid="1.2.826.0.1.3680043.10.9.1.1",
                                       instance_number=1, rows=8, columns=8, seed=1))
    os.utime(left, (time.time() - 60, time.time() - 60))
    again = run_cli("mount", str(m.path), "--auto-unmount", store=m.store, config=m.config)
    assert again.returncode == 0, again.stderr
    deadline = time.monotonic() + 20
    while left.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left.exists()
    assert os.listdir(m.path / "by-uids" / "1.2.826.0.1.3680043.10.9" / "1.2.826.0.1.3680043.10.9.1") == [
        "1.2.826.0.1.3680043.10.9.1.1.dcm", "series.json"]
