"""A name once shown never changes while its resource exists (issue #23): not when siblings arrive,
not when they go, not across restarts; and `rm -r` of a folder whose children share a name works,
through the mount and through davfs2 over the bridge."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import pytest

from dicomfs.errors import NotFoundError
from dicomfs.samples import make_instance, write_instance
from dicomfs.store.store import Store
from dicomfs.views import Tree
from dicomfs.views.names import number_siblings
from tests.conftest import run_cli
from tests.test_mount import Mounted, mount  # noqa: F401 (the fixture)
from tests.test_webdav_clients import bridge, davfs2_mounted, listing
from tests.webdav_server import Server

_STUDY = "by-studies/P1 - DOE^JANE - HEAD"
_SERIES = "MR - FAST LOCALIZER"


@dataclass(frozen=True)
class Row:
    """One instance to store; the defaults make one patient, one study, one series."""

    sop: str
    patient: str = "P1"
    study: str = "1.2"
    series: str = "1.2.1"
    description: str = "FAST LOCALIZER"
    number: int = 1


def _ingest(store: Store, folder: Path, *rows: Row) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in rows:
        path = folder / f"{len(list(folder.iterdir()))}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom's, for the UIDs made to collide on purpose
            write_instance(path, make_instance(
                patient_id=row.patient, patient_name="DOE^JANE", study_uid=row.study, series_uid=row.series, sop_uid=row.sop,
                modality="MR", study_description="HEAD", series_description=row.description, instance_number=row.number,
                rows=4, columns=4))
        paths.append(path)
    results = list(store.ingest(paths))
    assert all(r.status == "stored" for r in results), results


def _names(tree: Tree, path: str) -> dict[str, str]:
    """name -> resource id of the folders (or files) at ``path``."""
    tree.refresh()
    return {e.name: e.resource_id for e in tree.listing(tuple(path.split("/"))).entries if e.resource_id is not None}


def _series(n: int, description: str = "FAST LOCALIZER") -> Row:
    return Row(sop=f"1.2.{n}.1", series=f"1.2.{n}", description=description)


# -- the tree over a real store ---------------------------------------------------------------------


def test_stable_names_arrivals_keep_every_shown_name(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    _ingest(store, tmp_path / "a", _series(1), _series(2))
    tree = Tree(store)
    first = _names(tree, _STUDY)
    assert set(first) == {_SERIES, f"{_SERIES} (2)"}
    _ingest(store, tmp_path / "b", _series(3), _series(4, "FAST LOCALIZER (2)"))
    later = _names(tree, _STUDY)
    assert {name: later[name] for name in first} == first
    assert set(later) == {_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)", f"{_SERIES} (2) (2)"}


@pytest.mark.parametrize("gone", [0, 1], ids=["first holder", "middle holder"])
def test_stable_names_deleting_a_holder_renames_nobody(open_store: Callable[..., Store], tmp_path: Path, gone: int) -> None:
    store = open_store()
    _ingest(store, tmp_path / "a", _series(1), _series(2), _series(3))
    tree = Tree(store)
    before = _names(tree, _STUDY)
    assert set(before) == {_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)"}
    doomed = [_SERIES, f"{_SERIES} (2)"][gone]
    store.delete(before.pop(doomed))
    assert _names(tree, _STUDY) == before
    for view in ("by-patients/P1 - DOE^JANE/20240101 - HEAD", "by-dates/2024/2024-01/P1 - DOE^JANE - HEAD"):
        assert _names(tree, view) == before  # one name in every view that names series so
    assert _names(Tree(store), _STUDY) == before  # a new tree: the same names


def test_stable_names_survive_a_restart_after_a_delete(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    _ingest(store, tmp_path / "a", _series(1), _series(2), _series(3))
    before = _names(Tree(store), _STUDY)
    store.delete(before.pop(_SERIES))
    store.close()
    reopened = open_store(tmp_path / "store")
    assert _names(Tree(reopened), _STUDY) == before


def test_stable_names_a_resource_stored_again_is_a_newcomer(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    _ingest(store, tmp_path / "a", _series(1), _series(2), _series(3))
    tree = Tree(store)
    before = _names(tree, _STUDY)
    second = before[f"{_SERIES} (2)"]
    store.delete(second)
    assert second not in store.name_numbers(f"series/{store.get(before[_SERIES]).parent}")  # gone with it
    _ingest(store, tmp_path / "again", _series(2))
    after = _names(tree, _STUDY)
    assert after[f"{_SERIES} (2)"] == second  # the first free number: its own again
    assert {n: after[n] for n in (_SERIES, f"{_SERIES} (3)")} == {n: before[n] for n in (_SERIES, f"{_SERIES} (3)")}
    store.delete(before[_SERIES])
    _ingest(store, tmp_path / "third", _series(5))
    assert set(_names(tree, _STUDY)) == {_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)"}  # the newcomer takes the free name


# Each level that tells siblings apart: the rows that make two colliding siblings (the first stored
# first), the folder that lists them, the two names.
_LEVELS = {
    "patients": ([Row("1.1.1.1", patient="P/1", study="1.1", series="1.1.1"), Row("1.3.1.1", patient="P:1", study="1.3", series="1.3.1")],
                 "by-patients", "P_1 - DOE^JANE"),
    "studies of a patient": ([Row("1.1.1.1", study="1.1", series="1.1.1"), Row("1.3.1.1", study="1.3", series="1.3.1")],
                             "by-patients/P1 - DOE^JANE", "20240101 - HEAD"),
    "by-studies": ([Row("1.1.1.1", study="1.1", series="1.1.1"), Row("1.3.1.1", study="1.3", series="1.3.1")],
                   "by-studies", "P1 - DOE^JANE - HEAD"),
    "by-dates": ([Row("1.1.1.1", study="1.1", series="1.1.1"), Row("1.3.1.1", study="1.3", series="1.3.1")],
                 "by-dates/2024/2024-01", "P1 - DOE^JANE - HEAD"),
    "by-uids": ([Row("1.1.1.1", patient="A", study="1.1", series="1.1.1"), Row("1.1.2.1", patient="B", study="1.1", series="1.1.2")],
                "by-uids", "1.1"),
    "series": ([_series(1), _series(2)], _STUDY, _SERIES),
}
# Series and instances in by-uids, and instances (named by their SOP Instance UID), cannot collide:
# ingest accepts only UIDs of digits and dots (PS3.5 9.1), which no two resources share.


@pytest.mark.parametrize("level", list(_LEVELS))
def test_stable_names_at_every_level_outlive_the_first_holder(open_store: Callable[..., Store], tmp_path: Path, level: str) -> None:
    rows, folder, name = _LEVELS[level]
    store = open_store()
    for n, row in enumerate(rows):
        _ingest(store, tmp_path / str(n), row)
    tree = Tree(store)
    before = _names(tree, folder)
    numbered = f"{name[:-4]} (2).dcm" if name.endswith(".dcm") else f"{name} (2)"
    assert {name, numbered} <= set(before)
    store.delete(before[name])
    after = _names(tree, folder)
    assert after[numbered] == before[numbered] and name not in after
    assert _names(Tree(store), folder) == after
    if level == "by-uids":  # the UID index's shortcut knows the one study left is "1.1 (2)"
        with pytest.raises(NotFoundError):
            Tree(store).lookup(("by-uids", "1.1"))


def test_stable_names_a_read_only_store_computes_what_it_cannot_keep(open_store: Callable[..., Store], tmp_path: Path) -> None:
    store = open_store()
    _ingest(store, tmp_path / "a", _series(1), _series(2))
    store.close()
    with Store(tmp_path / "store", readonly=True) as readonly:
        names = _names(Tree(readonly), _STUDY)
        assert set(names) == {_SERIES, f"{_SERIES} (2)"}
        context = f"series/{readonly.get(names[_SERIES]).parent}"
        assert readonly.name_numbers(context) == {}
    store = open_store(tmp_path / "store")
    assert _names(Tree(store), _STUDY) == names
    assert set(store.name_numbers(context).values()) == {1, 2}  # kept by the first writer that listed


# -- a real mount -----------------------------------------------------------------------------------


def _three_series(folder: Path) -> Path:
    for n in (1, 2, 3):
        for i in (1, 2):
            ds = make_instance(patient_id="P1", patient_name="DOE^JANE", study_uid="1.2", series_uid=f"1.2.{n}",
                               sop_uid=f"1.2.{n}.{i}", modality="MR", study_description="HEAD",
                               series_description="FAST LOCALIZER", series_number=n, instance_number=i, rows=4, columns=4)
            folder.mkdir(parents=True, exist_ok=True)
            write_instance(folder / f"{n}-{i}.dcm", ds)
    return folder


def test_stable_names_mount_rm_r_of_a_study_whose_series_share_a_name(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    m = mount(ingest=(_three_series(tmp_path / "in"),))
    study = m.path / _STUDY
    assert sorted(os.listdir(study)) == [_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)"]
    done = subprocess.run(["rm", "-r", str(study)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not study.exists()
    assert os.listdir(m.path / "by-uids") == []


def test_stable_names_mount_rm_r_of_one_series_renames_no_other(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    m = mount(ingest=(_three_series(tmp_path / "in"),))
    study = m.path / _STUDY
    uids = {name: os.getxattr(study / name, "user.dicom.SeriesInstanceUID") for name in os.listdir(study)}
    assert len(uids) == 3
    done = subprocess.run(["rm", "-r", str(study / _SERIES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    del uids[_SERIES]
    assert {name: os.getxattr(study / name, "user.dicom.SeriesInstanceUID") for name in os.listdir(study)} == uids


def _series_in_bridge(server: Server, study: str) -> dict[str, str]:
    """name -> SeriesInstanceUID of the series folders the bridge lists in ``study`` (from the
    SOP instance UIDs of their files, ``<series uid>.<n>``)."""
    def members(path: str) -> list[str]:  # (listing() keeps the folder itself when its path is quoted)
        return [name for name in listing(server, "/" + quote(path) + "/") if name != path.rsplit("/", 1)[1]]

    return {name: members(f"{study}/{name}")[0].split(" - ", 1)[1].removesuffix(".dcm").rsplit(".", 1)[0]
            for name in members(study)}


def test_stable_names_a_mount_and_a_bridge_over_one_store_agree(mount: Callable[..., Mounted], tmp_path: Path) -> None:
    m = mount(ingest=(_three_series(tmp_path / "in"),))
    study = m.path / _STUDY
    with bridge(m.store) as server:
        shown = _series_in_bridge(server, _STUDY)  # the bridge lists first: it gives the numbers
        assert set(shown) == {_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)"}
        assert {name: os.getxattr(study / name, "user.dicom.SeriesInstanceUID").decode() for name in os.listdir(study)} == shown
        done = subprocess.run(["rm", "-r", str(study / _SERIES)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        del shown[_SERIES]
        assert _series_in_bridge(server, _STUDY) == shown


# -- davfs2 over the bridge -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stable_names_davfs2_rm_r_of_a_study_exits_0(tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    run_cli("ingest", str(_three_series(tmp_path / "in")), store=store, check=True)
    with bridge(store) as server, davfs2_mounted(server.url) as mnt:
        study = mnt / _STUDY
        assert sorted(os.listdir(study)) == [_SERIES, f"{_SERIES} (2)", f"{_SERIES} (3)"]
        done = subprocess.run(["rm", "-r", str(study)], capture_output=True, text=True, timeout=120)
        assert server.request("PROPFIND", "/by-uids/", headers={"Depth": "1"}).body.count(b"<D:response>") == 1
        assert done.returncode == 0, done.stderr
        assert not study.exists()


def test_stable_names_many_siblings_of_one_name_are_numbered_in_linear_time() -> None:
    """A hostile series of 20,000 instances whose names all collide (case, unsafe characters): each
    sibling must not try every number the earlier ones took (that was 200 million tries)."""
    items = [("X", ".dcm")] * 20_000
    started = time.process_time()
    names, numbers = number_siblings(items, range(len(items)), {})
    assert time.process_time() - started < 2
    assert len(set(names)) == len(names) and names[-1] == "X (20000).dcm" and numbers[len(items) - 1] == 20_000
    kept = {0: 1, 1: 3}  # the first free number is still taken first
    assert number_siblings(items[:4], range(4), kept)[0] == ["X.dcm", "X (3).dcm", "X (2).dcm", "X (4).dcm"]
