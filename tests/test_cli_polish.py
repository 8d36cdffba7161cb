"""What users expected of the ``dicomfs`` command and did not find (issue #23), each run as a user
runs it: a child process on a real store, and on a real terminal (a pty) where the answer depends
on one."""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import shlex
import subprocess
import time
from pathlib import Path

from tests.conftest import dicomfs_command, run_cli

ISO_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\b")
EPOCH = re.compile(r"\b1\d{9}\.\d+\b")
PYTHON_REPRS = ("None", "True", "False", "[]", "{", "}", "'")


def _json_lines(*args: str, store: Path) -> list[dict[str, object]]:
    done = run_cli(*args, "--json", store=store, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def _first_patient(store: Path) -> dict[str, object]:
    return max(_json_lines("ls", store=store), key=lambda p: int(str(p["studies"])))


def _instances(store: Path) -> int:
    return int(json.loads(run_cli("stats", "--json", store=store, check=True).stdout)["instances"])


def _on_a_terminal(argv: list[str], answer: str | None, *, timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with a pty as stdin, stdout and stderr; type ``answer`` at the first ``?``."""
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "DICOMFS_CONFIG": os.devnull}
    child = subprocess.Popen(argv, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, close_fds=True)
    os.close(child_fd)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main_fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
                if answer is not None and b"?" in seen:
                    os.write(main_fd, answer.encode() + b"\n")
                    answer = None
            elif child.poll() is not None:
                break
        return child.wait(timeout=max(1.0, deadline - time.monotonic())), seen.decode(errors="replace")
    finally:
        os.close(main_fd)
        if child.poll() is None:
            child.kill()
            child.wait()


# -- rm -------------------------------------------------------------------------------------------


def test_rm_dry_run_says_what_would_go_and_deletes_nothing(filled_store: Path) -> None:
    patient = _first_patient(filled_store)
    before = _instances(filled_store)
    done = run_cli("rm", "--dry-run", str(patient["id"]), store=filled_store)
    assert done.returncode == 0, done.stderr
    assert f"would delete patient {patient['id']}" in done.stdout
    assert str(patient["patient_id"]) in done.stdout
    assert (f"{patient['studies']} studies, {patient['series']} series, {patient['instances']} instances"
            in done.stdout)
    assert _instances(filled_store) == before


def test_rm_of_several_studies_without_a_terminal_wants_yes(filled_store: Path) -> None:
    patient = _first_patient(filled_store)
    before = _instances(filled_store)
    refused = run_cli("rm", str(patient["id"]), store=filled_store)
    assert refused.returncode == 1
    assert "--yes" in refused.stderr and f"{patient['studies']} studies" in refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stdout == ""
    assert _instances(filled_store) == before
    done = run_cli("rm", "--yes", str(patient["id"]), store=filled_store)
    assert done.returncode == 0, done.stderr
    assert _instances(filled_store) == before - int(str(patient["instances"]))


def test_rm_of_one_study_needs_no_confirmation(filled_store: Path) -> None:
    study = _json_lines("ls", "studies", store=filled_store)[0]
    done = run_cli("rm", str(study["id"]), store=filled_store)
    assert done.returncode == 0 and f"deleted study {study['id']}" in done.stdout


def test_rm_on_a_terminal_asks_before_deleting_several_studies(filled_store: Path) -> None:
    patient = _first_patient(filled_store)
    before = _instances(filled_store)
    argv = [*dicomfs_command(), "--store", str(filled_store), "rm", str(patient["id"])]
    status, seen = _on_a_terminal(argv, "n")
    assert f"delete {patient['studies']} studies" in seen and "[y/N]" in seen
    assert status == 1 and "nothing deleted" in seen
    assert _instances(filled_store) == before
    status, seen = _on_a_terminal(argv, "y")
    assert status == 0 and f"deleted patient {patient['id']}" in seen
    assert _instances(filled_store) == before - int(str(patient["instances"]))


def test_rm_of_a_protected_patient_says_protection_guards_recycling_only(filled_store: Path) -> None:
    patient = _first_patient(filled_store)
    protected = run_cli("protect", str(patient["id"]), store=filled_store, check=True).stdout
    assert "from recycling" in protected and "rm still deletes" in protected
    dry = run_cli("rm", "--dry-run", str(patient["id"]), store=filled_store, check=True).stdout
    assert "protected" in dry and "recycling only" in dry and "rm deletes it" in dry
    done = run_cli("rm", "--yes", str(patient["id"]), store=filled_store)
    assert done.returncode == 0 and "recycling only" in done.stdout
    assert all(p["id"] != patient["id"] for p in _json_lines("ls", store=filled_store))


# -- jobs ls --------------------------------------------------------------------------------------


def test_jobs_ls_without_jobs_says_so(filled_store: Path) -> None:
    done = run_cli("jobs", "ls", store=filled_store)
    assert done.returncode == 0 and done.stdout == "no jobs\n"
    assert json.loads(run_cli("jobs", "ls", "--json", store=filled_store, check=True).stdout) == []


# -- show -----------------------------------------------------------------------------------------


def test_show_prints_iso_dates_and_plain_words_at_every_level(filled_store: Path) -> None:
    patient = _first_patient(filled_store)
    below = {level: _json_lines("ls", level, "--parent", str(patient["id"]), store=filled_store)[0]
             for level in ("studies", "series", "instances")}
    for record in (patient, *below.values()):
        shown = run_cli("show", str(record["id"]), store=filled_store, check=True).stdout
        assert ISO_TIME.search(shown), shown
        assert not EPOCH.search(shown), shown
        for word in PYTHON_REPRS:
            assert word not in shown, f"{word!r} in:\n{shown}"
        machine = json.loads(run_cli("show", "--json", str(record["id"]), store=filled_store, check=True).stdout)
        assert isinstance(machine.get("created", machine.get("received")), float) and isinstance(machine["metadata"], dict)
    shown = run_cli("show", str(patient["id"]), store=filled_store, check=True).stdout
    birth = str(patient["birth_date"])
    assert f"{birth[:4]}-{birth[4:6]}-{birth[6:]}" in shown
    assert re.search(r"^protected +no$", shown, re.M)
    study = run_cli("show", str(below["studies"]["id"]), store=filled_store, check=True).stdout
    date = str(below["studies"]["date"])
    assert re.search(rf"^date +{date[:4]}-{date[4:6]}-{date[6:]}$", study, re.M)


# -- ls studies -----------------------------------------------------------------------------------


def test_ls_studies_names_each_study_s_patient(filled_store: Path) -> None:
    patients = {p["id"]: p for p in _json_lines("ls", store=filled_store)}
    lines = run_cli("ls", "studies", store=filled_store, check=True).stdout.splitlines()
    studies = _json_lines("ls", "studies", store=filled_store)
    assert len(lines) == len(studies) > 1
    for study in studies:
        line = next(line for line in lines if line.startswith(str(study["id"])))
        owner = patients[study["parent"]]
        assert f"{owner['patient_id']} - {owner['patient_name']}" in line


# -- --help ---------------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser, prog: str = "dicomfs") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{prog} {name}")
    return found


def test_every_argument_of_every_command_has_a_help_text() -> None:
    from dicomfs.cli import _parser

    missing = []
    for prog, parser in _parsers(_parser([])):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{prog}: {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                described = {choice.dest for choice in action._choices_actions if (choice.help or "").strip()}
                missing += [f"{prog} {name}: no description" for name in action.choices if name not in described]
    assert missing == []


def test_a_command_s_help_shows_its_arguments_described(tmp_path: Path) -> None:
    shown = run_cli("rm", "--help", store=tmp_path / "s", check=True).stdout
    assert re.search(r"SELECTOR +a resource id", shown) and "--dry-run" in shown and "--yes" in shown


# -- the init hint --------------------------------------------------------------------------------


def _hinted_command(stderr: str) -> list[str]:
    found = re.search(r"`(dicomfs [^`]*)`", stderr)
    assert found, stderr
    words = shlex.split(found.group(1))
    assert words[-1] == "init"
    return [*dicomfs_command(), *words[1:]]


def test_the_init_hint_repeats_store_and_config(tmp_path: Path) -> None:
    store, config = tmp_path / "a store", tmp_path / "my config.toml"
    config.write_text("[metadata]\nReviewed = 1024\n")
    missing = run_cli("ls", store=store, config=config)
    assert missing.returncode == 1
    hint = _hinted_command(missing.stderr)
    assert shlex.join(["--store", str(store)]) in missing.stderr
    assert shlex.join(["--config", str(config)]) in missing.stderr
    subprocess.run(hint, check=True, capture_output=True, timeout=60, env={**os.environ, "DICOMFS_CONFIG": os.devnull})
    assert run_cli("ls", store=store, config=config).returncode == 0


def test_the_init_hint_without_options_is_plain(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run([*dicomfs_command(), "ls"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DICOMFS_CONFIG": os.devnull, "XDG_DATA_HOME": str(home)})
    assert done.returncode == 1 and "`dicomfs init`" in done.stderr
