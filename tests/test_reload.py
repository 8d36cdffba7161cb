"""SIGHUP reloads what can be reloaded (#23): real ``dicomfs webdav`` and ``dicomfs worker``
processes, their configuration rewritten under them, then signalled."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from dicomfs.passwords import hash_password
from tests.conftest import dicomfs_command, run_cli
from tests.webdav_server import Server, serve

ALICE, BOB = ("alice", "alice-secret"), ("bob", "bob-secret")


def _users(*users: tuple[str, str]) -> str:
    return "".join(f'[users.{name}]\npassword_hash = "{hash_password(password)}"\nrights = ["read"]\n'
                   for name, password in users)


def _log_says(log: Path, text: str, timeout: float = 20) -> str:
    """The log once it holds ``text`` (AssertionError with the log when it never does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never logged:\n{log.read_text()}")


def _hup(server: Server) -> None:
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)


def test_sighup_swaps_the_webdav_users_and_says_what_changed(tmp_path: Path) -> None:
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    run_cli("init", store=store, check=True)
    config.write_text(_users(ALICE))
    with serve(store, config=config) as server:
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=ALICE).status == 207
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=BOB).status == 401
        config.write_text(_users(BOB))
        _hup(server)
        log = _log_says(server.log, "reloaded")
        assert "users" in log.split("reloaded", 1)[1].splitlines()[0]
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=BOB).status == 207
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=ALICE).status == 401
        assert server.process is not None and server.process.poll() is None


def test_a_broken_config_on_sighup_keeps_the_old_one(tmp_path: Path) -> None:
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    run_cli("init", store=store, check=True)
    config.write_text(_users(ALICE))
    with serve(store, config=config) as server:
        config.write_text(_users(BOB) + "[webdav\nbind = \n")
        _hup(server)
        log = _log_says(server.log, "keeping the configuration in force")
        assert "ERROR" in log and str(config) in log
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=ALICE).status == 207
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=BOB).status == 401


def test_a_bind_change_on_sighup_is_said_to_need_a_restart(tmp_path: Path) -> None:
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    run_cli("init", store=store, check=True)
    config.write_text(_users(ALICE))
    with serve(store, config=config) as server:
        config.write_text(_users(ALICE) + '[webdav]\nbind = "127.0.0.1:1"\nthreads = 8\n')
        _hup(server)
        log = _log_says(server.log, "needs a restart")
        line = next(line for line in log.splitlines() if "needs a restart" in line)
        assert "webdav.bind" in line and "webdav.threads" in line
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=ALICE).status == 207


def test_removing_every_user_on_sighup_needs_a_restart(tmp_path: Path) -> None:
    """Without users the bridge asks for no password: that is never switched on under a running server."""
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    run_cli("init", store=store, check=True)
    config.write_text(_users(ALICE))
    with serve(store, config=config) as server:
        config.write_text("")
        _hup(server)
        log = _log_says(server.log, "needs a restart")
        assert "users" in next(line for line in log.splitlines() if "needs a restart" in line)
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}).status == 401
        assert server.request("PROPFIND", "/", headers={"Depth": "0"}, auth=ALICE).status == 207


def test_the_worker_survives_sighup_and_reloads(tmp_path: Path) -> None:
    store, config = tmp_path / "store", tmp_path / "dicomfs.toml"
    run_cli("init", store=store, check=True)
    config.write_text("")
    log = tmp_path / "worker.log"
    with log.open("w") as errors:
        worker = subprocess.Popen([*dicomfs_command(), "--store", str(store), "--config", str(config), "worker"],
                                  stdout=subprocess.PIPE, stderr=errors, text=True,
                                  env={**os.environ, "DICOMFS_CONFIG": str(config)})
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("running jobs")
            config.write_text('[peers.far]\nurl = "https://far.example:8042/"\n')
            worker.send_signal(signal.SIGHUP)
            _log_says(log, "reloaded")
            assert "peers" in log.read_text()
            assert worker.poll() is None
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            assert worker.stdout is not None
            worker.stdout.close()


def test_the_mount_daemon_survives_sighup_and_reloads(tmp_path: Path) -> None:
    store, config, mountpoint = tmp_path / "store", tmp_path / "dicomfs.toml", tmp_path / "m"
    run_cli("init", store=store, check=True)
    config.write_text("")
    mountpoint.mkdir()
    log = tmp_path / "mount.log"
    with log.open("w") as errors:
        daemon = subprocess.Popen([*dicomfs_command(), "--store", str(store), "--config", str(config), "mount",
                                   "--foreground", "--auto-unmount", str(mountpoint)],
                                  stdout=subprocess.DEVNULL, stderr=errors, env={**os.environ, "DICOMFS_CONFIG": str(config)})
        try:
            _log_says(log, "mounted")
            assert "by-dates" in os.listdir(mountpoint)  # answered: the loop, and its signal watcher, run
            config.write_text('[peers.far]\nurl = "https://far.example:8042/"\n[mount]\nrefresh_ms = 2000\n')
            daemon.send_signal(signal.SIGHUP)
            content = _log_says(log, "needs a restart")
            assert "peers changed and applied" in content and "mount.refresh_ms" in content
            assert daemon.poll() is None
            assert "by-dates" in os.listdir(mountpoint)  # still serving
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
