"""The configuration schema: defaults, lookup order, refusals, sizes and the source of each value."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dicomfs import config as config_module
from dicomfs.config import AttachmentType, default_store_folder, load_config, parse_size
from dicomfs.errors import ConfigError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A home of our own and no configuration anywhere, whatever the machine running the tests has."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("DICOMFS_CONFIG", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config_module, "_SYSTEM_FILE", tmp_path / "etc" / "dicomfs" / "dicomfs.toml")
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def marked(path: Path, level: int) -> Path:
    """A configuration file recognisable by its compression level."""
    return write(path, f'[storage]\ncompression = "zstd"\ncompression_level = {level}\n')


def test_config_defaults_without_any_file(isolated: Path) -> None:
    loaded = load_config()
    assert loaded.path is None
    storage, ingest, log = loaded.config.storage, loaded.config.ingest, loaded.config.log
    assert storage.folder == isolated / ".local" / "share" / "dicomfs"
    assert (storage.compression, storage.compression_level, storage.block_size) == ("none", 0, 131072)
    assert (storage.max_size, storage.max_patients, storage.overwrite_instances) == (0, 0, False)
    assert (ingest.batch_files, ingest.batch_bytes, ingest.batch_delay_ms, ingest.threads) == (128, 64 << 20, 20, 4)
    assert (log.level, log.file) == ("info", "")
    assert loaded.config.metadata == {} and loaded.config.attachments == {}
    assert {source for _, _, source in loaded.describe()} == {"default"}


def test_config_explicit_path_wins_over_everything(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = marked(tmp_path / "explicit.toml", 1)
    monkeypatch.setenv("DICOMFS_CONFIG", str(marked(tmp_path / "env.toml", 2)))
    marked(isolated / ".config" / "dicomfs" / "dicomfs.toml", 3)
    loaded = load_config(explicit)
    assert loaded.path == explicit
    assert loaded.config.storage.compression_level == 1


def test_config_environment_wins_over_user_and_system_files(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = marked(tmp_path / "env.toml", 2)
    monkeypatch.setenv("DICOMFS_CONFIG", str(from_env))
    marked(isolated / ".config" / "dicomfs" / "dicomfs.toml", 3)
    marked(config_module._SYSTEM_FILE, 4)
    loaded = load_config()
    assert loaded.path == from_env
    assert loaded.config.storage.compression_level == 2


def test_config_user_file_wins_over_system_file(isolated: Path) -> None:
    user = marked(isolated / ".config" / "dicomfs" / "dicomfs.toml", 3)
    marked(config_module._SYSTEM_FILE, 4)
    loaded = load_config()
    assert loaded.path == user
    assert loaded.config.storage.compression_level == 3


def test_config_xdg_config_home_replaces_dot_config(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marked(isolated / ".config" / "dicomfs" / "dicomfs.toml", 3)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    xdg = marked(tmp_path / "xdg" / "dicomfs" / "dicomfs.toml", 5)
    assert load_config().path == xdg


def test_config_system_file_is_read_last() -> None:
    system = marked(config_module._SYSTEM_FILE, 4)
    loaded = load_config()
    assert loaded.path == system
    assert loaded.config.storage.compression_level == 4


def test_config_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFS_CONFIG", "")
    assert load_config().path is None


def test_config_dev_null_means_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFS_CONFIG", os.devnull)
    loaded = load_config()
    assert loaded.path == Path(os.devnull)
    assert loaded.config.storage.compression == "none"


def test_config_named_files_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: no such configuration file \(given with --config\)$"):
        load_config(missing)
    monkeypatch.setenv("DICOMFS_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=r"no such configuration file \(named by \$DICOMFS_CONFIG\)$"):
        load_config()


def test_config_unreadable_or_invalid_files_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": cannot read the configuration file \(Is a directory\)$"):
        load_config(tmp_path)
    broken = write(tmp_path / "broken.toml", "[storage\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(broken))}: not valid TOML: "):
        load_config(broken)


def test_config_default_store_folder_order(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_store_folder() == isolated / ".local" / "share" / "dicomfs"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")
    assert default_store_folder() == isolated / ".local" / "share" / "dicomfs"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_store_folder() == tmp_path / "data" / "dicomfs"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/dicomfs:/var/lib/other")
    assert default_store_folder() == Path("/var/lib/dicomfs")
    assert load_config().config.storage.folder == Path("/var/lib/dicomfs")


@pytest.mark.parametrize(("text", "key", "hint"), [
    ("[storage]\ncompresion = 'zstd'\n", "storage.compresion", "did you mean compression?"),
    ("[storage]\nfolder = ''\nspeed = 1\n", "storage.speed", "known: folder, compression,"),
    ("[storrage]\n", "storrage", "unknown section (known: storage, ingest, mount, uploads, webdav, jobs, log, metadata, attachments, users, destinations, peers, routes; did you mean storage?)"),
    ("verbose = true\n", "verbose", "unknown section"),
])
def test_config_unknown_key_refused_with_file_and_key(tmp_path: Path, text: str, key: str, hint: str) -> None:
    path = write(tmp_path / "dicomfs.toml", text)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{path}: {key}: unknown ")
    assert hint in str(refused.value)


def test_config_bad_value_message_names_file_key_and_reason(tmp_path: Path) -> None:
    path = write(tmp_path / "dicomfs.toml", "[storage]\ncompression = 'lzma'\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value) == f"{path}: storage.compression: must be one of none, zlib, zstd (got 'lzma')"


@pytest.mark.parametrize(("text", "key", "reason"), [
    ("[storage]\nfolder = 'relative/store'", "storage.folder", "must be an absolute path"),
    ("[storage]\nfolder = 5", "storage.folder", "must be a string (got 5)"),
    ("[storage]\ncompression = 5", "storage.compression", "must be one of none, zlib, zstd (got 5)"),
    ("[storage]\ncompression_level = -1", "storage.compression_level", "must be a whole number from 0 to 22 (got -1)"),
    ("[storage]\ncompression_level = 3", "storage.compression_level", "must be 0 when storage.compression is none (got 3)"),
    ("[storage]\ncompression = 'zlib'\ncompression_level = 10", "storage.compression_level", "from 1 to 9 for zlib (got 10)"),
    ("[storage]\ncompression = 'zstd'\ncompression_level = 23", "storage.compression_level", "from 0 to 22 (got 23)"),
    ("[storage]\ncompression = 'zstd'\ncompression_level = 2.5", "storage.compression_level", "whole number"),
    ("[storage]\nblock_size = 100000", "storage.block_size", "must be a power of two from 16 KiB to 4 MiB (got 100000)"),
    ("[storage]\nblock_size = 8192", "storage.block_size", "power of two from 16 KiB"),
    ("[storage]\nblock_size = '8 MiB'", "storage.block_size", "(got '8 MiB')"),
    ("[storage]\nblock_size = '128 kB'", "storage.block_size", "(got '128 kB')"),
    ("[storage]\nmax_size = -1", "storage.max_size", "must not be negative (got -1)"),
    ("[storage]\nmax_size = 'lots'", "storage.max_size", "must be a size such as 0, 1048576, 500 MB or 2 GiB (got 'lots')"),
    ("[storage]\nmax_size = true", "storage.max_size", "must be a size"),
    ("[storage]\nmax_patients = -1", "storage.max_patients", "must be a whole number of 0 or more (got -1)"),
    ("[storage]\nmax_patients = '10'", "storage.max_patients", "whole number"),
    ("[storage]\noverwrite_instances = 'yes'", "storage.overwrite_instances", "must be true or false (got 'yes')"),
    ("[ingest]\nbatch_files = 0", "ingest.batch_files", "of 1 or more (got 0)"),
    ("[ingest]\nbatch_bytes = 0", "ingest.batch_bytes", "must be at least 1 B (got 0)"),
    ("[ingest]\nbatch_bytes = '1.5 B'", "ingest.batch_bytes", "must be a whole number of bytes"),
    ("[ingest]\nbatch_delay_ms = 20000", "ingest.batch_delay_ms", "from 0 to 10000 (got 20000)"),
    ("[ingest]\nthreads = 0", "ingest.threads", "of 1 or more (got 0)"),
    ("[log]\nlevel = 'verbose'", "log.level", "must be one of debug, info, warning, error (got 'verbose')"),
    ("[log]\nfile = false", "log.file", "must be a string (got False)"),
    ("storage = 5", "storage", "must be a table (got 5)"),
    ("[metadata]\nReviewed = 1023", "metadata.Reviewed", "from 1024 to 65535 (got 1023)"),
    ("[metadata]\nReviewed = 65536", "metadata.Reviewed", "from 1024 to 65535 (got 65536)"),
    ("[metadata]\nReviewed = '1024'", "metadata.Reviewed", "whole number"),
    ("[metadata]\nReviewed = true", "metadata.Reviewed", "whole number"),
    ("[metadata]\n'Reviewed by' = 1024", "metadata.Reviewed by", "names may hold only letters, digits, _ and -"),
    ("[metadata]\nOrigin = 1024", "metadata.Origin", "clashes with the core metadata name Origin"),
    ("[metadata]\nreceptiondate = 1024", "metadata.receptiondate", "clashes with the core metadata name ReceptionDate"),
    ("[metadata]\nA = 1024\nB = 1024", "metadata.B", "key 1024 is already used by metadata.A"),
    ("[attachments]\nreport = 99", "attachments.report", "from 1024 to 65535 (got 99)"),
    ("[attachments]\nreport = { mime = 'application/pdf' }", "attachments.report", "needs a key"),
    ("[attachments]\nreport = { key = 1025, colour = 'red' }", "attachments.report", "unknown field 'colour' (known: key, mime)"),
    ("[attachments]\nreport = { key = 1025, mime = 'pdf' }", "attachments.report", "mime must look like type/subtype (got 'pdf')"),
    ("[attachments]\nreport = { key = 1025, mime = 7 }", "attachments.report", "must be a string (got 7)"),
    ("[attachments]\nTransferSyntax = 1025", "attachments.TransferSyntax", "clashes with the core metadata name"),
    ("[attachments]\na = 1025\nb = { key = 1025 }", "attachments.b", "key 1025 is already used by attachments.a"),
])
def test_config_bad_value_refused(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path / "dicomfs.toml", text + "\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert reason in message


@pytest.mark.parametrize(("text", "size"), [
    (0, 0), (1048576, 1048576), ("0", 0), ("1048576", 1048576), ("500 MB", 500_000_000),
    ("2 GiB", 2 << 30), ("10GB", 10_000_000_000), ("64mib", 64 << 20), (" 1.5 KiB ", 1536), ("3 kB", 3000),
    ("7 B", 7), ("1 TiB", 1 << 40), ("1.5 GiB", 1_610_612_736), ("0.25 KB", 250), ("2.50 MB", 2_500_000),
])
def test_config_sizes_parsed(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [-1, "-1", "", "MB", "5 XB", "1.1 B", "1.0001 KB", "0.5", "2 GiB extra", "1e6"])
def test_config_bad_sizes_refused(text: str | int) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_config_sizes_with_units_in_a_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dicomfs.toml", "[storage]\nmax_size = '2 GiB'\nblock_size = '1 MiB'\n[ingest]\nbatch_bytes = '10MB'\n")
    config = load_config(path).config
    assert (config.storage.max_size, config.storage.block_size, config.ingest.batch_bytes) == (2 << 30, 1 << 20, 10_000_000)


def test_config_compression_levels_accepted_within_codec_range(tmp_path: Path) -> None:
    for codec, level in (("zlib", 9), ("zlib", 1), ("zstd", 22), ("zstd", 0), ("none", 0)):
        path = write(tmp_path / "dicomfs.toml", f"[storage]\ncompression = '{codec}'\ncompression_level = {level}\n")
        storage = load_config(path).config.storage
        assert (storage.compression, storage.compression_level) == (codec, level)


def test_config_describe_reports_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "dicomfs.toml", "[storage]\ncompression = 'zstd'\nmax_size = '1 GB'\n[metadata]\nReviewed = 1024\n")
    rows = load_config(path).describe()
    assert [key for key, _, _ in rows] == [
        "storage.folder", "storage.compression", "storage.compression_level", "storage.block_size", "storage.max_size",
        "storage.max_patients", "storage.overwrite_instances", "ingest.batch_files", "ingest.batch_bytes",
        "ingest.batch_delay_ms", "ingest.threads", "ingest.workers", "ingest.max_expanded_size", "mount.delete_allowed",
        "mount.refresh_ms", "mount.read_ahead_kb", "mount.group",
        "uploads.rejected_ttl", "uploads.empty_folder_idle", "webdav.enabled", "webdav.bind", "webdav.upload_allowed",
        "webdav.delete_allowed", "webdav.certificate", "webdav.private_key", "webdav.block_size", "webdav.threads",
        "webdav.lock_timeout_max", "webdav.xml_body_max", "webdav.dead_property_max", "webdav.dead_properties_per_resource",
        "webdav.dead_property_bytes_per_resource",
        "webdav.header_timeout", "webdav.login_failures", "webdav.login_window",
        "jobs.run", "jobs.lease", "jobs.poll_ms", "jobs.retry_delay", "jobs.retry_max_delay", "jobs.max_attempts",
        "log.level", "log.file", "metadata", "attachments", "users", "destinations", "peers", "routes",
    ]
    by_key = {key: (value, source) for key, value, source in rows}
    assert by_key["storage.compression"] == ("zstd", str(path))
    assert by_key["storage.max_size"] == (1_000_000_000, str(path))
    assert by_key["storage.block_size"] == (131072, "default")
    assert by_key["metadata"] == ({"Reviewed": 1024}, str(path))
    assert by_key["attachments"] == ({}, "default")


def test_config_store_option_overrides_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "dicomfs.toml", "[storage]\nfolder = '~/archive'\n")
    from_file = load_config(path)
    assert from_file.config.storage.folder == Path.home() / "archive"
    assert ("storage.folder", Path.home() / "archive", str(path)) in from_file.describe()
    overridden = load_config(path, store_folder=tmp_path / "elsewhere")
    assert overridden.config.storage.folder == tmp_path / "elsewhere"
    assert ("storage.folder", tmp_path / "elsewhere", "command line") in overridden.describe()
    assert load_config(store_folder=tmp_path / "s").describe()[0] == ("storage.folder", tmp_path / "s", "command line")


def test_config_metadata_and_attachments_loaded(tmp_path: Path) -> None:
    path = write(tmp_path / "dicomfs.toml", (
        "[metadata]\nReviewed = 1024\nReviewed-by_2 = 65535\n"
        "[attachments]\nreport = { key = 1024, mime = 'application/pdf' }\nthumbnail = 1031\n"
    ))
    loaded = load_config(path)
    assert loaded.config.metadata == {"Reviewed": 1024, "Reviewed-by_2": 65535}
    assert loaded.config.attachments == {
        "report": AttachmentType(1024, "application/pdf"),
        "thumbnail": AttachmentType(1031, "application/octet-stream"),
    }
    rows = {key: value for key, value, _ in loaded.describe()}
    assert rows["attachments"] == {"report": {"key": 1024, "mime": "application/pdf"},
                                   "thumbnail": {"key": 1031, "mime": "application/octet-stream"}}


def test_config_docs_example_matches_schema(tmp_path: Path) -> None:
    """docs/configuration.md sets every key to its default, each under its reason from the schema."""
    block = re.search(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert block is not None
    path = write(tmp_path / "dicomfs.toml", block[1])
    from_docs, defaults = load_config(path).describe(), load_config().describe()
    assert [(key, value) for key, value, _ in from_docs] == [(key, value) for key, value, _ in defaults]
    assert {source for _, _, source in from_docs} == {str(path)}
    comments: list[str] = []
    documented: dict[str, str] = {}
    section = ""
    for line in block[1].splitlines():
        if line.startswith("#"):
            comments.append(line.lstrip("# "))
            continue
        if line.startswith("["):
            section = line.strip("[]")
            if comments:
                documented[section] = " ".join(comments)
        elif "=" in line:
            documented[f"{section}.{line.split('=')[0].strip()}".lstrip(".")] = " ".join(comments)
        comments = []
    reasons = {"routes": config_module.ROUTES_REASON}
    for part in config_module._SCHEMA:
        if isinstance(part, config_module._NamedTable):
            reasons[part.name] = part.reason
        else:
            reasons.update({f"{part.name}.{option.name}": option.reason for option in part.options})
    assert documented == reasons
