"""Deletion, recycling with protection, metadata and attachments: counts stay exact throughout."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import pytest

from dicomfs.errors import NotFoundError, PermissionDeniedError, ReadOnlyError
from dicomfs.samples import make_instance, write_instance
from dicomfs.store.check import check_store
from dicomfs.store.ids import Level
from dicomfs.store.mutations import Limits
from dicomfs.store.store import Store


def _write_patient(folder: Path, patient: str, *, studies: int = 1, series: int = 1, instances: int = 2,
                   rows: int = 64) -> list[Path]:
    paths = []
    for st in range(studies):
        for se in range(series):
            for n in range(instances):
                uid = f"1.{zlib.crc32(patient.encode())}.{st}.{se}"
                path = folder / patient / f"{st}-{se}-{n}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_instance(path, make_instance(patient_id=patient, patient_name=f"{patient}^TEST",
                                                   study_uid=f"{uid.rsplit('.', 1)[0]}", series_uid=uid,
                                                   sop_uid=f"{uid}.{n + 1}", instance_number=n + 1, rows=rows,
                                                   columns=rows))
                paths.append(path)
    return paths


def _ingest(store: Store, *paths: Path) -> list[str]:
    return [r.status for r in store.ingest(list(paths))]


def test_store_delete_instance_keeps_counts_exact(open_store: Callable[..., Store], tmp_path: Path) -> None:
    _write_patient(tmp_path / "in", "P1", instances=3)
    store = open_store()
    results = list(store.ingest([tmp_path / "in"]))
    assert store.delete(results[0].ids[3]) == 1
    stats = store.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 1, 2)
    series = store.get(results[0].ids[2])
    assert series.instances == 2  # type: ignore[union-attr]
    assert check_store(store).clean


def test_store_delete_last_instance_removes_empty_parents(open_store: Callable[..., Store], tmp_path: Path) -> None:
    _write_patient(tmp_path / "in", "P1", instances=1)
    _write_patient(tmp_path / "in", "P2", instances=1)
    store = open_store()
    results = list(store.ingest([tmp_path / "in"]))
    store.delete(results[0].ids[3])
    for resource_id in results[0].ids:
        assert store.find(resource_id) is None
    stats = store.stats()
    assert (stats.patients, stats.studies, stats.series, stats.instances) == (1, 1, 1, 1)
    assert check_store(store).clean


@pytest.mark.parametrize("level", [Level.PATIENT, Level.STUDY, Level.SERIES])
def test_store_delete_at_every_level(open_store: Callable[..., Store], tmp_path: Path, level: Level) -> None:
    _write_patient(tmp_path / "in", "P1", studies=2, series=2, instances=2)
    store = open_store()
    results = list(store.ingest([tmp_path / "in"]))
    removed = store.delete(results[0].ids[level])
    assert removed == {Level.PATIENT: 8, Level.STUDY: 4, Level.SERIES: 2}[level]
    assert store.stats().instances == 8 - removed
    assert check_store(store).clean
    blobs_left = len(list(store.blobs.names()))
    assert blobs_left == 8 - removed


def test_store_delete_unknown_id_is_not_found(open_store: Callable[..., Store]) -> None:
    with pytest.raises(NotFoundError):
        open_store().delete("00000000-00000000-00000000-00000000-00000001")


def test_store_recycles_the_patient_stored_longest_ago(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B", "C", "D"):
        _write_patient(tmp_path / "in", patient, instances=1)
    store = open_store(limits=Limits(max_patients=3))
    for patient in ("A", "B", "C"):
        _ingest(store, tmp_path / "in" / patient)
    assert _ingest(store, tmp_path / "in" / "A") == ["already_stored"]  # a resend changes no order
    _ingest(store, tmp_path / "in" / "D")
    names = sorted(p.patient_id for p in store.children())  # type: ignore[union-attr]
    assert names == ["B", "C", "D"]
    assert check_store(store).clean


def test_store_new_instance_makes_its_patient_most_recent(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B", "C"):
        _write_patient(tmp_path / "in", patient, instances=2)
    store = open_store(limits=Limits(max_patients=2))
    _ingest(store, tmp_path / "in" / "A" / "0-0-0.dcm")
    _ingest(store, tmp_path / "in" / "B" / "0-0-0.dcm")
    _ingest(store, tmp_path / "in" / "A" / "0-0-1.dcm")  # A is now the most recent
    _ingest(store, tmp_path / "in" / "C")
    assert sorted(p.patient_id for p in store.children()) == ["A", "C"]  # type: ignore[union-attr]


def test_store_protected_patients_are_never_recycled(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B", "C"):
        _write_patient(tmp_path / "in", patient, instances=1)
    store = open_store(limits=Limits(max_patients=2))
    a = list(store.ingest([tmp_path / "in" / "A"]))[0]
    store.set_protected(a.ids[0], True)
    _ingest(store, tmp_path / "in" / "B")
    _ingest(store, tmp_path / "in" / "C")
    assert sorted(p.patient_id for p in store.children()) == ["A", "C"]  # type: ignore[union-attr]
    assert check_store(store).clean


def test_store_full_of_protected_data_refuses_and_loses_nothing(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B"):
        _write_patient(tmp_path / "in", patient, instances=2)
    size = (tmp_path / "in" / "A" / "0-0-0.dcm").stat().st_size
    store = open_store(limits=Limits(max_size=size * 3))
    results = list(store.ingest([tmp_path / "in" / "A"]))
    store.set_protected(results[0].ids[0], True)
    outcome = list(store.ingest([tmp_path / "in" / "B"]))
    assert [r.status for r in outcome] == ["stored", "rejected"]
    assert "storage full" in outcome[1].reason
    assert store.stats().instances == 3
    assert check_store(store).clean


def test_store_max_size_recycles_by_bytes(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B", "C"):
        _write_patient(tmp_path / "in", patient, instances=2)
    size = (tmp_path / "in" / "A" / "0-0-0.dcm").stat().st_size
    store = open_store(limits=Limits(max_size=size * 4))
    for patient in ("A", "B", "C"):
        _ingest(store, tmp_path / "in" / patient)
    assert sorted(p.patient_id for p in store.children()) == ["B", "C"]  # type: ignore[union-attr]
    assert store.stats().size <= size * 4


def test_store_unprotect_restores_recycling(open_store: Callable[..., Store], tmp_path: Path) -> None:
    for patient in ("A", "B", "C"):
        _write_patient(tmp_path / "in", patient, instances=1)
    store = open_store(limits=Limits(max_patients=2))
    a = list(store.ingest([tmp_path / "in" / "A"]))[0]
    store.set_protected(a.ids[0], True)
    store.set_protected(a.ids[0], False)
    _ingest(store, tmp_path / "in" / "B")
    _ingest(store, tmp_path / "in" / "C")
    assert sorted(p.patient_id for p in store.children()) == ["B", "C"]  # type: ignore[union-attr]


def test_store_user_metadata_get_set_delete(tmp_path: Path) -> None:
    _write_patient(tmp_path / "in", "P1", instances=1)
    with Store.create(tmp_path / "s", metadata_names={"Reviewed": 1024}) as store:
        result = list(store.ingest([tmp_path / "in"]))[0]
        store.set_metadata(result.ids[1], "Reviewed", "yes by Dr X")
        store.set_metadata(result.ids[1], "1030", "numbered")
        assert store.metadata(result.ids[1])["Reviewed"] == "yes by Dr X"
        assert store.metadata(result.ids[1])["1030"] == "numbered"
        store.delete_metadata(result.ids[1], "Reviewed")
        assert "Reviewed" not in store.metadata(result.ids[1])
        with pytest.raises(PermissionDeniedError):
            store.set_metadata(result.ids[1], "ReceptionDate", "tomorrow")
        with pytest.raises(NotFoundError):
            store.set_metadata(result.ids[1], "Unknown", "x")
        with pytest.raises(NotFoundError):
            store.delete_metadata(result.ids[1], "Reviewed")


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_store_attachments_put_get_delete(tmp_path: Path, codec: str) -> None:
    from dicomfs.store.committer import WriteSettings

    _write_patient(tmp_path / "in", "P1", instances=1)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 " + bytes(range(256)) * 2000)
    with Store.create(tmp_path / "s", settings=WriteSettings(codec=codec),
                      attachment_types={"report": (1024, "application/pdf")}) as store:
        result = list(store.ingest([tmp_path / "in"]))[0]
        attachment = store.put_attachment(result.ids[1], "report", report)
        assert (attachment.mime, attachment.size) == ("application/pdf", report.stat().st_size)
        with store.open_attachment(result.ids[1], "report") as reader:
            assert b"".join(reader.iter_chunks()) == report.read_bytes()
        assert check_store(store).clean
        store.put_attachment(result.ids[1], "report", report)  # replacing leaves no stray blob
        assert check_store(store).clean
        store.delete_attachment(result.ids[1], "report")
        assert store.attachments(result.ids[1]) == []
        assert check_store(store).clean


def test_store_attachments_go_with_their_resource(tmp_path: Path) -> None:
    _write_patient(tmp_path / "in", "P1", instances=1)
    attachment = tmp_path / "notes.txt"
    attachment.write_text("notes")
    with Store.create(tmp_path / "s", attachment_types={"notes": (1025, "text/plain")}) as store:
        result = list(store.ingest([tmp_path / "in"]))[0]
        store.put_attachment(result.ids[2], "notes", attachment)
        store.set_metadata(result.ids[2], "1024", "x")
        store.delete(result.ids[0])
        assert store.stats().attachment_bytes == 0
        assert list(store.blobs.names()) == []
        assert check_store(store).clean


def test_store_readonly_refuses_changes(tmp_path: Path) -> None:
    _write_patient(tmp_path / "in", "P1", instances=1)
    with Store.create(tmp_path / "s") as store:
        result = list(store.ingest([tmp_path / "in"]))[0]
    with Store(tmp_path / "s", readonly=True) as store:
        with pytest.raises(ReadOnlyError):
            store.delete(result.ids[0])
        assert store.stats().instances == 1
