"""Attachments (``dicomfs attach put``) shown as files in ``attachments/`` of their resource's folder:
in the pure tree, through a real FUSE mount and over a real WebDAV bridge."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dicomfs.samples import Corpus
from dicomfs.store import Level, Series, Study
from dicomfs.store.settings import WriteSettings
from dicomfs.store.store import Store
from dicomfs.views import EntryKind, Tree
from dicomfs.views.tags import ATTACHED, resource_attributes
from tests.conftest import run_cli
from tests.test_mount import Mounted, mount  # noqa: F401  (the fixture)
from tests.webdav_server import serve

CONFIG = '[attachments]\nreport = { key = 1030, mime = "application/pdf" }\nnotes = 1031\n'
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


@pytest.fixture
def attach_store(tmp_path: Path, small_corpus: Corpus) -> Iterator[Store]:
    with Store.create(tmp_path / "store", settings=WriteSettings(),
                      attachment_types={"report": (1030, "application/pdf"), "notes": (1031, "application/octet-stream")}) as store:
        list(store.ingest([small_corpus.root]))
        yield store


def test_tree_shows_attachments_folder_only_when_there_is_one(attach_store: Store, tmp_path: Path) -> None:
    store = attach_store
    tree = Tree(store)
    study = next(r for r in store.walk(Level.STUDY) if isinstance(r, Study))
    series = next(r for r in store.walk(Level.SERIES) if isinstance(r, Series) and r.parent == study.id)
    study_path = ("by-uids", study.study_uid)
    before = [e.name for e in tree.listing(study_path).entries]
    assert "attachments" not in before  # no attachment, no folder: ordinary listings do not change
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(PDF)
    store.put_attachment(study.id, "report", pdf)
    store.put_attachment(series.id, "notes", pdf)
    tree.refresh()
    after = tree.listing(study_path)
    folder = after.find("attachments")
    assert folder is not None and folder.is_folder and folder.resource_id is None
    assert sorted(e.name for e in after.entries) == sorted([*before, "attachments"])
    files = tree.listing((*study_path, "attachments")).entries
    assert [(e.name, e.kind, e.size) for e in files] == [("report.pdf", EntryKind.DOCUMENT, len(PDF))]
    with tree.open_attachment(files[0]) as reader:
        assert reader.read(0, reader.size) == PDF
    # in every view, and for a series (no MIME extension for octet-stream)
    for view in ("by-patients", "by-studies"):
        found = [path for path in _folders(tree, (view,)) if path[-1] == "attachments"]
        assert len(found) == 2, (view, found)
    series_files = [tree.listing(p).entries for p in _folders(tree, ("by-uids",)) if p[-1] == "attachments" and len(p) == 4]
    assert [[(e.name, e.size) for e in f] for f in series_files] == [[("notes", len(PDF))]]
    store.delete_attachment(study.id, "report")
    tree.refresh()
    assert [e.name for e in tree.listing(study_path).entries] == before


def _folders(tree: Tree, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for entry in tree.listing(path).entries:
        if entry.is_folder:
            yield (*path, entry.name)
            yield from _folders(tree, (*path, entry.name))


pytest_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
                                 reason="needs /dev/fuse and fusermount3 (apt install fuse3)")


def _attach(store: Path, config: Path, tmp_path: Path) -> dict[str, str]:
    """Attach PDF as 'report' to the first study, with the command line; that study's record."""
    study = json.loads(run_cli("ls", "studies", "--json", store=store, config=config).stdout.splitlines()[0])
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(PDF)
    done = run_cli("attach", "put", study["id"], "report", str(pdf), store=store, config=config)
    assert done.returncode == 0, done.stderr
    return study


@pytest_fuse
def test_mount_serves_attachment_bytes_and_refuses_writes(mount: Callable[..., Mounted], small_corpus: Corpus,  # noqa: F811
                                                          tmp_path: Path) -> None:
    m = mount(ingest=(small_corpus.root,), config=CONFIG)  # deletes allowed (the default): still no writing here
    study = _attach(m.store, m.config, tmp_path)
    folder = m.path / "by-uids" / study["study_uid"] / "attachments"
    deadline = time.monotonic() + 10  # the mount hears of the CLI's change on its refresh timer
    while not folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert os.listdir(folder) == ["report.pdf"]
    file = folder / "report.pdf"
    assert file.stat().st_size == len(PDF)
    assert file.read_bytes() == PDF
    with pytest.raises(OSError) as refused:
        file.open("r+b")
    assert refused.value.errno in (errno.EACCES, errno.EROFS)
    with pytest.raises(OSError):
        (folder / "new.pdf").write_bytes(b"x")
    with pytest.raises(OSError):
        file.unlink()
    assert file.read_bytes() == PDF


def test_webdav_serves_attachment_bytes_and_refuses_put(tmp_path: Path, small_corpus: Corpus) -> None:
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    config.write_text(CONFIG)
    run_cli("init", store=store, config=config, check=True)
    run_cli("ingest", "--quiet", str(small_corpus.root), store=store, config=config)
    study = _attach(store, config, tmp_path)
    uid = study["study_uid"]
    with serve(store, config=config) as server:
        path = f"/by-uids/{uid}/attachments/report.pdf"
        got = server.request("GET", path)
        assert got.status == 200 and got.body == PDF
        assert got.headers["content-type"] == "application/pdf"
        ranged = server.request("GET", path, headers={"Range": "bytes=9-18"})
        assert ranged.status == 206 and ranged.body == PDF[9:19]
        listed = server.request("PROPFIND", f"/by-uids/{uid}/attachments/", headers={"Depth": "1"})
        assert listed.status == 207 and b"report.pdf" in listed.body and str(len(PDF)).encode() in listed.body
        assert server.request("PUT", path, body=b"overwritten").status == 403
        assert server.request("PUT", f"/by-uids/{uid}/attachments/new.pdf", body=b"x").status == 403
        assert server.request("DELETE", path).status == 403
        assert server.request("GET", path).body == PDF


def test_an_instances_attachments_are_named_in_its_attributes(attach_store: Store, tmp_path: Path) -> None:
    store = attach_store
    instance = store.walk(Level.INSTANCE)[0]
    assert ATTACHED not in resource_attributes(store, instance.id)  # only when there is one
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(PDF)
    store.put_attachment(instance.id, "report", pdf)
    store.put_attachment(instance.id, "notes", pdf)
    assert resource_attributes(store, instance.id)[ATTACHED] == "report, notes"
