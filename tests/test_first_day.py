"""What a new user hits on the first day (issue #23), each through the real program."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from dicomfs.samples import write_corpus
from tests.conftest import run_cli
from tests.orthanc_server import orthanc
from tests.test_export import dicomfs_in, export_config

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "dicomfs"


def _editable_like_environment(tmp_path: Path) -> dict[str, str]:
    """An environment where this tree's dicomfs is found only by a meta path finder, as an editable
    install (scripts/setup) finds it, and not through sys.path: the case where a folder named
    ``dicomfs`` in the current directory, found first on a child's path, became the package."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, importlib.machinery, importlib.util, sys

        class _ThisTree(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name not in ("dicomfs", "bridge"):
                    return None
                folder = {str(ROOT)!r} + "/" + name
                return importlib.util.spec_from_file_location(name, folder + "/__init__.py",
                                                              submodule_search_locations=[folder])

        # Right after the path finder, before the shared venv's own editable finder.
        sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder) + 1, _ThisTree())
    """))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return {**env, "PYTHONPATH": str(hook), "DICOMFS_CONFIG": os.devnull}


def test_ingest_works_from_a_folder_holding_folders_named_like_the_packages(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", patients=2, studies_per_patient=2, series_per_study=2,
                          instances_per_series=12, pixels=8)  # 96 files: enough for the worker processes
    cwd = tmp_path / "cwd"
    (cwd / "dicomfs").mkdir(parents=True)
    (cwd / "bridge").mkdir()
    env = _editable_like_environment(tmp_path)
    store = tmp_path / "store"
    subprocess.run([str(CONSOLE_SCRIPT), "--store", str(store), "init"], cwd=cwd, env=env, check=True,
                   capture_output=True, timeout=60)
    done = subprocess.run([str(CONSOLE_SCRIPT), "--store", str(store), "ingest", str(corpus.root)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout.split()[:2] == ["stored", str(len(corpus.files))]


def test_a_stowrs_url_ending_in_studies_is_the_dicomweb_root(tmp_path: Path, filled_store: Path) -> None:
    with orthanc(tmp_path / "orthanc") as server:
        config = export_config(tmp_path / "dicomfs.toml", server, url=server.dicomweb_url + "/studies/")
        shown = run_cli("config", store=filled_store, config=config, check=True).stdout
        assert f'"url": "{server.dicomweb_url}"' in shown and "/studies" not in shown
        done = dicomfs_in(server, filled_store, config, "export", "--to", "orthanc", "--wait", "PAT00001")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 failed" in done.stdout
        assert len(server.sop_uids()) > 0


def test_an_export_failure_says_the_url_and_the_status(tmp_path: Path, filled_store: Path) -> None:
    with orthanc(tmp_path / "orthanc") as server:
        wrong = server.url + "/no-dicom-web"
        config = export_config(tmp_path / "dicomfs.toml", server, url=wrong)
        done = dicomfs_in(server, filled_store, config, "export", "--to", "orthanc", "--wait", "PAT00001")
        assert done.returncode == 1
        assert f"POST {wrong}/studies: HTTP 404 Not Found" in done.stdout, done.stdout


def test_studies_match_on_the_modalities_of_their_series(tmp_path: Path, filled_store: Path) -> None:
    studies = [json.loads(line) for line in run_cli("ls", "studies", "--json", store=filled_store, check=True).stdout.splitlines()]
    series = [json.loads(line) for line in run_cli("ls", "series", "--json", store=filled_store, check=True).stdout.splitlines()]
    with_ct = {s["parent"] for s in series if s["modality"] == "CT"}
    assert with_ct and len(with_ct) < len(studies)  # the filter below has something to keep and something to drop
    for field in ("modality", "modalities"):
        done = run_cli("ls", "studies", "--json", "--where", f"{field}=CT", store=filled_store, check=True)
        assert {json.loads(line)["id"] for line in done.stdout.splitlines()} == with_ct
    none = run_cli("ls", "studies", "--where", "modality=XX", store=filled_store, check=True)
    assert none.stdout == ""
    wrong = run_cli("ls", "studies", "--where", "modalty=CT", store=filled_store)
    assert wrong.returncode != 0 and "modality" in wrong.stderr


def test_a_taken_port_ends_with_the_clear_line_only(tmp_path: Path, filled_store: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        # the traceback came once in 5 to 20 runs of the first command
        for command in [("webdav", "--bind", f"127.0.0.1:{port}")] * 10 + [
                ("mount", str(mountpoint), "--foreground", "--webdav", f"127.0.0.1:{port}")] * 3:
            done = run_cli(*command, store=filled_store, timeout=60)
            assert done.returncode == 1
            assert done.stderr.splitlines() == [f"dicomfs: cannot listen on 127.0.0.1:{port}: No socket could be created "
                                                f"-- (('127.0.0.1', {port}): [Errno 98] Address already in use)"], done.stderr
