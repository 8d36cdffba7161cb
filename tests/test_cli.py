"""The ``dicomfs`` command, run as a user runs it: a child process on a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomfs.samples import Corpus
from tests.conftest import run_cli

CONFIG = """
[metadata]
Reviewed = 1024

[attachments]
report = { key = 1030, mime = "application/pdf" }
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dicomfs.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def filled(tmp_path: Path, small_corpus: Corpus, config: Path) -> Path:
    store = tmp_path / "store"
    assert run_cli("init", store=store, config=config).returncode == 0
    run_cli("ingest", "--quiet", str(small_corpus.root), store=store, config=config)
    return store


def test_cli_ingest_json_reports_every_file(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    done = run_cli("ingest", "--json", str(small_corpus.root), store=store)
    assert done.returncode == 1  # the corpus has bad files
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == len(small_corpus.files)
    assert set(lines[0]) == {"path", "status", "reason", "size", "patient", "study", "series", "instance"}
    rejected = {Path(str(r["path"])).name for r in lines if r["status"] == "rejected"}
    assert rejected == {f.path.name for f in small_corpus.files if not f.valid}


def test_cli_ingest_exits_0_when_all_is_stored(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    valid_folder = next(f.path.parent for f in small_corpus.files if f.valid)
    done = run_cli("ingest", str(valid_folder), store=store)
    assert done.returncode == 0, done.stderr
    assert "stored" in done.stdout and "files/s" in done.stdout


def test_cli_ingest_summary_lists_rejections_with_reasons(tmp_path: Path, small_corpus: Corpus) -> None:
    store = tmp_path / "store"
    run_cli("init", store=store, check=True)
    done = run_cli("ingest", str(small_corpus.root / "bad"), store=store)
    assert done.returncode == 1
    assert "rejected: " in done.stdout and "empty" in done.stdout and "truncated" in done.stdout


def test_cli_stats_json_has_the_stable_keys(filled: Path, config: Path, small_corpus: Corpus) -> None:
    stats = json.loads(run_cli("stats", "--json", store=filled, config=config).stdout)
    assert {"patients", "studies", "series", "instances", "bytes"} <= set(stats)
    assert stats["patients"] == small_corpus.patients
    assert stats["series"] == small_corpus.series


def test_cli_ls_levels_and_filters(filled: Path, config: Path, small_corpus: Corpus) -> None:
    patients = run_cli("ls", "--json", store=filled, config=config).stdout.splitlines()
    assert len(patients) == small_corpus.patients
    series = [json.loads(line) for line in run_cli("ls", "series", "--json", store=filled, config=config).stdout.splitlines()]
    assert len(series) == small_corpus.series
    modality = series[0]["modality"]
    matching = run_cli("ls", "series", "--where", f"modality={modality}", store=filled, config=config).stdout.splitlines()
    assert len(matching) == sum(1 for s in series if s["modality"] == modality)
    first_patient = json.loads(patients[0])
    below = run_cli("ls", "instances", "--parent", str(first_patient["id"]), store=filled, config=config).stdout.splitlines()
    assert len(below) == first_patient["instances"]


def test_cli_show_rm_and_counts(filled: Path, config: Path) -> None:
    study = json.loads(run_cli("ls", "studies", "--json", store=filled, config=config).stdout.splitlines()[0])
    shown = json.loads(run_cli("show", "--json", study["study_uid"], store=filled, config=config).stdout)
    assert shown["id"] == study["id"] and "LastUpdate" in shown["metadata"]
    before = json.loads(run_cli("stats", "--json", store=filled, config=config).stdout)
    removed = run_cli("rm", study["id"], store=filled, config=config)
    assert removed.returncode == 0 and f"{study['instances']} instances" in removed.stdout
    after = json.loads(run_cli("stats", "--json", store=filled, config=config).stdout)
    assert after["instances"] == before["instances"] - study["instances"]
    assert run_cli("check", store=filled, config=config).returncode == 0


def test_cli_meta_and_attachments(filled: Path, config: Path, tmp_path: Path) -> None:
    study = json.loads(run_cli("ls", "studies", "--json", store=filled, config=config).stdout.splitlines()[0])["id"]
    assert run_cli("meta", "set", study, "Reviewed", "yes", store=filled, config=config).returncode == 0
    assert run_cli("meta", "get", study, "Reviewed", store=filled, config=config).stdout.strip() == "yes"
    refused = run_cli("meta", "set", study, "LastUpdate", "x", store=filled, config=config)
    assert refused.returncode == 1 and "core metadata" in refused.stderr
    assert run_cli("meta", "rm", study, "Reviewed", store=filled, config=config).returncode == 0
    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(b"%PDF" + bytes(5000))
    assert run_cli("attach", "put", study, "report", str(pdf), store=filled, config=config).returncode == 0
    assert "application/pdf" in run_cli("attach", "ls", study, store=filled, config=config).stdout
    out = tmp_path / "back.pdf"
    assert run_cli("attach", "get", study, "report", "-o", str(out), store=filled, config=config).returncode == 0
    assert out.read_bytes() == pdf.read_bytes()
    assert run_cli("attach", "rm", study, "report", store=filled, config=config).returncode == 0
    assert run_cli("check", store=filled, config=config).returncode == 0


def test_cli_protect_and_unprotect(filled: Path, config: Path) -> None:
    patient = json.loads(run_cli("ls", "--json", store=filled, config=config).stdout.splitlines()[0])["id"]
    assert run_cli("protect", patient, store=filled, config=config).returncode == 0
    assert "protected" in run_cli("ls", store=filled, config=config).stdout
    assert run_cli("unprotect", patient, store=filled, config=config).returncode == 0


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    missing = run_cli("stats", store=tmp_path / "nowhere")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and " init`" in missing.stderr
    assert "Traceback" not in missing.stderr
    debug = run_cli("--debug", "stats", store=tmp_path / "nowhere")
    assert "Traceback" in debug.stderr


def test_cli_unknown_selector_is_a_clear_error(filled: Path, config: Path) -> None:
    done = run_cli("show", "1.2.3.4.5.6.7.8.9", store=filled, config=config)
    assert done.returncode == 1 and "nothing in the store matches" in done.stderr


def test_cli_check_exit_status(filled: Path, config: Path) -> None:
    clean = run_cli("check", "--json", store=filled, config=config)
    assert clean.returncode == 0 and json.loads(clean.stdout)["clean"] is True
    blob_dir = filled / "blobs" / "ff"
    (blob_dir / ("f" * 32)).write_bytes(b"orphan")
    dirty = run_cli("check", store=filled, config=config)
    assert dirty.returncode == 1 and "orphan" in dirty.stdout
    assert run_cli("check", "--repair", store=filled, config=config).returncode == 0
    assert run_cli("check", store=filled, config=config).returncode == 0


def test_cli_config_shows_values_and_sources(tmp_path: Path, config: Path) -> None:
    shown = run_cli("config", store=tmp_path / "s", config=config)
    assert shown.returncode == 0
    assert "storage.compression" in shown.stdout and "default" in shown.stdout
    assert "command line" in shown.stdout  # --store
    assert str(config) in shown.stdout


# Each command's words, as a user types them: the parser built for that command alone must read
# them exactly as the parser of every command does.
COMMAND_LINES = [
    ["init"], ["ingest", "--quiet", "a", "b"], ["ls", "series", "--parent", "P1", "--where", "modality=CT", "--json"],
    ["show", "X", "--json"], ["rm", "A", "B"], ["protect", "P"], ["unprotect", "P"], ["meta", "set", "X", "N", "V"],
    ["attach", "get", "X", "report", "-o", "out.pdf"], ["stats", "--json"], ["check", "--no-hash"], ["config"],
    ["mount", "/mnt/pacs", "-f", "--webdav"], ["webdav", "--bind", "127.0.0.1:9"], ["export", "--to", "pacs", "--wait", "P"],
    ["send", "--to", "peer", "P"], ["pull", "--from", "peer", "P"], ["jobs", "show", "J1"], ["worker"],
    ["passwd", "alice", "--rights", "read,upload"], ["umount", "/mnt/pacs"],
]


@pytest.mark.parametrize("words", COMMAND_LINES, ids=lambda words: words[0])
def test_cli_parser_of_one_command_reads_its_words_as_the_full_parser(words: list[str]) -> None:
    from dicomfs.cli import _COMMANDS, _parser, named_command

    argv = ["--store", "s", "--debug", *words]
    assert named_command(argv) == words[0]
    full = _parser(["--store"])  # names no command: every command's parser
    assert vars(_parser(argv).parse_args(argv)) == vars(full.parse_args(argv))
    assert {name for name, *_ in _COMMANDS} == {line[0] for line in COMMAND_LINES}  # every command is covered


def test_cli_help_lists_every_command_and_a_misspelt_one_names_them(tmp_path: Path) -> None:
    from dicomfs.cli import _COMMANDS

    store = tmp_path / "store"
    listed = run_cli("--help", store=store, check=True).stdout
    assert all(f"    {name} " in listed for name, *_ in _COMMANDS)
    wrong = run_cli("--debug", "exprt", store=store)
    assert wrong.returncode == 2 and "invalid choice: 'exprt'" in wrong.stderr and "'umount'" in wrong.stderr
    assert "--to NAME" in run_cli("export", "--help", store=store, check=True).stdout
