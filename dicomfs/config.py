"""The configuration: one schema holding every key, its default and the reason for that default.

Where the configuration comes from (the first that applies; files are never merged)::

    1. --config FILE                                    must exist
    2. $DICOMFS_CONFIG                                  must exist
    3. $XDG_CONFIG_HOME/dicomfs/dicomfs.toml            read when present
       (~/.config/dicomfs/dicomfs.toml when XDG_CONFIG_HOME is unset)
    4. /etc/dicomfs/dicomfs.toml                        read when present
    5. nothing: the built-in defaults below

``--store DIR`` then overrides ``storage.folder``. Every effective value remembers where it came
from (``default``, the file's path or ``command line``) so ``dicomfs config`` can show it.

The schema is data, not code: a section of fixed keys is a :class:`_Section` of :class:`_Option`
rows that builds one frozen dataclass; a table of names the user picks (``[metadata]``,
``[attachments]``) is a :class:`_NamedTable`. A new section is one more entry in ``_SCHEMA`` and
one more field of :class:`Config`. Unknown keys and bad values are refused with a
:class:`~dicomfs.errors.ConfigError` naming the file, the dotted key and the reason, because a
misspelt safety switch that is silently ignored is worse than a service that does not start.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicomfs.errors import ConfigError
from dicomfs.passwords import check_hash_format
from dicomfs.store.metadata import CORE_METADATA, USER_KEY_MIN

__all__ = [
    "AttachmentType",
    "Config",
    "IngestConfig",
    "LoadedConfig",
    "LogConfig",
    "MountConfig",
    "Peer",
    "StorageConfig",
    "UploadsConfig",
    "XnatDestination",
    "check_user_name",
    "default_store_folder",
    "load_config",
    "parse_size",
]

DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"
_SYSTEM_FILE = Path("/etc/dicomfs/dicomfs.toml")
_USER_KEY_MAX = 65535  # user metadata and attachment keys are stored in two bytes in the index


@dataclass(frozen=True)
class StorageConfig:
    """Where the store lives, how blobs are compressed, and when old patients are recycled."""

    folder: Path
    compression: str
    compression_level: int
    block_size: int
    max_size: int
    max_patients: int
    overwrite_instances: bool


@dataclass(frozen=True)
class IngestConfig:
    """How incoming files are grouped into commits."""

    batch_files: int
    batch_bytes: int
    batch_delay_ms: int
    threads: int
    workers: int
    max_expanded_size: int


@dataclass(frozen=True)
class MountConfig:
    """What the FUSE mount and the WebDAV bridge let users do."""

    delete_allowed: bool
    refresh_ms: int
    read_ahead_kb: int
    group: str


@dataclass(frozen=True)
class UploadsConfig:
    """How long what is left in uploads/ stays there."""

    rejected_ttl: int
    empty_folder_idle: int


@dataclass(frozen=True)
class WebdavConfig:
    """The WebDAV bridge: where it listens, what it allows, and its TLS certificate."""

    enabled: bool
    bind: str
    upload_allowed: bool
    delete_allowed: bool
    certificate: str
    private_key: str
    block_size: int
    threads: int
    lock_timeout_max: int
    xml_body_max: int
    dead_property_max: int
    dead_properties_per_resource: int
    dead_property_bytes_per_resource: int
    header_timeout: int
    login_failures: int
    login_window: int


@dataclass(frozen=True)
class User:
    """A WebDAV user: a salted password hash and the rights it grants."""

    password_hash: str
    rights: frozenset[str]


RIGHTS = ("read", "upload", "delete", "transfer")
"""read: GET, PROPFIND and the like; upload: writes in uploads/ and metadata; delete: DELETE of stored data;
transfer: the peer transfer endpoints under /transfers/ (a peer may read and store instances)."""


@dataclass(frozen=True)
class JobsConfig:
    """How processes run jobs (exports): leases, polling, retries."""

    run: bool
    lease: int
    poll_ms: int
    retry_delay: int
    retry_max_delay: int
    max_attempts: int


@dataclass(frozen=True)
class Destination:
    """A DICOMweb archive exports go to (``[destinations.NAME]``)."""

    name: str
    type: str
    url: str
    secret: tuple[str, str] | None = dataclass_field(repr=False)
    """The configured secret as (key, value): ``("bearer_token_env", "PACS_TOKEN")``; read only when
    used (``authorization()``), so a command that sends nothing works without it."""
    auth_source: str
    """Where the secret comes from ("bearer_token_env PACS_TOKEN", ...), for ``dicomfs config``."""
    chunked: bool
    concurrency: int
    instances_per_request: int
    transfer_syntaxes: tuple[str, ...]
    tls_verify: bool
    tls_verify_hostname: bool
    tls_ca_file: str
    schedule: tuple[str, ...]
    timeout: int

    def authorization(self) -> str | None:
        """The Authorization header value; ConfigError naming the file or variable (never the
        secret) when it cannot be read."""
        return None if self.secret is None else _authorization(*self.secret)


@dataclass(frozen=True)
class XnatDestination:
    """An XNAT server exports go to as zip batches (``[destinations.NAME]`` with ``type = "xnat"``),
    as CTP's HttpExportService with its ``xnat`` and ``compressor`` elements does."""

    name: str
    type: str
    url: str
    """The XNAT base URL (``https://xnat.example.org``): the session is ``<url>/data/JSESSION``."""
    username: str
    secret: tuple[str, str] | None = dataclass_field(repr=False)
    """The password as (key, value): ``("password_file", "/etc/dicomfs/xnat.secret")``; read when used."""
    auth_source: str
    cookie_name: str
    cache_size: int
    """Instances per zip; 0 sends each instance alone, as a DICOM file, unzipped."""
    structure: str
    """The template of names inside the zip (checked when the configuration is loaded)."""
    default_string: str
    whitespace_replacement: str
    import_url: str
    """Where batches are POSTed; empty means ``<url>/data/services/import?import-handler=DICOM-zip&inbody=true``."""
    send_digest_header: bool
    tls_verify: bool
    tls_verify_hostname: bool
    tls_ca_file: str
    schedule: tuple[str, ...]
    timeout: int

    @property
    def upload_url(self) -> str:
        return self.import_url or self.url.rstrip("/") + "/data/services/import?import-handler=DICOM-zip&inbody=true"

    def password(self) -> str:
        """The password; ConfigError naming the file or variable (never the secret) when unreadable."""
        if self.secret is None:
            raise ConfigError(f"destination {self.name}: no password configured")
        return _secret_text(*self.secret)


@dataclass(frozen=True)
class Peer:
    """Another dicomfs reached over HTTP(S) for fast transfers (``[peers.NAME]``)."""

    name: str
    url: str
    """The peer's bridge (``https://host:8042/``); the transfer endpoints are ``<url>/transfers/``."""
    username: str
    secret: tuple[str, str] | None = dataclass_field(repr=False)
    auth_source: str
    bucket_size: int
    workers: int
    gzip: bool
    lookup_batch: int
    tls_verify: bool
    tls_verify_hostname: bool
    tls_ca_file: str
    schedule: tuple[str, ...]
    timeout: int

    def authorization(self) -> str | None:
        """The Basic Authorization header value, or None without a username; ConfigError when the
        password cannot be read (naming the file or variable, never the secret)."""
        if not self.username:
            return None
        if self.secret is None:
            raise ConfigError(f"peer {self.name}: username {self.username!r} has no password configured")
        password = _secret_text(*self.secret)
        return "Basic " + base64.b64encode(f"{self.username}:{password}".encode("utf-8")).decode("ascii")


@dataclass(frozen=True)
class Route:
    """A routing rule (``[[routes]]``): newly stored instances whose tags match go to a destination
    or a peer (``destination`` names a ``[destinations.NAME]`` or a ``[peers.NAME]``)."""

    destination: str
    match: tuple[tuple[str, str], ...]
    """(DICOM keyword, glob) pairs, all of which must match (case does not matter)."""
    quiet_seconds: int
    """A series is exported once no instance of it arrived for this long: one job per series."""


@dataclass(frozen=True)
class LogConfig:
    """How much is logged and where to."""

    level: str
    file: str


@dataclass(frozen=True)
class AttachmentType:
    """A user attachment: its key in the index and the MIME type it is served with."""

    key: int
    mime: str


@dataclass(frozen=True)
class Config:
    """The effective configuration, one attribute per section."""

    storage: StorageConfig
    ingest: IngestConfig
    mount: MountConfig
    uploads: UploadsConfig
    webdav: WebdavConfig
    jobs: JobsConfig
    log: LogConfig
    metadata: Mapping[str, int]
    attachments: Mapping[str, AttachmentType]
    users: Mapping[str, User]
    destinations: Mapping[str, Destination | XnatDestination]
    peers: Mapping[str, Peer]
    routes: tuple[Route, ...]


# -- values ---------------------------------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_HINT = "a size such as 0, 1048576, 500 MB or 2 GiB"


def parse_size(text: str | int) -> int:
    """A size in bytes from a number of bytes or a number with an SI or IEC unit.

    Sizes are written the way people say them (``"500 MB"``, ``"2 GiB"``, ``"10GB"``) so a limit
    in the configuration can be read at a glance; units are case-insensitive, SI units are powers
    of 1000 and IEC units powers of 1024.

    Parameters
    ----------
    text : str or int
        ``0``, ``1048576``, ``"1048576"``, ``"500 MB"``, ``"1.5 GiB"``...

    Returns
    -------
    int
        The number of bytes.

    Raises
    ------
    ConfigError
        When ``text`` is negative, not a size, has an unknown unit or is not a whole number of bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"must not be negative (got {text})")
        return text
    match = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ConfigError(f"must be {_SIZE_HINT} (got {text!r})")
    # Integer arithmetic, exact: "1.5 GiB" is 1610612736 bytes, "1.0001 KB" no whole number of bytes.
    whole, _, fraction = match[1].partition(".")
    scaled = int(whole + fraction) * _SIZE_UNITS[match[2].lower()]
    divisor: int = 10 ** len(fraction)
    if scaled % divisor:
        raise ConfigError(f"must be a whole number of bytes (got {text!r})")
    return scaled // divisor


def _human_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit.lower()]
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _one_of(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(choices)} (got {value!r})")
        return str(value)
    return parse


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            span = f"of {low} or more" if high is None else f"from {low} to {high}"
            raise ConfigError(f"must be a whole number {span} (got {value!r})")
        return value
    return parse


def _size(low: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise ConfigError(f"must be {_SIZE_HINT} (got {value!r})")
        size = parse_size(value)
        if size < low:
            raise ConfigError(f"must be at least {_human_size(low)} (got {value!r})")
        return size
    return parse


def _power_of_two(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        size = _size(0)(value)
        if not low <= size <= high or size & (size - 1):
            raise ConfigError(f"must be a power of two from {_human_size(low)} to {_human_size(high)} (got {value!r})")
        return size
    return parse


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false (got {value!r})")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"must be a string (got {value!r})")
    return value


def _folder(value: object) -> Path:
    text = _text(value)
    if not text:
        return default_store_folder()
    folder = Path(text).expanduser()
    if not folder.is_absolute():
        # Relative to what? The service's working folder is not the admin's: refuse rather than guess.
        raise ConfigError(f"must be an absolute path, a path starting with ~, or empty (got {text!r})")
    return folder


_NAME = re.compile(r"[A-Za-z0-9_-]+")
_CORE_NAMES = {name.lower(): name for name in CORE_METADATA}
_MIME = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+")


def _user_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError("names may hold only letters, digits, _ and -")
    if name.lower() in _CORE_NAMES:
        # Compared without case: WebDAV clients on Windows and macOS see Origin and origin as one name.
        raise ConfigError(f"clashes with the core metadata name {_CORE_NAMES[name.lower()]}")


def _user_key(value: object) -> int:
    return _integer(USER_KEY_MIN, _USER_KEY_MAX)(value)


def _metadata_entry(name: str, value: object) -> int:
    _user_name(name)
    return _user_key(value)


def _fields(value: object, known: Sequence[str], example: str) -> dict[str, Any]:
    """``value`` as a table of ``known`` fields only; ConfigError naming the first stranger."""
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table: {example}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r} (known: {', '.join(known)})")
    return value


def _attachment_entry(name: str, value: object) -> AttachmentType:
    _user_name(name)
    if not isinstance(value, dict):
        return AttachmentType(_user_key(value), "application/octet-stream")
    _fields(value, ("key", "mime"), "")
    if "key" not in value:
        raise ConfigError("needs a key, e.g. { key = 1025, mime = \"application/pdf\" }")
    mime = _text(value.get("mime", "application/octet-stream"))
    if not _MIME.fullmatch(mime):
        raise ConfigError(f"mime must look like type/subtype (got {mime!r})")
    return AttachmentType(_user_key(value["key"]), mime)


_BIND = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})")


def parse_bind(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8042`` for IPv6) as a (host, port) pair; ConfigError otherwise."""
    match = _BIND.fullmatch(text.strip())
    if not match or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(f"must be HOST:PORT such as 127.0.0.1:8042 or [::1]:8042 (got {text!r})")
    return match["ip6"] or match["host"], int(match["port"])


def _bind(value: object) -> str:
    text = _text(value)
    parse_bind(text)
    return text


def check_user_name(name: str) -> None:
    """ConfigError unless ``name`` can be a WebDAV user: Basic authentication ends the name at the
    first ':', and a name must be typed in a client's login box and a TOML table name."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", name):
        raise ConfigError(f"user name {name!r}: may hold only letters, digits and _ . @ - (1 to 64 of them)")


def _user_entry(name: str, value: object) -> User:
    check_user_name(name)
    value = _fields(value, ("password_hash", "rights"), '{ password_hash = "scrypt$...", rights = ["read"] }')
    if "password" in value or "password_hash" not in value:
        raise ConfigError("needs a password_hash made by `dicomfs passwd NAME`")
    check_hash_format(_text(value["password_hash"]))
    rights = value.get("rights", ["read"])
    if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
        raise ConfigError(f"rights must be a list drawn from {', '.join(RIGHTS)}")
    unknown = [r for r in rights if r not in RIGHTS]
    if unknown:
        raise ConfigError(f"unknown right {unknown[0]!r} (known: {', '.join(RIGHTS)})")
    return User(value["password_hash"], frozenset(rights))


_DESTINATION_FIELDS = (
    "type", "url", "bearer_token", "bearer_token_file", "bearer_token_env", "basic_auth", "basic_auth_file",
    "basic_auth_env", "chunked", "concurrency", "instances_per_request", "transfer_syntaxes", "tls_verify",
    "tls_verify_hostname", "tls_ca_file", "schedule", "timeout",
)


_XNAT_FIELDS = (
    "type", "url", "username", "password", "password_file", "password_env", "cookie_name", "cache_size",
    "structure", "default_string", "whitespace_replacement", "import_url", "send_digest_header", "tls_verify",
    "tls_verify_hostname", "tls_ca_file", "schedule", "timeout",
)
DEFAULT_XNAT_STRUCTURE = "(0010,0020)/(0020,000D)/(0020,000E)/(0008,0018).dcm"
"""Names inside an XNAT zip when no structure is configured: unique, and readable by a person."""


def _target_name(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"{what} names may hold only letters, digits and _ . - (64 at most)")


def _url(value: object) -> str:
    url = _text(value)
    if not re.match(r"https?://[^/\s]+", url):
        raise ConfigError(f"url must be an http:// or https:// address (got {url!r})")
    return url


def _dicomweb_root(url: str) -> str:
    """The DICOMweb root of ``url``: a trailing ``/studies`` (what a PACS shows as its STOW-RS
    address, and what users copy) and trailing slashes dropped, since requests add ``/studies``."""
    parts = urlsplit(url)
    return parts._replace(path=parts.path.rstrip("/").removesuffix("/studies").rstrip("/")).geturl()


def _schedule(value: object) -> tuple[str, ...]:
    schedule = [value] if isinstance(value, str) else value
    if not isinstance(schedule, list) or not all(isinstance(s, str) for s in schedule):
        raise ConfigError('schedule must be a window such as "hour=18-6 dayOfWeek=*" or a list of them')
    from dicomfs.jobs.schedule import parse_schedules  # pure and small; checked here so a typo fails at start

    parse_schedules(schedule)
    return tuple(schedule)


def _link_options(value: dict[str, Any]) -> dict[str, Any]:
    """The keys every destination and peer has alike: how to reach it (TLS, timeout) and when."""
    return {
        "tls_verify": _boolean(value.get("tls_verify", True)),
        "tls_verify_hostname": _boolean(value.get("tls_verify_hostname", True)),
        "tls_ca_file": _text(value.get("tls_ca_file", "")),
        "schedule": _schedule(value.get("schedule", [])),
        "timeout": _integer(1, 3600)(value.get("timeout", 120)),
    }


def _password_secret(value: dict[str, Any]) -> tuple[tuple[str, str] | None, str]:
    """The one password configured (inline, a file or a variable) as (key, value), and its description."""
    given = [key for key in ("password", "password_file", "password_env") if key in value]
    if len(given) > 1:
        raise ConfigError(f"give one password, not {' and '.join(given)}")
    if not given:
        return None, "none"
    key, where = given[0], _text(value[given[0]])
    if key == "password":
        _secret_text(key, where)
        return (key, where), "password (inline)"
    return (key, where), f"{key} {where}"


def _destination_entry(name: str, value: object) -> Destination | XnatDestination:
    _target_name(name, "destination")
    if isinstance(value, dict) and value.get("type") == "xnat":
        return _xnat_entry(name, value)
    value = _fields(value, _DESTINATION_FIELDS, '{ type = "stowrs", url = "https://pacs/dicom-web" }')
    kind = _one_of("stowrs", "xnat")(value.get("type", "stowrs"))
    url = _dicomweb_root(_url(value.get("url", "")))
    secret, source = _destination_secret(value)
    syntaxes = value.get("transfer_syntaxes", [])
    if isinstance(syntaxes, str):
        syntaxes = [s.strip() for s in syntaxes.split(",") if s.strip()]
    if not isinstance(syntaxes, list) or not all(isinstance(s, str) for s in syntaxes):
        raise ConfigError("transfer_syntaxes must be a list of UIDs or keywords, e.g. [\"ExplicitVRLittleEndian\"]")
    return Destination(
        name=name, type=kind, url=url, secret=secret, auth_source=source,
        chunked=_boolean(value.get("chunked", False)), concurrency=_integer(1, 64)(value.get("concurrency", 1)),
        instances_per_request=_integer(1, 10_000)(value.get("instances_per_request", 16)),
        transfer_syntaxes=tuple(syntaxes), **_link_options(value),
    )


def _xnat_entry(name: str, value: dict[str, Any]) -> XnatDestination:
    value = _fields(value, _XNAT_FIELDS, '{ type = "xnat", url = "https://xnat.example.org", username = "..." }')
    secret, source = _password_secret(value)
    username = _text(value.get("username", ""))
    if not username:
        raise ConfigError("an xnat destination needs a username (and a password, password_file or password_env)")
    import_url = _text(value.get("import_url", ""))
    if import_url:
        _url(import_url)
    from dicomfs.jobs.zipnames import check_naming, parse_structure  # pure and small: a bad template fails at start

    structure = _text(value.get("structure", DEFAULT_XNAT_STRUCTURE))
    try:
        parse_structure(structure)
    except ConfigError as error:
        raise ConfigError(f"structure {structure!r}: {error}") from None
    default_string = _text(value.get("default_string", "UNKNOWN"))
    whitespace_replacement = _text(value.get("whitespace_replacement", "_"))
    check_naming(default_string, whitespace_replacement)
    cookie_name = _text(value.get("cookie_name", "JSESSIONID"))
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", cookie_name):
        raise ConfigError(f"cookie_name must be a cookie name such as JSESSIONID (got {cookie_name!r})")
    return XnatDestination(
        name=name, type="xnat", url=_url(value.get("url", "")), username=username, secret=secret, auth_source=source,
        cookie_name=cookie_name, cache_size=_integer(0, 100_000)(value.get("cache_size", 100)),
        structure=structure, default_string=default_string,
        whitespace_replacement=whitespace_replacement, import_url=import_url,
        send_digest_header=_boolean(value.get("send_digest_header", False)), **_link_options(value),
    )


_PEER_FIELDS = (
    "url", "username", "password", "password_file", "password_env", "bucket_size", "workers", "gzip", "lookup_batch",
    "tls_verify", "tls_verify_hostname", "tls_ca_file", "schedule", "timeout",
)


def _bucket_size(value: object) -> int:
    size = _size(64 << 10)(value)
    if size > 64 << 20:  # a receiver holds a bucket in memory; it accepts up to twice this
        raise ConfigError(f"bucket_size must be at most 64 MiB (got {value!r})")
    return size


def _peer_entry(name: str, value: object) -> Peer:
    _target_name(name, "peer")
    value = _fields(value, _PEER_FIELDS, '{ url = "https://peer.example.org:8042/", username = "...", password_file = "..." }')
    secret, source = _password_secret(value)
    return Peer(
        name=name, url=_url(value.get("url", "")), username=_text(value.get("username", "")), secret=secret,
        auth_source=source, bucket_size=_bucket_size(value.get("bucket_size", 4 << 20)),
        workers=_integer(1, 64)(value.get("workers", 4)), gzip=_boolean(value.get("gzip", False)),
        lookup_batch=_integer(1, 100_000)(value.get("lookup_batch", 2000)), **_link_options(value),
    )


def _destination_secret(value: dict[str, Any]) -> tuple[tuple[str, str] | None, str]:
    """The one secret configured (inline, a file or a variable) as (key, value), and its description."""
    given = [key for key in ("bearer_token", "bearer_token_file", "bearer_token_env",
                             "basic_auth", "basic_auth_file", "basic_auth_env") if key in value]
    if len(given) > 1:
        raise ConfigError(f"give one secret, not {' and '.join(given)}")
    if not given:
        return None, "none"
    key = given[0]
    where = _text(value[key])
    if key.endswith(("_file", "_env")):
        return (key, where), f"{key} {where}"
    _authorization(key, where)  # an inline secret can be checked now
    return (key, where), f"{key} (inline)"


def _authorization(key: str, where: str) -> str:
    secret = _secret_text(key, where)
    if key.startswith("basic_auth"):
        if ":" not in secret:
            raise ConfigError(f"{key}: must be user:password")
        return "Basic " + base64.b64encode(secret.encode("utf-8")).decode("ascii")
    return "Bearer " + secret


def _secret_text(key: str, where: str) -> str:
    """A secret given inline, as a ``_file`` or as an ``_env`` variable; errors never show it."""
    if key.endswith("_file"):
        try:
            secret = Path(where).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"{key}: cannot read {where} ({error.strerror})") from None
    elif key.endswith("_env"):
        if where not in os.environ:
            raise ConfigError(f"{key}: the environment variable {where} is not set")
        secret = os.environ[where].strip()
    else:
        secret = where
    if not secret:
        raise ConfigError(f"{key}: the secret is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in secret):
        raise ConfigError(f"{key}: the secret holds control characters (several lines?)")
    return secret


# -- the schema -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One key of a section: its default as written in TOML, how a value is checked, and why."""

    name: str
    default: object
    parse: Callable[[object], object]
    reason: str


@dataclass(frozen=True)
class _Section:
    """A table of fixed keys that builds one frozen dataclass; ``check`` relates keys to each other."""

    name: str
    build: Callable[..., object]
    options: tuple[_Option, ...]
    check: Callable[[Mapping[str, Any]], Iterator[tuple[str, str]]] = lambda values: iter(())


@dataclass(frozen=True)
class _NamedTable:
    """A table of names the user picks, each mapped to an entry that holds a unique integer key."""

    name: str
    parse_entry: Callable[[str, object], object]
    key_of: Callable[[Any], int] | None
    """The entry's integer key, which must be unique; None when entries have none."""
    reason: str


_LEVELS = {"zlib": (1, 9), "zstd": (1, 22)}


def _check_storage(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    codec, level = values["compression"], values["compression_level"]
    if level == 0:
        return
    if codec == "none":
        yield "compression_level", f"must be 0 when storage.compression is none (got {level})"
        return
    low, high = _LEVELS[codec]
    if not low <= level <= high:
        yield "compression_level", f"must be 0 (the codec's default) or from {low} to {high} for {codec} (got {level})"


def _check_webdav(values: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if bool(values["certificate"]) != bool(values["private_key"]):
        missing = "private_key" if values["certificate"] else "certificate"
        yield missing, "HTTPS needs both webdav.certificate and webdav.private_key"


_SCHEMA: tuple[_Section | _NamedTable, ...] = (
    _Section("storage", StorageConfig, (
        _Option("folder", "", _folder,
                "Empty means $STATE_DIRECTORY (set by systemd's StateDirectory=, so the service uses "
                "/var/lib/dicomfs), else $XDG_DATA_HOME/dicomfs, else ~/.local/share/dicomfs."),
        _Option("compression", "none", _one_of("none", "zlib", "zstd"),
                "DICOM pixels often compress only to ~0.8 of their size and compression costs CPU on "
                "every read; opt in when disk matters more than CPU."),
        _Option("compression_level", 0, _integer(0, 22),
                "0 picks dicomfs's default: zlib 1 (zlib 6 measured 5.6x slower, 8 MB/s a core, for 4% "
                "fewer bytes on DICOM pixels), zstd 3; otherwise zlib 1-9, zstd 1-22."),
        _Option("block_size", 131072, _power_of_two(16 << 10, 4 << 20),
                "Compressed blobs are stored in independent blocks of this size (a power of two from "
                "16 KiB to 4 MiB) so a 128 KiB read, the kernel's FUSE read size, decompresses one block."),
        _Option("max_size", 0, _size(0),
                "Recycle the oldest unprotected patient above this total size (0: no limit), as Orthanc's "
                "MaximumStorageSize; off by default because deleting data must be a choice."),
        _Option("max_patients", 0, _integer(0),
                "Recycle the oldest unprotected patient above this many patients (0: no limit), as "
                "Orthanc's MaximumPatientCount; off by default because deleting data must be a choice."),
        _Option("overwrite_instances", False, _boolean,
                "An instance received again with other bytes keeps the stored copy (Orthanc's "
                "OverwriteInstances default), so a stray resend cannot replace a reviewed image."),
    ), _check_storage),
    _Section("ingest", IngestConfig, (
        _Option("batch_files", 128, _integer(1),
                "Files are committed in groups, one sync per batch instead of one per file; a batch "
                "closes at this many files."),
        _Option("batch_bytes", "64 MiB", _size(1),
                "A batch also closes at this many bytes; senders wait while twice this much is queued, "
                "which bounds the memory ingest holds."),
        _Option("batch_delay_ms", 20, _integer(0, 10_000),
                "How long a lone upload waits for company before it commits (up to 10 s: longer looks "
                "like a hang to a client waiting for its answer); files completed in uploads/ also gather "
                "this long before they go to the ingest as one group."),
        _Option("threads", 4, _integer(1),
                "Threads that write (and compress) the blobs of a batch in parallel: even "
                "uncompressed, parallel writes into the page cache are 3x faster than one at a time."),
        _Option("workers", 0, _integer(0),
                "Processes that parse and write the files of a bulk ingest (64 files or more); 0 "
                "means one per CPU: parsing is CPU-bound and one process tops out near 2,500 files/s."),
        _Option("max_expanded_size", "4 GiB", _size(1 << 20),
                "A zip member or a deflated DICOM dataset that expands past this is rejected, counted "
                "as it inflates whatever sizes it declares (a 3 MB zip can hold 3 GiB of zeros). Real "
                "instances reach a few GB (whole-slide levels, long cine); 4 GiB keeps them and is the "
                "most a DICOM element can hold. Memory never depends on it: past 8 MiB, what a file "
                "expands to goes into a nameless file in the store's tmp/, which needs that much room."),
    )),
    _Section("mount", MountConfig, (
        _Option("delete_allowed", True, _boolean,
                "rm in the mount deletes stored data (webdav.delete_allowed does the same for DELETE over "
                "WebDAV). Set false to make the by-* views read-only while uploads stay open."),
        _Option("refresh_ms", 1000, _integer(100, 60_000),
                "How often a front end looks for changes made by other processes (the CLI, the other "
                "front end); what they change shows within this time plus a listing."),
        _Option("read_ahead_kb", 1024, _integer(0, 16_384),
                "KiB the kernel reads ahead through the mount (set on its device when the daemon may): "
                "the kernel's 128 KiB makes every 128 KiB of a large instance a request to the daemon. "
                "0 leaves the kernel's default."),
        _Option("group", "", _text,
                "With --allow-other, the group (a name or a number) whose members may read and upload; "
                "the kernel then checks the modes the mount shows: its owner may do everything, the "
                "group read and write in uploads/, everyone else nothing. Empty means the owner's own "
                "group: patient data is shared only with whom the administrator names."),
    )),
    _Section("uploads", UploadsConfig, (
        _Option("rejected_ttl", 86400, _integer(0),
                "Seconds a file that could not be stored stays in uploads/ with its reason (one day: "
                "time to read why, without uploads/ filling up for ever); 0 keeps them."),
        _Option("empty_folder_idle", 30, _integer(1),
                "Seconds an empty folder in uploads/ stays after the last activity in it: a client "
                "copying a tree may still be about to write into it."),
    )),
    _Section("webdav", WebdavConfig, (
        _Option("enabled", True, _boolean,
                "Whether `dicomfs webdav` and `dicomfs mount --webdav` may serve the store (Orthanc's "
                "WebDavEnabled); false refuses to start the bridge."),
        _Option("bind", "127.0.0.1:8042", _bind,
                "Where the bridge listens when no --bind is given. Anything but loopback needs users "
                "configured (or --allow-anonymous): an open archive of patient data must be a choice."),
        _Option("upload_allowed", True, _boolean,
                "Whether uploads/ accepts files over WebDAV (Orthanc's WebDavUploadAllowed)."),
        _Option("delete_allowed", True, _boolean,
                "Whether DELETE of an instance, series, study or patient folder deletes stored data "
                "(Orthanc's WebDavDeleteAllowed); uploads/ stays deletable either way."),
        _Option("certificate", "", _text,
                "PEM certificate (chain) for HTTPS; empty serves plain HTTP. Windows sends Basic "
                "credentials only over HTTPS."),
        _Option("private_key", "", _text,
                "PEM private key of the certificate; needed exactly when certificate is set."),
        _Option("block_size", 262144, _power_of_two(8 << 10, 4 << 20),
                "Bytes read or written per step of a GET or PUT: wsgidav's 8 KiB default halves "
                "throughput, 64-256 KiB is the measured sweet spot."),
        _Option("threads", 32, _integer(4, 512),
                "Request threads: Windows Explorer opens many connections at once, and a thread "
                "waiting on a slow client holds one."),
        _Option("lock_timeout_max", 3600, _integer(1, 86400),
                "Seconds a LOCK lasts at most, whatever Timeout it asks for (Infinite included): a lock "
                "whose client went away blocks writes under it until it expires. Explorer and Office ask "
                "for an hour and refresh theirs, Finder for ten minutes."),
        _Option("xml_body_max", "1 MiB", _size(4096),
                "Bytes a PROPFIND, PROPPATCH, LOCK or any other request but PUT may carry: their XML is "
                "read whole into memory; clients send a few KiB. Bigger ones get 413."),
        _Option("dead_property_max", "64 KiB", _size(1024),
                "Bytes of one dead property (name and value) a client may keep with PROPPATCH; more "
                "gets 507 in the 207 (RFC 4918 9.2.1). Explorer's and Office's are under 100 bytes."),
        _Option("dead_properties_per_resource", 100, _integer(1, 100_000),
                "Dead properties one file or folder may keep; each is read back with every PROPFIND "
                "that asks for allprop."),
        _Option("dead_property_bytes_per_resource", "256 KiB", _size(1024),
                "Bytes of dead properties one file or folder may keep in all: with the count, bounds "
                "what PROPPATCHes can put in the property store (its map is 1 GiB)."),
        _Option("header_timeout", 15, _integer(1, 600),
                "Seconds a client has to send a whole request head (request line and headers), from "
                "connecting or from its first byte after an answer; then it is closed with a 408. "
                "nginx's client_header_timeout: clients trickling their heads cannot hold connections "
                "for ever (they never hold a request thread)."),
        _Option("login_failures", 5, _integer(1, 1000),
                "Wrong passwords a client address may send within login_window seconds; then it gets "
                "429 Too Many Requests, with no password checked, until the oldest of them is that old "
                "(fail2ban's maxretry). Other addresses are not slowed."),
        _Option("login_window", 60, _integer(1, 86400),
                "Seconds over which login_failures are counted (fail2ban's findtime), which is also the "
                "longest an address waits."),
    ), _check_webdav),
    _Section("jobs", JobsConfig, (
        _Option("run", True, _boolean,
                "Whether the mount and the bridge also run queued jobs (exports); `dicomfs worker` always "
                "does. Several processes share the queue safely: a job is leased to one at a time."),
        _Option("lease", 60, _integer(5, 3600),
                "Seconds a runner holds a job between renewals; a runner that died loses its jobs to "
                "another after this long."),
        _Option("poll_ms", 1000, _integer(50, 60_000),
                "How often an idle runner looks for due jobs (a job queued in the same process starts "
                "at once)."),
        _Option("retry_delay", 2, _integer(0, 3600),
                "Seconds before the first retry after a transient error (destination down, 5xx, "
                "timeout); each further retry waits twice as long."),
        _Option("retry_max_delay", 300, _integer(1, 86_400),
                "The longest wait between two retries."),
        _Option("max_attempts", 10, _integer(1, 1000),
                "Failed attempts in a row, without progress, before a job fails; `dicomfs jobs retry` "
                "starts it again."),
    )),
    _Section("log", LogConfig, (
        _Option("level", "info", _one_of("debug", "info", "warning", "error"),
                "info tells what was stored and rejected without the per-block detail of debug."),
        _Option("file", "", _text,
                "Empty logs to stderr (the journal under systemd), but a background `dicomfs mount` to "
                "STORE/log/mount.log (`--log FILE` overrides both); a file is cut at 10 MiB, 5 kept."),
    )),
    _NamedTable("metadata", _metadata_entry, int,
                "User metadata names mapped to keys from 1024 to 65535 (keys below are dicomfs's own); "
                "each key is used once and no name may clash with a core metadata name."),
    _NamedTable("attachments", _attachment_entry, lambda attachment: attachment.key,
                "Attachment names mapped to a key from 1024 to 65535 or to { key = K, mime = \"type/sub\" } "
                "(mime defaults to application/octet-stream); each key is used once."),
    _NamedTable("users", _user_entry, None,
                "WebDAV users: [users.NAME] with password_hash (from `dicomfs passwd NAME`) and rights "
                "drawn from read, upload, delete, transfer. None configured: the bridge asks for no password and "
                "binds only to loopback unless told --allow-anonymous."),
    _NamedTable("destinations", _destination_entry, None,
                "Archives exports go to: [destinations.NAME] with type = \"stowrs\", url, one secret "
                "(bearer_token or basic_auth, inline or from a _file or an _env variable), chunked, "
                "concurrency, instances_per_request, transfer_syntaxes, tls_verify, tls_verify_hostname, "
                "tls_ca_file, schedule, timeout; or type = \"xnat\" with url, username, a password, cache_size, "
                "structure and the rest of docs/configuration.md."),
    _NamedTable("peers", _peer_entry, None,
                "Other dicomfs servers for fast transfers (`dicomfs send`, `dicomfs pull`): [peers.NAME] with "
                "url (the peer's bridge), username and a password (inline, _file or _env), bucket_size, "
                "workers, gzip, lookup_batch, tls_verify, tls_verify_hostname, tls_ca_file, schedule, timeout."),
)


# -- loading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedConfig:
    """The effective configuration, the file it was read from, and the source of every value."""

    config: Config
    path: Path | None
    sources: Mapping[str, str]

    def describe(self) -> list[tuple[str, object, str]]:
        """Every key as ``(dotted key, effective value, source)``, in schema order.

        Tables of user names are one row each, their value a plain dict, so the rows print as JSON.
        """
        rows: list[tuple[str, object, str]] = []
        for part in _SCHEMA:
            value = getattr(self.config, part.name)
            if isinstance(part, _NamedTable):
                plain = {name: _plain(entry) for name, entry in value.items()}
                rows.append((part.name, plain, self.sources[part.name]))
            else:
                for option in part.options:
                    key = f"{part.name}.{option.name}"
                    rows.append((key, getattr(value, option.name), self.sources[key]))
        routes = [{"destination": r.destination, "match": dict(r.match), "quiet_seconds": r.quiet_seconds}
                  for r in self.config.routes]
        rows.append(("routes", routes, self.sources["routes"]))
        return rows


def _plain(entry: object) -> object:
    """A named-table entry as JSON can show it (a user's hash is shown only as set)."""
    if isinstance(entry, User):
        return {"password_hash": "(set)", "rights": sorted(entry.rights)}
    if isinstance(entry, (Destination, XnatDestination, Peer)):
        plain = dataclasses.asdict(entry)
        del plain["secret"]
        return plain
    if isinstance(entry, AttachmentType):
        return dataclasses.asdict(entry)
    return entry


def default_store_folder() -> Path:
    """The store folder used when ``storage.folder`` is empty.

    Returns
    -------
    Path
        ``$STATE_DIRECTORY`` when set (systemd's ``StateDirectory=dicomfs`` sets it, so the system
        service uses ``/var/lib/dicomfs``), else ``$XDG_DATA_HOME/dicomfs``, else
        ``~/.local/share/dicomfs``.
    """
    state = os.environ.get("STATE_DIRECTORY", "")
    if state:
        # systemd joins several StateDirectory= entries with ':'; ours is the first.
        return Path(state.split(":")[0])
    data_home = os.environ.get("XDG_DATA_HOME", "")
    if data_home and Path(data_home).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(data_home) / "dicomfs"
    return Path.home() / ".local" / "share" / "dicomfs"


def load_config(path: Path | None = None, *, store_folder: Path | None = None) -> LoadedConfig:
    """Find, read and check the configuration.

    Parameters
    ----------
    path : Path, optional
        The file given with ``--config``; without it the lookup order of the module docstring applies.
    store_folder : Path, optional
        The folder given with ``--store``; it overrides ``storage.folder`` with source ``command line``.

    Returns
    -------
    LoadedConfig
        The effective configuration, the file read (if any) and the source of every value.

    Raises
    ------
    ConfigError
        When a named file is missing, a file cannot be read or is not TOML, or a key is unknown or
        its value wrong; the message names the file, the dotted key and the reason.
    """
    found = _find_file(path)
    raw = _read(found) if found is not None else {}
    origin = str(found) if found is not None else DEFAULT_SOURCE
    sources: dict[str, str] = {}
    sections: dict[str, Any] = {}
    known = [part.name for part in _SCHEMA] + ["routes"]
    for name in raw:
        if name not in known:
            raise ConfigError(f"{origin}: {name}: unknown section{_did_you_mean(name, known)}")
    for part in _SCHEMA:
        table = raw.get(part.name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {part.name}: must be a table (got {table!r})")
        source = origin if part.name in raw else DEFAULT_SOURCE
        if isinstance(part, _NamedTable):
            sections[part.name] = _load_named_table(part, table, source)
            sources[part.name] = source
        else:
            sections[part.name] = _load_section(part, table, origin, sources)
    both = sorted(set(sections["destinations"]) & set(sections["peers"]))
    if both:  # routes and jobs name their target by name alone
        raise ConfigError(f"{origin}: peers.{both[0]}: a destination has that name too; give them different names")
    sections["routes"] = _load_routes(raw.get("routes", []), origin, [*sections["destinations"], *sections["peers"]])
    sources["routes"] = origin if "routes" in raw else DEFAULT_SOURCE
    config = Config(**sections)
    if store_folder is not None:
        config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, folder=store_folder))
        sources["storage.folder"] = COMMAND_LINE_SOURCE
    return LoadedConfig(config, found, sources)


def _find_file(explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.exists():
            raise ConfigError(f"{explicit}: no such configuration file (given with --config)")
        return explicit
    from_env = os.environ.get("DICOMFS_CONFIG", "")
    if from_env:
        if not Path(from_env).exists():
            raise ConfigError(f"{from_env}: no such configuration file (named by $DICOMFS_CONFIG)")
        return Path(from_env)
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    if not (config_home and Path(config_home).is_absolute()):  # the XDG spec says to ignore relative paths
        config_home = str(Path.home() / ".config")
    for candidate in (Path(config_home) / "dicomfs" / "dicomfs.toml", _SYSTEM_FILE):
        try:
            if candidate.exists():
                return candidate
        except PermissionError:
            continue  # a home a hardened service may not enter (ProtectHome=): not a file to read
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file ({error.strerror})") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error


def _did_you_mean(name: str, known: list[str]) -> str:
    import difflib  # only for a mistyped name

    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f" (known: {', '.join(known)}{hint})"


def _load_section(section: _Section, table: dict[str, Any], origin: str, sources: dict[str, str]) -> object:
    names = [option.name for option in section.options]
    for name in table:
        if name not in names:
            raise ConfigError(f"{origin}: {section.name}.{name}: unknown key{_did_you_mean(name, names)}")
    values: dict[str, Any] = {}
    for option in section.options:
        key = f"{section.name}.{option.name}"
        source = origin if option.name in table else DEFAULT_SOURCE
        try:
            values[option.name] = option.parse(table.get(option.name, option.default))
        except ConfigError as error:
            raise ConfigError(f"{source}: {key}: {error}") from None
        sources[key] = source
    for name, reason in section.check(values):
        key = f"{section.name}.{name}"
        raise ConfigError(f"{sources[key]}: {key}: {reason}")
    return section.build(**values)


ROUTES_REASON = ("Routing rules, each a [[routes]] table (see \"Routing rules\" below); none by default. In a "
                 "file they go after the tables, as [[routes]] entries.")
"""Why ``routes`` is as it is (an array of tables, outside the schema of fixed sections)."""

_ROUTE_KEYWORDS = {
    "PatientID", "PatientName", "PatientSex", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyDescription", "AccessionNumber", "StudyID", "SeriesInstanceUID", "Modality", "SeriesNumber",
    "SeriesDescription", "SOPClassUID", "TransferSyntaxUID",
}


def _load_routes(entries: object, origin: str, targets: Sequence[str]) -> tuple[Route, ...]:
    """``[[routes]]``: { destination = "pacs2", match = { Modality = "CT", StudyDescription = "*CHEST*" } }."""
    if not isinstance(entries, list):
        raise ConfigError(f"{origin}: routes: must be an array of tables ([[routes]])")
    routes = []
    for number, entry in enumerate(entries, 1):
        where = f"{origin}: routes[{number}]"
        try:
            entry = _fields(entry, ("destination", "match", "quiet_seconds"),
                            '{ destination = "pacs2", match = { Modality = "CT" } }')
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        destination = entry.get("destination")
        if destination not in targets:
            raise ConfigError(f"{where}: destination {destination!r} is not a [destinations.NAME] or a [peers.NAME]")
        match = entry.get("match", {})
        if not isinstance(match, dict) or not all(isinstance(v, str) for v in match.values()):
            raise ConfigError(f'{where}: match must be a table of keyword = "glob", e.g. {{ Modality = "CT" }}')
        for keyword in match:
            if keyword not in _ROUTE_KEYWORDS:
                raise ConfigError(f"{where}: cannot match on {keyword!r}{_did_you_mean(keyword, sorted(_ROUTE_KEYWORDS))}")
        try:
            quiet = _integer(0, 86_400)(entry.get("quiet_seconds", 10))
        except ConfigError as error:
            raise ConfigError(f"{where}: quiet_seconds: {error}") from None
        routes.append(Route(str(destination), tuple(sorted(match.items())), quiet))
    return tuple(routes)


def _load_named_table(table: _NamedTable, entries: dict[str, Any], source: str) -> Mapping[str, object]:
    loaded: dict[str, object] = {}
    owners: dict[int, str] = {}
    for name, value in entries.items():
        key = f"{table.name}.{name}"
        try:
            entry = table.parse_entry(name, value)
        except ConfigError as error:
            raise ConfigError(f"{source}: {key}: {error}") from None
        number = table.key_of(entry) if table.key_of is not None else None
        if number is None:
            pass
        elif number in owners:
            raise ConfigError(f"{source}: {key}: key {number} is already used by {table.name}.{owners[number]}")
        else:
            owners[number] = name
        loaded[name] = entry
    return loaded
