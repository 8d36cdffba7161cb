"""The FUSE operations called directly under pytest-trio, without a kernel mount (as s3ql tests its
file system): lookups, attributes, reads, extended attributes and refusals."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Callable

import pyfuse3
import pytest

from dicomfs.mount.inodes import ROOT_INODE, instance_inode
from dicomfs.mount.operations import DicomOperations, MountSettings
from dicomfs.samples import Corpus
from dicomfs.store.store import Store
from dicomfs.uploads import UploadArea
from dicomfs.views import Tree

CONTEXT = pyfuse3.RequestContext()


def _operations(store: Store, **settings: object) -> DicomOperations:
    return DicomOperations(store, Tree(store), UploadArea(store.folder / "uploads"), MountSettings(**settings))  # type: ignore[arg-type]


async def _walk(ops: DicomOperations, *names: str) -> int:
    inode = ROOT_INODE
    for name in names:
        inode = (await ops.lookup(inode, name.encode(), CONTEXT)).st_ino
    return inode


@pytest.fixture
def filled(open_store: Callable[..., Store], small_corpus: Corpus) -> Store:
    store = open_store()
    list(store.ingest([small_corpus.root]))
    return store


async def test_operations_lookup_getattr_and_read_give_the_stored_bytes(filled: Store, small_corpus: Corpus) -> None:
    ops = _operations(filled)
    study = ops.tree.listing(("by-uids",)).entries[0].name
    series = next(e.name for e in ops.tree.listing(("by-uids", study)).entries if e.is_folder)
    name = next(e.name for e in ops.tree.listing(("by-uids", study, series)).entries if e.name.endswith(".dcm"))
    inode = await _walk(ops, "by-uids", study, series, name)
    attributes = await ops.getattr(inode, CONTEXT)
    info = await ops.open(inode, os.O_RDONLY, CONTEXT)
    assert info.keep_cache
    data = bytes(await ops.read(info.fh, 0, attributes.st_size + 100))
    await ops.release(info.fh)
    assert len(data) == attributes.st_size
    sources = {hashlib.sha256(s.path.read_bytes()).hexdigest() for s in small_corpus.valid_files if s.sop_uid + ".dcm" == name}
    assert hashlib.sha256(data).hexdigest() in sources


async def test_operations_one_inode_per_instance_and_one_per_folder_path(filled: Store) -> None:
    ops = _operations(filled)
    patient = ops.tree.listing(("by-patients",)).entries[0].name
    by_patients = await _walk(ops, "by-patients")
    by_studies = await _walk(ops, "by-studies")
    assert by_patients != by_studies
    assert await _walk(ops, "by-patients") == by_patients  # the same path, the same inode
    entry = ops.tree.listing(("by-patients", patient)).entries[0]
    study_inode = await _walk(ops, "by-patients", patient, entry.name)
    assert study_inode not in (by_patients, by_studies)
    first = ops.tree.listing(("by-uids",)).entries[0].name
    series = next(e for e in ops.tree.listing(("by-uids", first)).entries if e.is_folder).name
    instance = next(e for e in ops.tree.listing(("by-uids", first, series)).entries if e.resource_id and e.name.endswith(".dcm"))
    inode = await _walk(ops, "by-uids", first, series, instance.name)
    assert inode == instance_inode(instance.resource_id)  # type: ignore[arg-type]


async def test_operations_missing_names_and_escapes_are_refused(filled: Store) -> None:
    ops = _operations(filled)
    with pytest.raises(pyfuse3.FUSEError) as error:
        await ops.lookup(ROOT_INODE, b"nothing", CONTEXT)
    assert error.value.errno == errno.ENOENT
    uploads = await _walk(ops, "uploads")
    with pytest.raises(pyfuse3.FUSEError) as error:
        await ops.lookup(uploads, b"..", CONTEXT)
    assert error.value.errno == errno.EACCES
    with pytest.raises(pyfuse3.FUSEError) as error:
        await ops.mkdir(await _walk(ops, "by-patients"), b"new", 0o755, CONTEXT)
    assert error.value.errno == errno.EACCES


async def test_operations_read_only_refuses_writes_with_erofs(filled: Store) -> None:
    ops = _operations(filled, read_only=True)
    uploads = await _walk(ops, "uploads")
    for attempt in (ops.mkdir(uploads, b"x", 0o755, CONTEXT), ops.create(uploads, b"x", 0o644, os.O_WRONLY, CONTEXT),
                    ops.unlink(await _walk(ops, "by-patients"), ops.tree.listing(("by-patients",)).entries[0].name.encode(), CONTEXT)):
        with pytest.raises(pyfuse3.FUSEError) as error:
            await attempt
        assert error.value.errno == errno.EROFS


async def test_operations_xattrs_of_a_patient_folder(filled: Store) -> None:
    ops = _operations(filled)
    patient = ops.tree.listing(("by-patients",)).entries[0]
    inode = await _walk(ops, "by-patients", patient.name)
    names = await ops.listxattr(inode, CONTEXT)
    assert b"user.dicom.PatientID" in names and b"user.dicomfs.protected" in names
    record = filled.get(patient.resource_id)  # type: ignore[arg-type]
    assert await ops.getxattr(inode, b"user.dicom.PatientID", CONTEXT) == record.patient_id.encode()  # type: ignore[union-attr]
    with pytest.raises(pyfuse3.FUSEError) as error:
        await ops.getxattr(inode, b"user.nothing", CONTEXT)
    assert error.value.errno == pyfuse3.ENOATTR


async def test_operations_upload_write_then_release_leaves_a_non_dicom_file_with_its_reason(open_store: Callable[..., Store],
                                                                                           tmp_path: Path) -> None:
    store = open_store()
    ops = _operations(store)
    uploads = await _walk(ops, "uploads")
    info, _ = await ops.create(uploads, b"notes.txt", 0o644, os.O_WRONLY, CONTEXT)
    assert await ops.write(info.fh, 0, b"hello, not DICOM") == 16
    await ops.release(info.fh)  # no nursery attached: ingest it here, as the background task would
    outcome = ops.uploads.ingest(store, ("notes.txt",), origin="fuse")  # type: ignore[union-attr]
    assert not outcome.removed and "not DICOM" in outcome.reason
    inode = await _walk(ops, "uploads", "notes.txt")
    assert (await ops.getxattr(inode, b"user.dicomfs.error", CONTEXT)).decode() == outcome.reason


@pytest.mark.parametrize("disk_busy", [False, True], ids=["quiet disk: on the loop", "busy disk: on threads"])
async def test_operations_uploads_work_the_same_on_the_loop_and_on_threads(
        open_store: Callable[..., Store], small_corpus: Corpus, disk_busy: bool) -> None:
    store = open_store()
    ops = _operations(store)
    if disk_busy:
        ops.disk.measured(100.0)
    on_threads: list[str] = []
    real_thread = ops._thread

    async def spied_thread(function: Callable[..., object], *args: object) -> object:
        on_threads.append(getattr(function, "__name__", repr(function)))
        return await real_thread(function, *args)

    ops._thread = spied_thread  # type: ignore[method-assign]
    source = small_corpus.valid_files[0].path.read_bytes()
    uploads = await _walk(ops, "uploads")
    with pytest.raises(pyfuse3.FUSEError) as missing:
        await ops.lookup(uploads, b"cd", CONTEXT)
    assert missing.value.errno == errno.ENOENT
    folder = (await ops.mkdir(uploads, b"cd", 0o755, CONTEXT)).st_ino
    info, attributes = await ops.create(folder, b"one.dcm", 0o644, os.O_WRONLY, CONTEXT)
    assert attributes.st_size == 0
    half = len(source) // 2
    assert await ops.write(info.fh, 0, source[:half]) == half
    assert await ops.write(info.fh, half, source[half:]) == len(source) - half
    assert (await ops.getattr(attributes.st_ino, CONTEXT)).st_size == len(source)
    await ops.release(info.fh)
    assert (store.folder / "uploads" / "cd" / "one.dcm").read_bytes() == source
    assert (await ops.lookup(folder, b"one.dcm", CONTEXT)).st_size == len(source)
    small_calls = {"lstat", "_create", "_make_folder", "_pwrite_all", "_close_upload"}
    if disk_busy:
        assert small_calls <= set(on_threads), on_threads
    else:
        assert not small_calls & set(on_threads), on_threads
