"""The views, without FUSE or HTTP: names, collisions, every view's contents, freshness."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomfs.errors import NotFoundError
from dicomfs.samples import Corpus, make_instance, write_instance
from dicomfs.store import Level
from dicomfs.store.store import Store
from dicomfs.views import VIEWS, EntryKind, NotAFolderError, Tree
from dicomfs.views.names import MAX_NAME_BYTES, disambiguate, fit_name, join_fields, safe_text

# -- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ('CT/Head\\Neck: w/o "contrast" <a>|*?', 'CT_Head_Neck_ w_o _contrast_ _a____'),
    ("tab\there\x00nul\x7f", "tab_here_nul_"),
    ("  many   spaces  ", "many spaces"),
    ("Müller^Jürgen", "Müller^Jürgen"),
    ("Mu\u0308ller", "Müller"),  # decomposed (as macOS sends it) becomes composed
    ("Παπαδόπουλος^Γιώργος", "Παπαδόπουλος^Γιώργος"),
])
def test_names_safe_text_replaces_what_clients_refuse_and_keeps_utf8(value: str, expected: str) -> None:
    assert safe_text(value) == expected


def test_names_placeholders_fill_empty_values() -> None:
    assert join_fields([("", "(no id)"), ("  ", "(no name)"), ("...", "(no description)")]) == "(no id) - (no name) - (no description)"


@pytest.mark.parametrize("stem", ["CON", "con", "Lpt1", "NUL.txt", "aux "])
def test_names_windows_device_names_are_escaped(stem: str) -> None:
    assert fit_name(stem).startswith("_")


def test_names_trailing_dots_and_spaces_go() -> None:
    assert fit_name("abc. . ") == "abc"
    assert fit_name("...") == "_"


def test_names_long_utf8_is_cut_at_a_character_boundary_keeping_suffix_and_extension() -> None:
    name = fit_name("é" * 300, suffix=" (2)", extension=".dcm")
    encoded = name.encode("utf-8")
    assert len(encoded) <= MAX_NAME_BYTES
    assert name.endswith("é (2).dcm")
    encoded.decode("utf-8")  # no half character


def test_names_collisions_are_numbered_in_stored_order_ignoring_case() -> None:
    items = [("Doe", ".dcm"), ("DOE", ".dcm"), ("doe", ".dcm"), ("other", "")]
    assert disambiguate(items, [2, 1, 3, 0]) == ["Doe (2).dcm", "DOE.dcm", "doe (3).dcm", "other"]


def test_names_a_later_sibling_never_renames_an_earlier_one() -> None:
    before = disambiguate([("X", ""), ("X (2)", "")], [(1, "a"), (2, "b")])
    after = disambiguate([("X", ""), ("X (2)", ""), ("X", "")], [(1, "a"), (2, "b"), (3, "0")])
    assert after[:2] == before == ["X", "X (2)"]
    assert after[2] == "X (3)"


# -- the tree over a real store ---------------------------------------------------------------------


@pytest.fixture
def corpus_tree(open_store: Callable[..., Store], small_corpus: Corpus) -> Iterator[tuple[Store, Tree]]:
    store = open_store()
    list(store.ingest([small_corpus.root]))
    yield store, Tree(store)


def _files(tree: Tree, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], int, str | None, EntryKind]]:
    for entry in tree.listing(path).entries:
        if entry.is_folder:
            if entry.name != "uploads":
                yield from _files(tree, (*path, entry.name))
        else:
            yield (*path, entry.name), entry.size, entry.resource_id, entry.kind


def test_views_every_view_shows_every_instance_once(corpus_tree: tuple[Store, Tree], small_corpus: Corpus) -> None:
    store, tree = corpus_tree
    assert [e.name for e in tree.listing(()).entries] == ["by-dates", "by-patients", "by-studies", "by-uids", "uploads"]
    stored = {r.id: r.size for r in store.walk(Level.INSTANCE)}
    assert len(stored) == small_corpus.instances
    for view in VIEWS:
        files = [f for f in _files(tree, (view,)) if f[3] is EntryKind.INSTANCE]
        assert sorted(rid for _, _, rid, _ in files) == sorted(stored), view
        assert all(size == stored[rid] for _, size, rid, _ in files if rid), view
        assert all(path[-1].endswith(".dcm") for path, _, _, _ in files)


@pytest.fixture
def shaped_tree(open_store: Callable[..., Store], tmp_path: Path) -> Tree:
    """A handful of instances with known values, to check names and shapes exactly."""
    store = open_store()
    rows = [
        # patient id, name, study uid, date, description, series uid, modality, series description, sop uid, number
        ("PAT1", "SMITH^EVA", "1.1", "20150422", "PELVIS", "1.1.1", "CT", "CT PELVIS", "1.1.1.3", 3),
        ("PAT1", "SMITH^EVA", "1.1", "20150422", "PELVIS", "1.1.1", "CT", "CT PELVIS", "1.1.1.1", 1),
        ("PAT1", "SMITH^EVA", "1.1", "20150422", "PELVIS", "1.1.1", "CT", "CT PELVIS", "1.1.1.2", 2),
        ("PAT1", "SMITH^EVA", "1.1", "20150422", "PELVIS", "1.1.2", "MR", "", "1.1.2.1", None),
        ("PAT1", "SMITH^EVA", "1.2", "20151014", "HEAD", "1.2.1", "CT", "CT HEAD", "1.2.1.1", 1),
        ("PAT2", "Müller^Jürgen", "2.1", "20240105", 'CT/Head\\Neck: "w/o"', "2.1.1", "CT", "", "2.1.1.1", 1),
        ("PAT3", "", "3.1", "", "", "3.1.1", "OT", "", "3.1.1.1", 1),
    ]
    for n, (pid, name, study, date, desc, series, modality, series_desc, sop, number) in enumerate(rows):
        _write(tmp_path / "in", f"{n}.dcm", patient_id=pid, patient_name=name, study_uid=study, study_date=date,
               study_description=desc, series_uid=series, modality=modality, series_description=series_desc,
               sop_uid=sop, instance_number=number, SpecificCharacterSet="ISO_IR 192")
    list(store.ingest([tmp_path / "in"]))
    return Tree(store)


def test_views_by_patients_shape_and_instance_order(shaped_tree: Tree) -> None:
    tree = shaped_tree
    assert [e.name for e in tree.listing(("by-patients",)).entries] == ["PAT1 - SMITH^EVA", "PAT2 - Müller^Jürgen", "PAT3 - (no name)"]
    assert [e.name for e in tree.listing(("by-patients", "PAT1 - SMITH^EVA")).entries] == ["20150422 - PELVIS", "20151014 - HEAD"]
    series = ("by-patients", "PAT1 - SMITH^EVA", "20150422 - PELVIS")
    assert [e.name for e in tree.listing(series).entries] == ["CT - CT PELVIS", "MR - (no description)"]
    assert [e.name for e in tree.listing((*series, "CT - CT PELVIS")).entries] == [
        "0001 - 1.1.1.1.dcm", "0002 - 1.1.1.2.dcm", "0003 - 1.1.1.3.dcm"]
    assert [e.name for e in tree.listing((*series, "MR - (no description)")).entries] == ["(no number) - 1.1.2.1.dcm"]
    assert [e.name for e in tree.listing(("by-patients", "PAT3 - (no name)")).entries] == ["(no date) - (no description)"]


def test_views_by_studies_and_unsafe_descriptions(shaped_tree: Tree) -> None:
    assert [e.name for e in shaped_tree.listing(("by-studies",)).entries] == [
        "PAT1 - SMITH^EVA - HEAD", "PAT1 - SMITH^EVA - PELVIS", "PAT2 - Müller^Jürgen - CT_Head_Neck_ _w_o_",
        "PAT3 - (no name) - (no description)"]


def test_views_by_dates_groups_by_year_and_month_and_keeps_undated_studies(shaped_tree: Tree) -> None:
    tree = shaped_tree
    assert [e.name for e in tree.listing(("by-dates",)).entries] == ["2015", "2024", "unknown"]
    assert [e.name for e in tree.listing(("by-dates", "2015")).entries] == ["2015-04", "2015-10"]
    assert [e.name for e in tree.listing(("by-dates", "2015", "2015-04")).entries] == ["PAT1 - SMITH^EVA - PELVIS"]
    assert [e.name for e in tree.listing(("by-dates", "unknown")).entries] == ["PAT3 - (no name) - (no description)"]
    month = ("by-dates", "2015", "2015-04", "PAT1 - SMITH^EVA - PELVIS", "CT - CT PELVIS")
    assert len(tree.listing(month).entries) == 3


def test_views_by_uids_has_study_and_series_documents_with_exact_sizes(corpus_tree: tuple[Store, Tree]) -> None:
    _, tree = corpus_tree
    study = tree.listing(("by-uids",)).entries[0]
    entries = tree.listing(("by-uids", study.name)).entries
    document = next(e for e in entries if e.name == "study.json")
    content = tree.document(document)
    assert document.size == len(content)
    parsed = json.loads(content)
    assert parsed["MainDicomTags"]["StudyInstanceUID"] == study.name
    assert parsed["CountSeries"] == len([e for e in entries if e.is_folder])
    series = next(e for e in entries if e.is_folder)
    series_entries = tree.listing(("by-uids", study.name, series.name)).entries
    series_json = next(e for e in series_entries if e.name == "series.json")
    parsed = json.loads(tree.document(series_json))
    assert parsed["CountInstances"] == len(series_entries) - 1
    assert {i["SOPInstanceUID"] + ".dcm" for i in parsed["Instances"]} == {e.name for e in series_entries if e.name != "series.json"}


def test_views_documents_are_indented_utf8_json_a_person_can_read(corpus_tree: tuple[Store, Tree]) -> None:
    """The documents keep one format whatever renders them: json.dumps(indent=2), UTF-8 names left
    readable, one newline at the end (the tricky corpus has non-ASCII names and descriptions)."""
    _, tree = corpus_tree
    rendered = 0
    for study in tree.listing(("by-uids",)).entries:
        for entry in tree.listing(("by-uids", study.name)).entries:
            documents = [entry] if entry.name == "study.json" else []
            if entry.is_folder:
                documents += [e for e in tree.listing(("by-uids", study.name, entry.name)).entries if e.name == "series.json"]
            for document in documents:
                content = tree.document(document)
                assert content == (json.dumps(json.loads(content), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
                rendered += 1
    assert rendered > 4


def test_views_lookup_errors(corpus_tree: tuple[Store, Tree]) -> None:
    _, tree = corpus_tree
    with pytest.raises(NotFoundError):
        tree.lookup(("by-patients", "NOPE"))
    with pytest.raises(NotFoundError):
        tree.listing(("nothing-here",))
    some_file = next(_files(tree, ("by-uids",)))[0]
    with pytest.raises(NotAFolderError):
        tree.listing(some_file)


def test_views_lookup_forgives_case_and_unicode_form(shaped_tree: Tree) -> None:
    tree = shaped_tree
    found = tree.lookup(("by-patients", "pat2 - mu\u0308ller^ju\u0308rgen"))
    assert found.name == "PAT2 - Müller^Jürgen"


def _write(folder: Path, name: str, **ids: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    write_instance(path, make_instance(**ids))  # type: ignore[arg-type]
    return path


def test_views_colliding_names_are_stable_as_data_arrives_and_across_restarts(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    base = dict(patient_name="SAME^NAME", series_uid="", sop_uid="")
    # "P/1" and "P:1" and "p_1" all become "P_1 - SAME^NAME" (ignoring case): three colliding patients.
    for step, patient_id in enumerate(["P/1", "P:1"]):
        ids = {**base, "patient_id": patient_id, "study_uid": f"1.{step}", "series_uid": f"1.{step}.1", "sop_uid": f"1.{step}.1.1"}
        list(store.ingest([_write(tmp_path / f"in{step}", "a.dcm", **ids)]))
    tree = Tree(store)
    first = {e.name: e.resource_id for e in tree.listing(("by-patients",)).entries}
    assert set(first) == {"P_1 - SAME^NAME", "P_1 - SAME^NAME (2)"}
    ids = {**base, "patient_id": "p_1", "study_uid": "1.9", "series_uid": "1.9.1", "sop_uid": "1.9.1.1"}
    list(store.ingest([_write(tmp_path / "in9", "a.dcm", **ids)]))
    assert tree.refresh()
    later = {e.name: e.resource_id for e in tree.listing(("by-patients",)).entries}
    assert {k: later[k] for k in first} == first  # nobody was renamed
    assert "p_1 - SAME^NAME (3)" in later
    assert {e.name: e.resource_id for e in Tree(store).listing(("by-patients",)).entries} == later  # a new tree (a restart)


def test_views_same_study_uid_under_two_patients_gets_two_by_uids_folders(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    for patient in ("A", "B"):
        ids = dict(patient_id=patient, patient_name="X", study_uid="1.2.3", series_uid=f"1.2.3.{ord(patient)}", sop_uid=f"1.2.3.{ord(patient)}.1")
        list(store.ingest([_write(tmp_path / patient, "a.dcm", **ids)]))
    names = [e.name for e in Tree(store).listing(("by-uids",)).entries]
    assert names == ["1.2.3", "1.2.3 (2)"]


def test_views_refresh_shows_ingests_and_deletes(corpus_tree: tuple[Store, Tree], tmp_path: Path) -> None:
    store, tree = corpus_tree
    assert not tree.refresh()
    before = len(tree.listing(("by-patients",)).entries)
    ids = dict(patient_id="NEW", patient_name="NEW^ONE", study_uid="9.9", series_uid="9.9.1", sop_uid="9.9.1.1")
    list(store.ingest([_write(tmp_path / "new", "a.dcm", **ids)]))
    assert len(tree.listing(("by-patients",)).entries) == before  # cached until refreshed
    assert tree.refresh()
    added = tree.lookup(("by-patients", "NEW - NEW^ONE"))
    assert added.resource_id is not None
    store.delete(added.resource_id)
    assert tree.refresh()
    with pytest.raises(NotFoundError):
        tree.lookup(("by-patients", "NEW - NEW^ONE"))
    assert len(tree.listing(("by-patients",)).entries) == before


def test_views_by_uids_lookup_of_a_plain_uid_reads_no_listing_and_agrees_with_it(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    rows = [  # (patient, study uid): stored in this order
        ("A", "1.2.3."),  # named "1.2.3": the plain 1.2.3 stored after it becomes "1.2.3 (2)"
        ("A", "1.2.3"),
        ("B", "5.6"),  # one StudyInstanceUID under two patients: "5.6" and "5.6 (2)"
        ("C", "5.6"),
        ("D", "7.8.9"),  # plain, alone, with series and instance UIDs that extend it
    ]
    for n, (patient, uid) in enumerate(rows):
        ids = dict(patient_id=patient, patient_name="X", study_uid=uid, series_uid=f"7.8.9.{n}", sop_uid=f"7.8.9.{n}.1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom's, writing the invalid "1.2.3." on purpose
            path = _write(tmp_path / str(n), "a.dcm", **ids)
        list(store.ingest([path]))
    listed = {e.name: e for e in Tree(store).listing(("by-uids",)).entries}
    assert set(listed) == {"1.2.3", "1.2.3 (2)", "5.6", "5.6 (2)", "7.8.9"}
    for name, entry in listed.items():
        fresh = Tree(store)
        assert fresh.lookup(("by-uids", name)) == entry
        assert fresh.listing(("by-uids", name)) == Tree(store).listing(("by-uids", name))
    plain = Tree(store)
    assert plain.lookup(("by-uids", "7.8.9")) == listed["7.8.9"]
    with pytest.raises(NotFoundError):
        plain.lookup(("by-uids", "7.8"))
    assert plain.cached(("by-uids",)) is None  # answered from the UID index alone


def test_views_refresh_drops_only_the_listings_a_change_touched(corpus_tree: tuple[Store, Tree], tmp_path: Path) -> None:
    store, tree = corpus_tree
    patients = tree.listing(("by-patients",)).entries
    first, second = (("by-patients", p.name) for p in patients[:2])
    assert tree.cached(first) is None
    kept = tree.listing(second)
    changed = tree.listing(first)
    by_uids = tree.listing(("by-uids",))
    patient = next(p for p in patients if p.name == first[1])
    record = store.get(patient.resource_id)  # type: ignore[arg-type]
    ids = dict(patient_id=record.patient_id, patient_name=record.patient_name,  # type: ignore[union-attr]
               study_uid="9.9", series_uid="9.9.1", sop_uid="9.9.1.1", study_date="20010203")
    list(store.ingest([_write(tmp_path / "new", "a.dcm", **ids)]))
    assert tree.refresh()
    assert tree.cached(second) is kept  # nothing of that patient changed
    assert tree.cached(first) is None and tree.cached(("by-uids",)) is None
    assert len(tree.listing(first).entries) == len(changed.entries) + 1
    assert len(tree.listing(("by-uids",)).entries) == len(by_uids.entries) + 1
    assert tree.lookup(("by-uids", "9.9")).resource_id is not None


def test_views_refresh_drops_everything_after_more_commits_than_it_reads(corpus_tree: tuple[Store, Tree]) -> None:
    store, tree = corpus_tree
    patients = tree.listing(("by-patients",)).entries
    untouched = ("by-patients", patients[1].name)
    tree.listing(untouched)
    for n in range(257):  # one commit each, all on the first patient: more than a refresh reads the log of
        store.set_protected(patients[0].resource_id, n % 2 == 0)  # type: ignore[arg-type]
    assert tree.refresh()
    assert tree.cached(untouched) is None
    assert tree.change_number == store.change_number()
