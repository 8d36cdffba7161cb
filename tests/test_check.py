"""``check`` finds each kind of damage, and ``--repair`` mends it without deleting data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from dicomfs.samples import Corpus
from dicomfs.store.check import check_store
from dicomfs.store.store import Store


def _filled(open_store: Callable[..., Store], corpus: Corpus) -> tuple[Store, list[str]]:
    store = open_store()
    ids = [r.ids[3] for r in store.ingest([corpus.root]) if r.status == "stored"]
    assert check_store(store).clean
    return store, ids


def test_check_finds_and_quarantines_an_orphan_blob(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store, _ = _filled(open_store, small_corpus)
    stray = store.blobs.new_name()
    store.blobs.write(stray, memoryview(b"not referenced"))
    report = check_store(store)
    assert not report.clean and any("orphan" in p and stray in p for p in report.problems)
    repaired = check_store(store, repair=True)
    assert repaired.repairs
    assert not store.blobs.exists(stray)
    assert list((store.folder / "quarantine").rglob(stray))
    assert check_store(store).clean


def test_check_finds_a_missing_blob(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store, ids = _filled(open_store, small_corpus)
    record = store.get(ids[0])
    os.unlink(store.blobs.path(record.blob))  # type: ignore[union-attr]
    report = check_store(store)
    assert any("missing" in p for p in report.problems)
    check_store(store, repair=True)
    assert store.find(ids[0]) is None
    assert check_store(store).clean


def test_check_finds_a_damaged_blob_and_keeps_it_in_quarantine(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    store, ids = _filled(open_store, small_corpus)
    record = store.get(ids[1])
    path = store.blobs.path(record.blob)  # type: ignore[union-attr]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    report = check_store(store)
    assert any("SHA-256" in p for p in report.problems)
    assert check_store(store, verify_hashes=False).clean  # sizes alone cannot see it
    check_store(store, repair=True)
    assert list((store.folder / "quarantine").rglob(record.blob))  # type: ignore[union-attr]
    assert check_store(store).clean


def test_check_repairs_wrong_counts(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    import dataclasses

    store, ids = _filled(open_store, small_corpus)
    series = store.get(store.get(ids[0]).parent)  # type: ignore[arg-type]
    with store.index.write() as txn:
        store.index.put(txn, dataclasses.replace(series, instances=series.instances + 5))  # type: ignore[call-arg]
        store.index.add_to_counter(txn, "instances", 3)
    report = check_store(store)
    assert any("recount" in p for p in report.problems)
    assert any("counter instances" in p for p in report.problems)
    check_store(store, repair=True)
    assert check_store(store).clean
    assert store.get(series.id).instances == series.instances  # type: ignore[union-attr]


def test_check_is_clean_on_an_empty_store(open_store: Callable[..., Store]) -> None:
    report = check_store(open_store())
    assert report.clean and report.records == 0


def test_check_leftovers_of_a_dead_writer_are_recovered_on_open(tmp_path: Path, small_corpus: Corpus) -> None:
    from dicomfs.store.owners import Owner

    with Store.create(tmp_path / "s") as store:
        list(store.ingest([small_corpus.root]))
    # a writer that announced a blob, wrote it, then died before indexing it
    with Store(tmp_path / "s") as store:
        dead = Owner(tmp_path / "s" / "owners")
        blob = store.blobs.new_name()
        with store.index.write() as txn:
            store.index.add_pending(txn, dead.token, blob)
        store.blobs.write(blob, memoryview(b"half an ingest"))
        dead.release()  # the lock goes, as when the kernel reaps a killed process
    with Store(tmp_path / "s") as store:
        assert not store.blobs.exists(blob)
        assert check_store(store).clean


def test_series_children_come_from_the_copies_kept_with_their_links(open_store: Callable[..., Store],
                                                                    small_corpus: Corpus) -> None:
    store, ids = _filled(open_store, small_corpus)
    series_id = store.get(ids[0]).parent  # type: ignore[union-attr]
    listed = store.children(series_id)
    assert listed and all(store.get(r.id) == r for r in listed)
    with store.index.read() as txn:
        assert all(store.index.link_row(txn, series_id, r.id) for r in listed)


def test_check_finds_and_mends_a_stale_copy_of_an_instance_record(open_store: Callable[..., Store],
                                                                  small_corpus: Corpus) -> None:
    import dataclasses

    store, ids = _filled(open_store, small_corpus)
    record = store.get(ids[0])
    assert record is not None
    with store.index.write() as txn:  # the record changed without its copy, as a replacing put that forgot the link would leave it
        store.index.put(txn, dataclasses.replace(record, origin="elsewhere"))  # type: ignore[arg-type]
    report = check_store(store)
    assert any(ids[0] in p and "copy of its record" in p for p in report.problems)
    check_store(store, repair=True)
    assert check_store(store).clean
    assert [r for r in store.children(record.parent) if r.id == ids[0]][0].origin == "elsewhere"


def test_links_without_a_copy_still_list_and_check_clean(open_store: Callable[..., Store], small_corpus: Corpus) -> None:
    """Stores written before links held copies: their records are read from the resources table."""
    store, ids = _filled(open_store, small_corpus)
    series_id = store.get(ids[0]).parent  # type: ignore[union-attr]
    before = store.children(series_id)
    with store.index.write() as txn:
        for record in before:
            store.index.link(txn, series_id, record.id)  # b"": as an older dicomfs wrote it
    with store.index.read() as txn:
        assert not any(store.index.link_row(txn, series_id, r.id) for r in before)
    assert store.children(series_id) == before
    assert check_store(store).clean
    check_store(store, repair=True)  # nothing to repair: the copies are an optimisation, not required
    assert check_store(store).clean
