"""scripts/install and the systemd units, as far as a machine without systemd as PID 1 allows.

The install is real: a virtual environment with dicomfs pip-installed (not editable) from this
checkout, its command linked, the units written, all under a temporary prefix, done once per
session (~35 s: pip builds dicomfs, and pyfuse3 comes from pip's wheel cache). The installed
command is then run from / with a clean environment, so nothing of the checkout can be imported;
each unit's ExecStartPre/ExecStart/ExecStop lines run as systemd would run them (its
$STATE_DIRECTORY, a $NOTIFY_SOCKET to say READY=1, SIGTERM to stop). What needs systemd itself
(daemon-reload, enable, the sandbox applied) cannot run here; ``systemd-analyze verify`` and
``security --offline`` check the units instead.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomfs import __version__
from dicomfs.config import load_config

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("dicomfs-mount@.service", "dicomfs-webdav.service", "dicomfs-worker.service")
pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Installed:
    folder: Path
    prefix: Path
    bindir: Path
    unitdir: Path
    mountpoint: Path
    output: str

    @property
    def command(self) -> Path:
        return self.bindir / "dicomfs"


def clean_env(folder: Path, **extra: str) -> dict[str, str]:
    """What systemd gives a service: a plain PATH, no PYTHONPATH, no virtual environment."""
    home = folder / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8", **extra}


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    folder = tmp_path_factory.mktemp("install")
    paths = {"PREFIX": folder / "opt", "BINDIR": folder / "bin", "UNITDIR": folder / "units",
             "DOCDIR": folder / "doc", "MOUNTPOINT": folder / "mnt"}
    env = clean_env(folder, **{key: str(value) for key, value in paths.items()})
    done = subprocess.run([str(ROOT / "scripts" / "install"), "--no-apt"], cwd="/", env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return Installed(folder, paths["PREFIX"], paths["BINDIR"], paths["UNITDIR"], paths["MOUNTPOINT"], done.stderr)


def test_install_says_what_it_skipped_without_systemd(installed: Installed) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd runs here: the script enabled the units instead")
    assert "skipped systemctl daemon-reload" in installed.output
    assert not any(part in installed.output for part in ("/etc/systemd", "/opt/dicomfs", "/usr/local/bin"))


def test_install_runs_the_command_without_the_checkout(installed: Installed) -> None:
    env = clean_env(installed.folder, DICOMFS_CONFIG=os.devnull)
    version = subprocess.run([str(installed.command), "--version"], cwd="/", env=env, capture_output=True, text=True,
                             timeout=60, check=True)
    assert version.stdout.strip() == f"dicomfs {__version__}"
    store = installed.folder / "store"
    init = subprocess.run([str(installed.command), "--store", str(store), "init"], cwd="/", env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert str(store) in init.stdout and (store / "index").exists()
    # Every package of the checkout is in the venv, and is imported from there.
    packages = sorted(".".join(p.parent.relative_to(ROOT).parts) for name in ("dicomfs", "bridge")
                      for p in (ROOT / name).rglob("__init__.py"))
    code = f"import importlib\nfor name in {packages!r}:\n    print(importlib.import_module(name).__file__)"
    found = subprocess.run([str(installed.prefix / "bin" / "python"), "-c", code], cwd="/", env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    site = installed.prefix / "lib"
    assert len(found.stdout.splitlines()) == len(packages) and "dicomfs.transfers" in packages
    assert all(Path(line).is_relative_to(site) for line in found.stdout.splitlines()), found.stdout


def _instance(installed: Installed) -> Path:
    """The mount unit as the instance for the installed mountpoint (%f resolved by its name)."""
    escaped = subprocess.run(["systemd-escape", "--path", str(installed.mountpoint)], capture_output=True, text=True,
                             check=True).stdout.strip()
    instance = installed.folder / "instances" / f"dicomfs-mount@{escaped}.service"
    instance.parent.mkdir(exist_ok=True)
    shutil.copyfile(installed.unitdir / "dicomfs-mount@.service", instance)
    return instance


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian's systemd package)")
def test_installed_units_verify(installed: Installed) -> None:
    for unit in [_instance(installed), installed.unitdir / "dicomfs-webdav.service", installed.unitdir / "dicomfs-worker.service"]:
        assert f"{installed.bindir}/dicomfs" in unit.read_text()
        done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr == "", f"{unit.name}: {done.stderr}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian's systemd package)")
def test_units_are_hardened_as_far_as_fuse_allows(tmp_path: Path) -> None:
    # 5.5 for the mount before #23; the others were 2.0 already (everything left needs a mount
    # namespace, another user or no network: not for a FUSE mount, a shared store, an exporter).
    limits = {"dicomfs-mount@mnt-pacs.service": 4.4, "dicomfs-webdav.service": 2.0, "dicomfs-worker.service": 2.0}
    for name, limit in limits.items():
        shutil.copyfile(ROOT / "systemd" / re.sub(r"@.*\.", "@.", name), tmp_path / name)
        done = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        score = float(re.findall(r"Overall exposure level for .*: (\d+\.\d+)", done.stdout)[0])
        assert score <= limit, f"{name}: {score}"


def test_the_mount_unit_lets_the_jobs_it_runs_reach_the_network() -> None:
    assert load_config(None).config.jobs.run  # the mount runs export jobs unless told otherwise
    families = _unit_lines(ROOT / "systemd" / "dicomfs-mount@.service")["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)


def _unit_lines(unit: Path, instance: str = "") -> dict[str, list[str]]:
    """``Key=value`` lines of ``unit``, ``%f`` replaced by ``instance``."""
    lines: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            lines.setdefault(key, []).append(value.replace("%f", instance))
    return lines


def _notify_socket(folder: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(0.5)
    return sock


def _wait_ready(sock: socket.socket, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "READY=1" in sock.recv(4096).decode().split("\n"):
                return
        except TimeoutError:
            continue
    process.kill()
    raise AssertionError(f"no READY=1 (exit status {process.wait()}): {process.communicate()[1]}")


def _start_unit(installed: Installed, unit: Path, folder: Path, instance: str = "") -> tuple[subprocess.Popen[str], dict[str, list[str]], dict[str, str]]:
    """ExecStartPre then ExecStart of ``unit`` with what systemd would give them; the service once
    it said READY=1, its lines, its environment."""
    lines = _unit_lines(unit, instance)
    state = folder / "state"
    state.mkdir()
    port = _free_port()
    config = folder / "dicomfs.toml"
    config.write_text(f'[webdav]\nbind = "127.0.0.1:{port}"\n')
    env = clean_env(folder, STATE_DIRECTORY=str(state), DICOMFS_CONFIG=str(config), NOTIFY_SOCKET=str(folder / "notify"),
                    PORT=str(port))
    for line in lines.get("ExecStartPre", []):
        subprocess.run(shlex.split(line), cwd="/", env=env, check=True, capture_output=True, timeout=60)
    notify = _notify_socket(folder)
    try:
        process = subprocess.Popen(shlex.split(lines["ExecStart"][0]), cwd="/", env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        _wait_ready(notify, process)
    finally:
        notify.close()
    return process, lines, env


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)  # systemd's stop without ExecStop=
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    assert "Traceback" not in errors, errors


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_bridge_unit_serves_on_loopback(installed: Installed, tmp_path: Path) -> None:
    process, _, env = _start_unit(installed, installed.unitdir / "dicomfs-webdav.service", tmp_path)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(env["PORT"]), timeout=30)
        connection.request("PROPFIND", "/", headers={"Depth": "1"})
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        assert answer.status == 207 and b"by-patients" in body
    finally:
        _stop(process)
    assert (tmp_path / "state" / "index").exists()  # ExecStartPre made the store where systemd says


def test_the_worker_unit_starts_and_stops(installed: Installed, tmp_path: Path) -> None:
    process, _, _ = _start_unit(installed, installed.unitdir / "dicomfs-worker.service", tmp_path)
    _stop(process)


def test_the_mount_unit_mounts_and_its_stop_unmounts(installed: Installed, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()  # ConditionPathIsDirectory=%f
    process, lines, env = _start_unit(installed, installed.unitdir / "dicomfs-mount@.service", tmp_path, str(mountpoint))
    try:
        assert str(mountpoint) in Path("/proc/mounts").read_text()
        assert "by-patients" in os.listdir(mountpoint)
        subprocess.run(shlex.split(lines["ExecStop"][0]), cwd="/", env=env, check=True, capture_output=True, timeout=60)
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if str(mountpoint) in Path("/proc/mounts").read_text():
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert str(mountpoint) not in Path("/proc/mounts").read_text()


if sys.platform != "linux":  # pragma: no cover - systemd and FUSE are Linux's
    pytest.skip("Linux only", allow_module_level=True)
