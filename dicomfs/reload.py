"""What a new configuration changes, and which of it a running process can take (SIGHUP, #23).

The sections a running process reads afresh on every use are applied live: the WebDAV users
(checked on every request), the destinations, peers and routes (with their schedules: read by the
job runner for each job). Everything else shapes something built once at start (the store's
files and settings, the bridge's socket and threads, the mount's options, the log handler), so a
change to it is named as needing a restart rather than half-applied.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomfs.config import Config, LoadedConfig, load_config
from dicomfs.errors import DicomfsError

__all__ = ["LIVE_SECTIONS", "Changes", "compare", "reload_config"]

LIVE_SECTIONS = ("users", "destinations", "peers", "routes")
"""The sections of :class:`Config` a running process applies when told to reload."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Changes:
    """What differs between two configurations: sections applied live, dotted keys needing a restart."""

    live: tuple[str, ...]
    restart: tuple[str, ...]


def compare(old: Config, new: Config) -> Changes:
    """The sections of ``new`` that differ from ``old`` and can be applied live, and the dotted keys
    (``webdav.bind``; a whole table such as ``metadata`` by its name) that need a restart.

    Removing every user is a restart, not a live change: with no users the bridge serves without a
    password, and it checked at start that it listens only where that is allowed.
    """
    live: list[str] = []
    restart: list[str] = []
    for field in dataclasses.fields(Config):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if field.name in LIVE_SECTIONS and not (field.name == "users" and before and not after):
            live.append(field.name)
        elif dataclasses.is_dataclass(before):
            restart += [f"{field.name}.{key.name}" for key in dataclasses.fields(before)
                        if getattr(before, key.name) != getattr(after, key.name)]
        else:
            restart.append(field.name)
    return Changes(tuple(live), tuple(restart))


def reload_config(current: LoadedConfig, store_folder: Path | None,
                  apply: Callable[[Config], None]) -> LoadedConfig:
    """Read the configuration again (from the file ``current`` came from, ``--store`` still
    overriding), pass it to ``apply`` when a live section changed, and log one line of what was
    applied and one of what needs a restart. Returns the configuration now in force: ``current``
    itself when the file no longer loads (logged as an error; a reload never stops a server)."""
    try:
        loaded = load_config(current.path, store_folder=store_folder)
    except (DicomfsError, OSError) as error:
        _log.error("reload: %s; keeping the configuration in force", error)
        return current
    changes = compare(current.config, loaded.config)
    if changes.live:
        apply(loaded.config)
        _log.info("reloaded %s: %s changed and applied", loaded.path or "the defaults", ", ".join(changes.live))
    if changes.restart:
        _log.warning("reload: %s changed in %s but needs a restart to apply", ", ".join(changes.restart),
                     loaded.path or "the defaults")
    if not changes.live and not changes.restart:
        _log.info("reloaded %s: nothing changed", loaded.path or "the defaults")
    # What needs a restart is not in force: keep the old values so the next reload names them again.
    return LoadedConfig(dataclasses.replace(current.config, **{name: getattr(loaded.config, name)
                                                               for name in changes.live}),
                        current.path, current.sources)
