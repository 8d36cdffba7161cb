"""A command that only reads starts without loading what only writing needs.

``dicomfs export`` is timed from its process's start (bench/export.py), and every CLI command pays
for its imports: the parser, the committer, zip support and zstandard cost ~15-20 ms of a ~90 ms
start. These tests hold the line: they fail when a top-level import drags them back in.
"""

from __future__ import annotations

import json
import subprocess
import sys

WRITE_ONLY = ("dicomfs.store.candidates", "dicomfs.store.committer", "dicomfs.store.dicomparse",
              "dicomfs.store.sources", "zipfile", "zstandard", "difflib")


def _modules_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_command_line_and_the_export_job_load_nothing_that_only_writing_needs() -> None:
    loaded = _modules_after("import dicomfs.cli, dicomfs.jobs.service, dicomfs.jobs.storage, dicomfs.jobs.export")
    assert "dicomfs.store.store" in loaded  # the check below means something only if the store is there
    assert sorted(loaded.intersection(WRITE_ONLY)) == []


def test_reading_commands_start_without_ctypes_or_decimal() -> None:
    # ctypes (~4 ms) serves syncfs and madvise, decimal (~2 ms) sizes written as text: neither is
    # needed to start a command, parse its words and read the default configuration.
    loaded = _modules_after("import dicomfs.cli\nfrom dicomfs.config import load_config\nload_config(None)\n"
                            "dicomfs.cli._parser(['ls']).parse_args(['ls'])")
    assert "dicomfs.store.index" in loaded and "dicomfs.store.blobs" in loaded
    assert sorted(loaded.intersection({"ctypes", "decimal"})) == []


def test_the_package_still_offers_its_names_and_ingest_still_finds_its_parts() -> None:
    loaded = _modules_after("from dicomfs.store import Store, WriteSettings, IngestResult, Limits\n"
                            "from dicomfs.store.committer import WriteSettings as W\n"
                            "from dicomfs.store.mutations import Limits as L\n"
                            "assert W is WriteSettings and L is Limits")
    assert {"dicomfs.store.candidates", "dicomfs.store.committer"} <= loaded
