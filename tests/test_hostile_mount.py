"""Hostile names and failing handlers through a real mount: every operation gets names that are too
long, not UTF-8, or look like separators, in uploads/ and in the read-only views; each answer is
the errno a local file system would give, and the mount still answers afterwards."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import pyfuse3
import pytest

from dicomfs.errors import StoreFullError
from dicomfs.mount.guard import answer_errors
from dicomfs.samples import make_instance, write_instance
from tests.conftest import run_cli
from tests.test_mount import Mounted, mount  # noqa: F401  (the fixture that starts a real mount)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse and fusermount3")

TOO_LONG = {
    "256 bytes": b"a" * 256,  # one more than NAME_MAX: reaches the daemon
    "1024 bytes": b"b" * 1024,  # the longest name FUSE passes on (FUSE_NAME_MAX)
    "1025 bytes": b"c" * 1025,  # refused by the kernel itself
}
NOT_UTF8 = b"bad\xff\xfe.txt"
LOOKALIKES = {
    "backslash": "a\\b".encode(),
    "division slash": "a\u2215b".encode(),
    "fullwidth solidus": "a\uff0fb".encode(),
    "bidi override": "x\u202egpj.exe".encode(),
}
ODD = {"not UTF-8": NOT_UTF8, **LOOKALIKES}
"""Names a Linux file system takes: uploads/ takes them too; a view has none of them."""
LOG_CONFIG = '[log]\nfile = "{log}"\nlevel = "info"\n'


def _errno(call: Callable[[], object]) -> int:
    """The errno ``call`` fails with, 0 when it succeeds."""
    try:
        call()
    except OSError as error:
        return error.errno or -1
    return 0


def _create(path: bytes) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _operations(folder: bytes, name: bytes, existing_file: bytes) -> dict[str, Callable[[], object]]:
    """Every operation on ``folder/name`` (which does not exist), by what it does."""
    path = os.path.join(folder, name)
    return {
        "stat": lambda: os.stat(path),
        "lstat": lambda: os.lstat(path),
        "open": lambda: os.close(os.open(path, os.O_RDONLY)),
        "create": lambda: _create(path),
        "mkdir": lambda: os.mkdir(path),
        "rename from": lambda: os.rename(path, existing_file + b".moved"),
        "rename to": lambda: os.rename(existing_file, path),
        "unlink": lambda: os.unlink(path),
        "rmdir": lambda: os.rmdir(path),
        "setxattr": lambda: os.setxattr(path, "user.x", b"1"),
        "getxattr": lambda: os.getxattr(path, "user.x"),
        "listxattr": lambda: os.listxattr(path),
        "symlink": lambda: os.symlink(b"target", path),
        "link": lambda: os.link(existing_file, path),
        "truncate": lambda: os.truncate(path, 0),
        "utime": lambda: os.utime(path),
        "listdir": lambda: os.listdir(path),
    }


def _alive(m: Mounted) -> None:
    assert sorted(os.listdir(m.path)) == ["by-dates", "by-patients", "by-studies", "by-uids", "jobs", "uploads"]


def _assert_log_clean(log: Path) -> None:
    text = log.read_text(errors="replace") if log.exists() else ""
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


def _hostile_patient(folder: Path) -> Path:
    source = folder / "hostile.dcm"
    write_instance(source, make_instance(
        patient_id="..\u202e", patient_name="RTL2\u202eFDP - MÜLLER\u202egpj.exe", study_uid="1.2.826.0.1.3680043.10.99",
        series_uid="1.2.826.0.1.3680043.10.99.1", sop_uid="1.2.826.0.1.3680043.10.99.1.1", study_description=".hidden",
        rows=8, columns=8, SpecificCharacterSet="ISO_IR 192"))
    return source


@pytest.fixture
def hostile_mount(mount: Callable[..., Mounted], tmp_path: Path) -> tuple[Mounted, Path]:  # noqa: F811
    log = tmp_path / "mount.log"
    return mount(ingest=(_hostile_patient(tmp_path),), config=LOG_CONFIG.format(log=log)), log


def test_hostile_patient_folder_names_show_no_control_and_hide_nothing(hostile_mount: tuple[Mounted, Path]) -> None:
    """PatientID ``..<U+202E>`` and a PatientName with bidi overrides (reading as an .exe) once
    made a hidden ``.._ - RTL2…`` folder: every view shows the safe name, in every level."""
    m, log = hostile_mount
    assert os.listdir(m.path / "by-patients") == ["_._ - RTL2_FDP - MÜLLER_gpj.exe"]
    for view in ("by-patients", "by-studies", "by-dates", "by-uids"):
        for folder, folders, files in os.walk(m.path / view):
            for name in folders + files:
                assert not name.startswith(".") and name.isprintable(), f"{folder}/{ascii(name)}"
    _alive(m)
    _assert_log_clean(log)


def test_hostile_too_long_names_get_enametoolong_everywhere(hostile_mount: tuple[Mounted, Path]) -> None:
    """A 256-byte name once ended the daemon (an uncaught ENAMETOOLONG from lstat in uploads/):
    every operation, in uploads/ and in the views, answers ENAMETOOLONG now, as ext4 does."""
    m, log = hostile_mount
    existing = bytes(m.path / "uploads" / "existing.txt")
    patient = os.listdir(m.path / "by-patients")[0]
    folders = [m.path / "uploads", m.path / "by-patients", m.path / "by-patients" / patient, m.path / "by-uids", m.path]
    for folder in folders:
        for label, name in TOO_LONG.items():
            Path(os.fsdecode(existing)).write_bytes(b"not DICOM")
            for operation, call in _operations(bytes(folder), name, existing).items():
                assert _errno(call) == errno.ENAMETOOLONG, f"{operation} of a {label} name in {folder}"
                _alive(m)
    long_path = bytes(m.path / "uploads") + b"/d" * 2100  # 4,200 bytes: past PATH_MAX
    for operation, call in _operations(long_path, b"x", existing).items():
        assert _errno(call) == errno.ENAMETOOLONG, f"{operation} of a 4,200-byte path"
    _alive(m)
    _assert_log_clean(log)


def test_hostile_odd_names_live_a_full_life_in_uploads(hostile_mount: tuple[Mounted, Path]) -> None:
    """A file or folder named with bytes that are not UTF-8, or with characters that look like a
    slash, is created, listed, stat'ed, renamed, truncated, touched and removed like any other,
    and lands under exactly that name in the store's uploads/ folder."""
    m, log = hostile_mount
    uploads = bytes(m.path / "uploads")
    for label, name in ODD.items():
        path = os.path.join(uploads, name)
        _create(path)
        with open(path, "wb") as out:
            out.write(b"not DICOM at all")
        assert name in os.listdir(uploads), label
        assert os.stat(path).st_size == 16
        assert os.listdir(bytes(m.store / "uploads")).count(name) == 1, label
        os.truncate(path, 3)
        os.utime(path, (1_000_000_000, 1_000_000_000))
        assert os.stat(path).st_mtime == 1_000_000_000
        assert _errno(lambda: os.getxattr(path, "user.x")) == errno.ENODATA  # noqa: B023
        assert _errno(lambda: os.setxattr(path, "user.x", b"1")) == errno.EOPNOTSUPP  # noqa: B023  (uploads keep no metadata)
        assert _errno(lambda: os.symlink(b"/etc/passwd", path + b".link")) == errno.EPERM  # noqa: B023
        assert _errno(lambda: os.link(path, path + b".link")) == errno.EPERM  # noqa: B023
        os.rename(path, path + b".2")
        assert name + b".2" in os.listdir(uploads) and name not in os.listdir(uploads)
        os.unlink(path + b".2")
        os.mkdir(path)
        _create(os.path.join(path, name))
        assert os.listdir(path) == [name]
        os.unlink(os.path.join(path, name))
        os.rmdir(path)
        assert name not in os.listdir(uploads)
        _alive(m)
    longest = os.path.join(uploads, b"n" * 255)  # NAME_MAX itself is a name like any other
    _create(longest)
    assert b"n" * 255 in os.listdir(uploads) and os.stat(longest).st_size == 0
    os.unlink(longest)
    assert os.listdir(bytes(m.store / "uploads")) == []
    _assert_log_clean(log)


def test_hostile_odd_names_are_refused_in_the_views(hostile_mount: tuple[Mounted, Path]) -> None:
    """No view has such a name: looking one up is ENOENT, making one EACCES (the views are
    named by the store), renaming into one EPERM; and the mount answers after each."""
    m, log = hostile_mount
    existing = bytes(m.path / "uploads" / "existing.txt")
    patient = os.listdir(m.path / "by-patients")[0]
    expected = {"create": errno.EACCES, "mkdir": errno.EACCES, "rename to": errno.EPERM, "symlink": errno.EPERM,
                "link": errno.EPERM}
    for folder in (m.path / "by-patients", m.path / "by-patients" / patient, m.path / "by-uids", m.path):
        for label, name in ODD.items():
            Path(os.fsdecode(existing)).write_bytes(b"not DICOM")
            for operation, call in _operations(bytes(folder), name, existing).items():
                assert _errno(call) == expected.get(operation, errno.ENOENT), f"{operation} of {label} in {folder}"
                _alive(m)
    _assert_log_clean(log)


def test_hostile_dot_names_are_the_kernels_and_harmless(hostile_mount: tuple[Mounted, Path]) -> None:
    """``.`` and ``..`` never reach the daemon (the kernel resolves them); what the kernel answers
    leaves the mount alive and creates nothing."""
    m, log = hostile_mount
    existing = bytes(m.path / "uploads" / "existing.txt")
    for folder in (m.path / "uploads", m.path / "by-patients"):
        for name in (b".", b".."):
            Path(os.fsdecode(existing)).write_bytes(b"not DICOM")
            for operation, call in _operations(bytes(folder), name, existing).items():
                if operation not in ("stat", "lstat", "open", "listdir", "getxattr", "listxattr", "utime"):
                    assert _errno(call) != 0, f"{operation} of {name!r} in {folder}"
                else:
                    _errno(call)
                _alive(m)
    assert sorted(os.listdir(m.store / "uploads")) == ["existing.txt"]
    _assert_log_clean(log)


def test_hostile_read_only_mount_answers_erofs_or_enametoolong(mount: Callable[..., Mounted], tmp_path: Path) -> None:  # noqa: F811
    log = tmp_path / "ro.log"
    m = mount("--read-only", ingest=(_hostile_patient(tmp_path),), config=LOG_CONFIG.format(log=log))
    patient = bytes(m.path / "by-patients" / os.listdir(m.path / "by-patients")[0])
    one = next(p for p in (m.path / "by-uids").rglob("*.dcm"))
    writes = {"create": errno.EROFS, "mkdir": errno.EROFS, "rename to": errno.EROFS, "symlink": errno.EROFS,
              "link": errno.EROFS, "setxattr": errno.ENOENT, "truncate": errno.ENOENT, "utime": errno.ENOENT}
    for name in (TOO_LONG["256 bytes"], NOT_UTF8, LOOKALIKES["division slash"]):
        for operation, call in _operations(patient, name, bytes(one)).items():
            wanted = errno.ENAMETOOLONG if len(name) > 255 else writes.get(operation, errno.ENOENT)
            if operation in ("rename from", "rename to", "unlink", "rmdir"):  # the kernel refuses before any lookup
                wanted = errno.EROFS
            assert _errno(call) == wanted, f"{operation} of {name[:20]!r} on a read-only mount"
        assert sorted(os.listdir(m.path)) == ["by-dates", "by-patients", "by-studies", "by-uids", "jobs"]
    _assert_log_clean(log)


def test_hostile_unexpected_error_is_logged_and_answered_eio(mount: Callable[..., Mounted], tmp_path: Path) -> None:  # noqa: F811
    """A handler failing in a way nobody planned for (here: a blob cut short on disk behind the
    store's back, so mapping it raises ValueError) answers EIO and logs its traceback; the daemon
    serves on, the other instances read as before."""
    log = tmp_path / "mount.log"
    sources = []
    for n in (1, 2):
        sources.append(tmp_path / f"i{n}.dcm")
        write_instance(sources[-1], make_instance(
            patient_id="CUT", patient_name="CUT^SHORT", study_uid="1.2.826.0.1.3680043.10.98",
            series_uid="1.2.826.0.1.3680043.10.98.1", sop_uid=f"1.2.826.0.1.3680043.10.98.1.{n}", instance_number=n,
            rows=8, columns=8, seed=n))
    m = mount(ingest=tuple(sources), config='[storage]\ncompression = "none"\n' + LOG_CONFIG.format(log=log))
    series = m.path / "by-uids" / "1.2.826.0.1.3680043.10.98" / "1.2.826.0.1.3680043.10.98.1"
    first, second = series / "1.2.826.0.1.3680043.10.98.1.1.dcm", series / "1.2.826.0.1.3680043.10.98.1.2.dcm"
    expected = second.read_bytes()
    blob = next(p for p in (m.store / "blobs").rglob("*") if p.is_file() and p.read_bytes() == first.read_bytes())
    os.truncate(blob, 0)
    assert _errno(lambda: first.read_bytes()) == errno.EIO
    _alive(m)
    assert second.read_bytes() == expected
    text = log.read_text()
    assert "Traceback" in text and "ValueError" in text and "open" in text
    assert run_cli("stats", store=m.store, config=m.config).returncode == 0


async def test_hostile_guard_maps_every_exception_to_an_errno(caplog: pytest.LogCaptureFixture) -> None:
    """The guard itself, on handlers that raise each kind of exception: OSError keeps its errno,
    DicomfsError gives its own, anything else EIO with its traceback logged; forget, which has
    no answer, swallows (and logs) what it raises."""

    @answer_errors
    class Failing(pyfuse3.Operations):  # type: ignore[misc]
        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            raise OSError(errno.ENAMETOOLONG, "too long")

        async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
            raise StoreFullError("full")

        async def read(self, fh: int, off: int, size: int) -> bytes:
            raise ValueError("mmap length is greater than file size")

        async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
            raise pyfuse3.FUSEError(errno.EACCES)

        async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
            raise KeyError(inode_list[0][0])

    ops, context = Failing(), pyfuse3.RequestContext()
    for call, expected in ((ops.getattr(1, context), errno.ENAMETOOLONG), (ops.open(1, 0, context), errno.ENOSPC),
                           (ops.read(1, 0, 10), errno.EIO), (ops.statfs(context), errno.EACCES)):
        with pytest.raises(pyfuse3.FUSEError) as error:
            await call
        assert error.value.errno == expected
    assert await ops.forget([(7, 1)]) is None
    failures = [r for r in caplog.records if r.exc_info]
    assert [r.exc_info[0] for r in failures if r.exc_info] == [ValueError, KeyError]
    assert "read" in failures[0].getMessage() and "forget" in failures[1].getMessage()
    assert any("full" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_hostile_dicom_under_a_non_utf8_name_is_ingested(hostile_mount: tuple[Mounted, Path], tmp_path: Path) -> None:
    """An instance copied in under a name that is not UTF-8 is stored and leaves uploads/ like any other."""
    m, log = hostile_mount
    source = tmp_path / "plain.dcm"
    write_instance(source, make_instance(patient_id="BYTES", patient_name="BYTES^NAME", study_uid="1.2.826.0.1.3680043.10.97",
                                         series_uid="1.2.826.0.1.3680043.10.97.1", sop_uid="1.2.826.0.1.3680043.10.97.1.1",
                                         rows=8, columns=8))
    target = os.path.join(bytes(m.path / "uploads"), NOT_UTF8)
    with open(target, "wb") as out:
        out.write(source.read_bytes())
    deadline = time.monotonic() + 20
    while os.listdir(bytes(m.store / "uploads")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(bytes(m.store / "uploads")) == []
    assert "BYTES - BYTES^NAME" in os.listdir(m.path / "by-patients")
    _alive(m)
    _assert_log_clean(log)


def test_hostile_xattr_names_and_values_are_refused_cleanly(hostile_mount: tuple[Mounted, Path]) -> None:
    """Extended attribute names that are not UTF-8, too long, or not ours, and values too big or
    not UTF-8: each gets its errno (set, get, remove), and the mount serves on."""
    m, log = hostile_mount
    patient = m.path / "by-patients" / os.listdir(m.path / "by-patients")[0]
    upload = m.path / "uploads" / "notes.txt"
    upload.write_bytes(b"not DICOM")
    too_long = b"user.dicomfs.meta." + b"a" * 300  # past XATTR_NAME_MAX: the kernel's ERANGE
    E = errno
    expected = {  # name: {target: (set b"1", set 70,000 bytes, get, remove)}
        b"user.dicomfs.meta.\xff\xfe": {patient: (E.EINVAL, E.E2BIG, E.ENODATA, E.ENODATA),
                                        upload: (E.ENOTSUP, E.E2BIG, E.ENODATA, E.ENOTSUP)},
        b"user.\xff": {patient: (E.ENOTSUP, E.E2BIG, E.ENODATA, E.ENOTSUP), upload: (E.ENOTSUP, E.E2BIG, E.ENODATA, E.ENOTSUP)},
        too_long: {patient: (E.ERANGE,) * 4, upload: (E.ERANGE,) * 4},
        b"user.dicomfs.protected": {patient: (0, E.E2BIG, 0, E.ENOTSUP), upload: (E.ENOTSUP, E.E2BIG, E.ENODATA, E.ENOTSUP)},
    }
    for name, targets in expected.items():
        for target, wanted in targets.items():
            got = (_errno(lambda: os.setxattr(target, name, b"1")), _errno(lambda: os.setxattr(target, name, b"x" * 70_000)),  # noqa: B023
                   _errno(lambda: os.getxattr(target, name)), _errno(lambda: os.removexattr(target, name)))  # noqa: B023
            assert got == wanted, (name[:30], target.name)
            _alive(m)
    assert _errno(lambda: os.setxattr(patient, b"user.dicomfs.protected", b"\xff\xfe")) == errno.EINVAL
    assert os.getxattr(patient, b"user.dicomfs.protected") == b"1"
    _assert_log_clean(log)
