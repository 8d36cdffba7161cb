"""Ingest into a real store on disk: counts, verdicts, duplicates, read-back, zips and DICOMDIRs."""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable

import pydicom
import pytest

from dicomfs.samples import Corpus, make_instance, write_instance
from dicomfs.store.blockformat import block_bounds
from dicomfs.store.check import check_store
from dicomfs.store.records import Instance
from dicomfs.store.sources import Source
from dicomfs.store.store import Store


def _statuses(results: list) -> Counter[str]:  # type: ignore[type-arg]
    return Counter(r.status for r in results)


def test_store_ingest_counts_match_the_corpus(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    results = list(store.ingest([small_corpus.root]))
    stats = store.stats()
    assert (stats.patients, stats.studies, stats.series) == (small_corpus.patients, small_corpus.studies, small_corpus.series)
    assert stats.instances == len({f.sop_uid for f in small_corpus.files if f.valid})
    rejected = {Path(r.path).name: r.reason for r in results if r.status == "rejected"}
    assert set(rejected) == {f.path.name for f in small_corpus.files if not f.valid}
    assert all(reason for reason in rejected.values())
    assert check_store(store).clean


def test_store_ingest_reasons_name_the_problem(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    reasons = {Path(r.path).name: r.reason for r in store.ingest([small_corpus.root / "bad"])}
    assert "empty" in reasons["empty.dcm"]
    assert "not DICOM" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated-header.dcm"]
    assert "truncated" in reasons["truncated-pixel-data.dcm"]
    assert "no SOPInstanceUID" in reasons["no-sop-instance-uid.dcm"]
    assert "not DICOM" in reasons["garbage-after-preamble.dcm"]
    assert store.stats().instances == 0


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
def test_store_ingest_reads_back_byte_identical(open_store: Callable[..., Store], small_corpus: Corpus,
                                                large_corpus: Corpus, codec: str) -> None:
    store = open_store(codec=codec, block_size=16384)
    results = [r for r in store.ingest([small_corpus.root, large_corpus.root]) if r.status == "stored"]
    assert results
    for result in results:
        original = Path(result.path).read_bytes()
        with store.open_instance(result.ids[3]) as reader:
            assert b"".join(reader.iter_chunks(50_000)) == original
            for offset in (0, 1, 16383, 16384, len(original) // 2, len(original) - 3):
                assert reader.read(offset, 131072) == original[offset : offset + 131072]
    assert check_store(store).clean


def test_store_compressed_reads_touch_only_the_blocks_they_need(open_store: Callable[..., Store], large_corpus: Corpus) -> None:
    store = open_store(codec="zstd", block_size=131072)
    result = next(r for r in store.ingest([large_corpus.root / "large"]) if r.status == "stored")
    record = store.get(result.ids[3])
    table = store.blobs.table(record.blob, store.open_instance(record.id).fd)  # type: ignore[union-attr]
    assert len(table.raw_starts) > 2
    assert record.header_length in table.raw_starts  # the header is its own block
    assert len(table.blocks_for(record.header_length + 5 * 131072 // 2, 131072)) <= 2
    assert len(table.blocks_for(0, record.header_length)) == 1


def test_store_block_bounds_split_at_the_header() -> None:
    assert block_bounds(1000, 300, 256) == [0, 256, 300, 556, 812]
    assert block_bounds(100, 0, 256) == [0]
    assert block_bounds(0, 0, 256) == [0]


def test_store_ingest_same_file_twice_is_already_stored(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    first = _statuses(list(store.ingest([small_corpus.root])))
    second = _statuses(list(store.ingest([small_corpus.root])))
    assert second["stored"] == 0
    assert second["already_stored"] == first["stored"] + first["already_stored"]


def _conflicting_pair(folder: Path) -> tuple[Path, Path]:
    ids = dict(patient_id="P9", patient_name="X^Y", study_uid="1.9", series_uid="1.9.1", sop_uid="1.9.1.1")
    first, second = folder / "a.dcm", folder / "b.dcm"
    folder.mkdir()
    write_instance(first, make_instance(**ids, seed=1))
    write_instance(second, make_instance(**ids, seed=2))
    assert first.read_bytes() != second.read_bytes()
    return first, second


def test_store_conflicting_bytes_are_kept_by_default(open_store: Callable[..., Store], tmp_path: Path) -> None:
    first, second = _conflicting_pair(tmp_path / "pair")
    store = open_store()
    assert next(store.ingest([first])).status == "stored"
    result = next(store.ingest([second]))
    assert result.status == "already_stored" and "other bytes" in result.reason
    with store.open_instance(result.ids[3]) as reader:
        assert b"".join(reader.iter_chunks()) == first.read_bytes()


def test_store_conflicting_bytes_replace_when_overwrite_is_on(open_store: Callable[..., Store], tmp_path: Path) -> None:
    first, second = _conflicting_pair(tmp_path / "pair")
    store = open_store(overwrite=True)
    store_first = next(store.ingest([first]))
    result = next(store.ingest([second]))
    assert result.status == "replaced"
    assert store.stats().instances == 1
    assert store.stats().size == second.stat().st_size
    with store.open_instance(result.ids[3]) as reader:
        assert b"".join(reader.iter_chunks()) == second.read_bytes()
    assert store_first.ids == result.ids
    listed = store.children(result.ids[2])  # from the copy kept with the link: the new record
    assert listed == [store.get(result.ids[3])] and listed[0].size == second.stat().st_size
    assert check_store(store).clean


def test_store_ingest_reads_zip_members(open_store: Callable[..., Store], small_corpus: Corpus, tmp_path: Path) -> None:
    archive = tmp_path / "batch.zip"
    valid = [f for f in small_corpus.files if f.valid][:5]
    with zipfile.ZipFile(archive, "w") as out:
        for sample in valid:
            out.write(sample.path, f"CD/{sample.path.name}-{sample.sop_uid[-6:]}")
        out.writestr("__MACOSX/._junk", b"junk")
        out.writestr("CD/.DS_Store", b"junk")
    store = open_store()
    results = list(store.ingest([archive]))
    assert len(results) == 5
    assert all(r.path.startswith(f"{archive}:CD/") for r in results)
    assert store.stats().instances == len({f.sop_uid for f in valid})


def test_store_ingest_ignores_os_junk_quietly(open_store: Callable[..., Store], tmp_path: Path, small_corpus: Corpus) -> None:
    folder = tmp_path / "usb"
    folder.mkdir()
    for name in (".DS_Store", "._IM0001.dcm", "Thumbs.db", "desktop.ini"):
        (folder / name).write_bytes(b"clutter")
    sample = next(f for f in small_corpus.files if f.valid)
    (folder / "IM0001.dcm").write_bytes(sample.path.read_bytes())
    results = list(open_store().ingest([folder]))
    assert [(Path(r.path).name, r.status) for r in results] == [("IM0001.dcm", "stored")]


def test_store_ingest_reads_a_dicomdir_as_an_index(open_store: Callable[..., Store], tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    cd = tmp_path / "cd"
    fileset = FileSet()
    for n in range(3):
        fileset.add(make_instance(patient_id="CD1", patient_name="CD^ONE", study_uid="1.5", series_uid="1.5.1",
                                  sop_uid=f"1.5.1.{n + 1}", instance_number=n + 1, StudyTime="101500",
                                  StudyID="1"))
    fileset.write(cd)
    fileset._stage["t"].cleanup()  # pydicom leaves its staging folder to a finalizer (a ResourceWarning)
    store = open_store()
    results = list(store.ingest([cd / "DICOMDIR"]))
    statuses = Counter(r.status for r in results)
    assert statuses == {"skipped": 1, "stored": 3}
    skipped = next(r for r in results if r.status == "skipped")
    assert "DICOMDIR" in skipped.reason
    assert Counter(r.status for r in store.ingest([cd])) == {"skipped": 1, "already_stored": 3}


def test_store_ids_follow_the_dicom_identifiers(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    result = next(r for r in store.ingest([small_corpus.root]) if r.status == "stored")
    sample = next(f for f in small_corpus.files if str(f.path) == result.path)
    expected = hashlib.sha1(sample.patient_id.encode()).hexdigest()
    assert result.ids[0].replace("-", "") == expected
    assert store.resolve_one(sample.sop_uid).id == result.ids[3]
    assert store.resolve_one(sample.series_uid).id == result.ids[2]
    assert store.resolve(sample.patient_id)[0].id == result.ids[0]


def test_store_two_stores_give_the_same_ids(tmp_path: Path, small_corpus: Corpus) -> None:
    ids = []
    for name in ("one", "two"):
        with Store.create(tmp_path / name) as store:
            ids.append(sorted(r.ids for r in store.ingest([small_corpus.root]) if r.ids))
    assert ids[0] == ids[1]


def test_store_readonly_refuses_ingest(tmp_path: Path, small_corpus: Corpus) -> None:
    from dicomfs.errors import ReadOnlyError

    Store.create(tmp_path / "s").close()
    with Store(tmp_path / "s", readonly=True) as store:
        with pytest.raises(ReadOnlyError):
            list(store.ingest([small_corpus.root]))


def test_store_change_number_grows_with_each_commit(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    before = store.change_number()
    list(store.ingest([small_corpus.root]))
    assert store.change_number() > before


def test_store_instance_records_keep_the_main_tags(open_store: Callable[..., Store], tmp_path: Path) -> None:
    path = tmp_path / "one.dcm"
    write_instance(path, make_instance(patient_id="P5", patient_name="ROE^RICHARD", study_uid="1.7", series_uid="1.7.1",
                                       sop_uid="1.7.1.9", modality="MR", study_date="20230405",
                                       study_description="MR KNEE", series_description="T1 SAG", series_number=3,
                                       instance_number=9))
    store = open_store()
    result = next(store.ingest([path], origin="webdav", remote="alice"))
    patient, study, series, instance = (store.get(i) for i in result.ids)
    assert (patient.patient_id, patient.patient_name) == ("P5", "ROE^RICHARD")  # type: ignore[union-attr]
    assert (study.date, study.description) == ("20230405", "MR KNEE")  # type: ignore[union-attr]
    assert (series.modality, series.description, series.number) == ("MR", "T1 SAG", 3)  # type: ignore[union-attr]
    assert (instance.number, instance.size) == (9, path.stat().st_size)  # type: ignore[union-attr]
    meta = store.metadata(instance.id)
    assert meta["Origin"] == "webdav" and meta["RemoteUser"] == "alice"
    assert meta["SopClassUid"] == pydicom.dcmread(path).SOPClassUID
    assert meta["IndexInSeries"] == "9"
    assert "LastUpdate" in store.metadata(series.id)


@pytest.mark.parametrize("extra_files", [0, 80])  # 80 more files: the worker-process path
def test_store_ingest_finds_a_zip_by_its_content(open_store: Callable[..., Store], small_corpus: Corpus,
                                                  tmp_path: Path, extra_files: int) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    valid = [f for f in small_corpus.files if f.valid][:4]
    with zipfile.ZipFile(folder / "export.bin", "w") as out:
        for n, sample in enumerate(valid):
            out.write(sample.path, f"{n}.dcm")
    for n in range(extra_files):
        (folder / f"note{n}.txt").write_text("not DICOM")
    store = open_store()
    results = list(store.ingest([folder]))
    archive_results = [r for r in results if r.path.startswith(f"{folder / 'export.bin'}:")]
    assert len(archive_results) == 4
    assert {r.status for r in archive_results} <= {"stored", "already_stored"}
    assert store.stats().instances == len({f.sop_uid for f in valid})
    assert len(results) == 4 + extra_files


def test_store_ingest_file_gives_one_result_per_file_it_holds(open_store: Callable[..., Store], small_corpus: Corpus,
                                                             tmp_path: Path) -> None:
    store = open_store()
    valid = [f for f in small_corpus.files if f.valid][:3]
    [single] = store.ingest_file(valid[0].path, label="uploads/IM1.dcm", origin="fuse", remote="alice")
    assert (single.status, single.path) == ("stored", "uploads/IM1.dcm")
    assert store.metadata(single.ids[3])["RemoteUser"] == "alice"  # type: ignore[index]
    archive = tmp_path / "upload.bin"
    with zipfile.ZipFile(archive, "w") as out:
        for n, sample in enumerate(valid):
            out.write(sample.path, f"{n}.dcm")
    statuses = sorted(r.status for r in store.ingest_file(archive, origin="fuse"))
    assert statuses == ["already_stored", "stored", "stored"]
    [rejected] = store.ingest_file(small_corpus.root / "bad" / "notes.txt")
    assert rejected.status == "rejected" and "not DICOM" in rejected.reason


def test_store_change_log_names_what_each_commit_changed(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store = open_store()
    sample = next(f for f in small_corpus.files if f.valid)
    before = store.change_number()
    [result] = store.ingest_file(sample.path)
    assert result.ids is not None
    with store.index.read() as txn:
        logged = [entry for _, entries in store.index.changes_since(txn, before) for entry in entries]
    assert {(op, rid) for op, _, rid in logged} >= {("+", rid) for rid in result.ids}
    after_ingest = store.change_number()
    store.delete(result.ids[0])
    with store.index.read() as txn:
        logged = [entry for _, entries in store.index.changes_since(txn, after_ingest) for entry in entries]
    assert {(op, rid) for op, _, rid in logged} == {("-", rid) for rid in result.ids}


def test_store_ingest_does_not_follow_a_symlink_loop(open_store: Callable[..., Store], small_corpus: Corpus,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "cd"
    folder.mkdir()
    sample = next(f for f in small_corpus.files if f.valid)
    (folder / "IM1.dcm").write_bytes(sample.path.read_bytes())
    (folder / "again").symlink_to(folder)  # copied media do this; a loop must not hang ingest
    results = list(open_store().ingest([folder]))
    assert [(Path(r.path).name, r.status) for r in results] == [("IM1.dcm", "stored")]


def test_store_dicomdir_cannot_reach_outside_its_folder(open_store: Callable[..., Store], tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    cd = tmp_path / "cd"
    fileset = FileSet()
    fileset.add(make_instance(patient_id="CD2", patient_name="CD^TWO", study_uid="1.6", series_uid="1.6.1",
                              sop_uid="1.6.1.1", StudyTime="101500", StudyID="1"))
    fileset.write(cd)
    fileset._stage["t"].cleanup()  # pydicom leaves its staging folder to a finalizer (a ResourceWarning)
    outside = tmp_path / "secret.dcm"
    write_instance(outside, make_instance(patient_id="SECRET", patient_name="NOT^ON^CD", study_uid="1.7",
                                          series_uid="1.7.1", sop_uid="1.7.1.1"))
    dicomdir = pydicom.dcmread(cd / "DICOMDIR")
    record = next(r for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r)
    with pytest.warns(UserWarning, match="Invalid value"):  # a hostile DICOMDIR, invalid on purpose
        record.ReferencedFileID = ["..", "secret.dcm"]
    dicomdir.save_as(cd / "DICOMDIR")
    store = open_store()
    list(store.ingest([cd / "DICOMDIR"]))
    assert "SECRET" not in {p.patient_id for p in store.children()}  # type: ignore[union-attr]


def test_store_same_instance_in_consecutive_batches_is_stored_once(open_store: Callable[..., Store], tmp_path: Path) -> None:
    # One file per batch: the writer plans and writes batch N+1 while batch N is still being synced,
    # so the second copy is written before the first is indexed. It must end as "already stored",
    # with its extra blob freed.
    folder = tmp_path / "copies"
    folder.mkdir()
    instance = make_instance(patient_id="P1", patient_name="A^B", study_uid="1.2", series_uid="1.2.1", sop_uid="1.2.1.1")
    for name in ("a.dcm", "b.dcm", "c.dcm"):
        write_instance(folder / name, instance)
    store = open_store(batch_files=1, batch_delay=0.0)
    results = list(store.ingest([folder]))
    assert [r.status for r in results] == ["stored", "already_stored", "already_stored"]
    assert store.stats().instances == 1
    store.close()
    reopened = open_store()
    report = check_store(reopened)
    assert report.clean, report.problems
    assert report.blobs == 1


def test_store_ingests_content_held_in_memory(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    """A transfer hands its instances over as bytes: stored as if read from a file; a zip is not unpacked."""
    store = open_store()
    sample = small_corpus.valid_files[0]
    data = sample.path.read_bytes()
    archive = Path(store.folder.parent / "one.zip")
    with zipfile.ZipFile(archive, "w") as z:
        z.write(sample.path, "a.dcm")
    results = list(store.ingest_sources([Source("memory:a", "", content=data),
                                         Source("memory:zip", "", content=archive.read_bytes())], in_process=True))
    assert [(r.path, r.status) for r in results] == [("memory:a", "stored"), ("memory:zip", "rejected")]
    assert results[0].ids is not None
    stored = store.get(results[0].ids[3])
    assert isinstance(stored, Instance) and stored.sha256 == hashlib.sha256(data).hexdigest()
    with store.open_instance(stored.id) as reader:
        assert b"".join(reader.iter_chunks()) == data
