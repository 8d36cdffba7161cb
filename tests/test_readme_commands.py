"""Every `dicomfs ...` command README.md shows works as shown (issue #23: `ls studies --where
modality=CT` failed on the first day).

The commands are read from README.md's ``sh`` code blocks, in order, and run through a shell
against a sample store the test makes, with the README's placeholders (``<id>``, ``JOB``,
``/media/cdrom``) replaced by things of that store; the destination ``pacs2`` is the Orthanc of
tests/orthanc_server.py, so everything runs in its network namespace. A command the README adds
must run here or be named in SKIPPED with the reason.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import dicomfs_command, write_own_instance
from tests.orthanc_server import Orthanc, orthanc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)

SKIPPED = {
    "dicomfs webdav": "a daemon that serves until Ctrl-C, on port 8042, which other tests may hold",
    "dicomfs mount /mnt/pacs --webdav": "a daemon with a bridge on port 8042, which other tests may hold",
    "dicomfs webdav --bind 0.0.0.0:8042": "a daemon listening on every interface of the machine",
    "dicomfs export --to pacs2 /mnt/pacs/by-patients/PAT00001*": "its selector is a path in a running mount",
    "dicomfs send --to hospital-b --wait /mnt/pacs/by-patients/PAT00001*": "a remote dicomfs peer and a running mount",
    'dicomfs pull --from hospital-b --wait "by-patients/P0042 - DOE^JANE"': "a remote dicomfs peer",
}


def readme_commands() -> list[str]:
    """The command lines of README.md's sh blocks that run dicomfs, comments cut, in order."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for body in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in body.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command.startswith("dicomfs "):
                commands.append(command)
    return commands


def test_the_readme_shows_commands_and_skips_only_those_named() -> None:
    commands = readme_commands()
    assert "dicomfs ls studies --where modality=CT" in commands and len(commands) > 20
    assert set(SKIPPED) <= set(commands), "a skipped command is no longer in the README: drop it from SKIPPED"
    assert len(SKIPPED) <= len(commands) // 3


def _sample(folder: Path) -> dict[str, str]:
    """Files to ingest, as the README's examples name them; what each placeholder becomes."""
    cdrom, downloads, scan = folder / "cdrom", folder / "Downloads", folder / "scan"
    # PAT001's study has the UID `dicomfs show` names; PAT002's is the one `dicomfs rm` removes.
    for index in range(3):
        write_own_instance(cdrom / f"IM{index}.dcm", index, patient="PAT001", series="1.2.840.113619.2.55.3.1234.1")
        write_own_instance(scan / f"IM{index}.dcm", index, patient="PAT003", series="1.2.840.113619.2.5.1762.1")
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "ct.zip", "w") as archive:
        for index in range(2):
            archive.write(write_own_instance(folder / "zip" / f"IM{index}.dcm", index, patient="PAT002",
                                             series="1.2.3.4.5.1"), f"CT/IM{index}.dcm")
    (folder / "report.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    return {"/media/cdrom": str(cdrom), "~/Downloads/ct.zip": str(downloads / "ct.zip"), "scan/": str(scan) + "/",
            "report.pdf": str(folder / "report.pdf"), "PAT001": "PAT001"}


def _config(path: Path, server: Orthanc) -> Path:
    path.write_text(f'[destinations.pacs2]\ntype = "stowrs"\nurl = "{server.dicomweb_url}"\n'
                    '[metadata]\nReviewed = 1024\n[attachments]\nreport = { key = 1030, mime = "application/pdf" }\n')
    return path


def _expand(command: str, values: dict[str, str]) -> list[str]:
    """``command`` with the README's placeholders replaced; ``a|b|c`` alternatives each once."""
    alternatives = re.search(r"\b(\w+(?:\|\w+)+)\b", command)
    if alternatives:
        return [expanded for word in alternatives.group(1).split("|")
                for expanded in _expand(command.replace(alternatives.group(1), word, 1), values)]
    for placeholder, value in sorted(values.items(), key=lambda item: -len(item[0])):
        command = command.replace(placeholder, shlex.quote(value) if " " in value else value)
    return [command]


def test_every_readme_command_runs(tmp_path: Path) -> None:
    values = _sample(tmp_path)
    mountpoint = tmp_path / "pacs"
    mountpoint.mkdir()
    values["/mnt/pacs"] = str(mountpoint)
    with orthanc(tmp_path / "orthanc") as server:
        config = _config(tmp_path / "dicomfs.toml", server)
        store = tmp_path / "store"
        # `dicomfs` in the README is the installed command: here this interpreter, on this store.
        prefix = shlex.join([*dicomfs_command(), "--store", str(store), "--config", str(config)])
        env_prefix = f"HOME={shlex.quote(str(tmp_path))} "

        def run(command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            line = env_prefix + re.sub(r"(^|&& |\| )dicomfs ", lambda m: f"{m.group(1)}{prefix} ", command)
            return server.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=120,
                              input=stdin, cwd=tmp_path)

        ran = []
        try:
            for shown in readme_commands():
                if shown in SKIPPED:
                    continue
                if "JOB" in shown and "JOB" not in values:
                    queued = run("dicomfs export --to pacs2 PAT001")
                    values["JOB"] = queued.stdout.split()[1].rstrip(":")
                if "<study id>" in shown:
                    values["<study id>"] = _study_of(run, "PAT002")
                    values["<id>"] = _study_of(run, "PAT001")
                for command in _expand(shown, values):
                    done = run(command, stdin="secret-words\nsecret-words\n")
                    assert done.returncode == 0, f"{shown!r} as {command!r}:\n{done.stdout}\n{done.stderr}"
                    ran.append(shown)
        finally:
            if str(mountpoint) in Path("/proc/mounts").read_text():
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
        assert len(set(ran)) == len(readme_commands()) - len(SKIPPED)
        assert len(server.sop_uids()) == 3  # export --wait sent the study it names


def _study_of(run: object, patient: str) -> str:
    done = run(f"dicomfs ls studies --parent {patient}")  # type: ignore[operator]
    return str(done.stdout.split()[0])
