"""Who may do what over WebDAV: Basic authentication against the configured users' salted hashes,
and the right each request needs.

Users come from ``[users.NAME]`` (``password_hash`` made by ``dicomfs passwd``, ``rights`` drawn
from read / upload / delete). With no users configured the bridge asks for nothing and grants
every right; ``bridge.server`` then refuses to listen anywhere but loopback unless told to.

A Basic client sends its password with every request and a scrypt check costs ~60 ms, which would
cap uploads near 15 files/s; a successful check is remembered for a few minutes as a keyed digest
of (user, password), never the password itself, so a changed password or a wrong one is still
checked in full.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time
from typing import Mapping

from wsgidav.dc.base_dc import BaseDomainController

from dicomfs.config import RIGHTS, User
from dicomfs.passwords import verify_password

__all__ = ["Credentials", "MalformedCredentialsError", "REALM", "RIGHTS_KEY", "UsersDomainController",
           "basic_credentials", "refusal", "required_rights"]

REALM = "dicomfs"
RIGHTS_KEY = "dicomfs.rights"
"""The environ key holding the rights of the request's user (a frozenset of RIGHTS)."""
USERS_KEY = "dicomfs_users"
"""The wsgidav configuration key the :class:`Credentials` are passed in (read by the domain controller)."""
_REMEMBERED_SECONDS = 300.0

_READING = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND"})
_SEEING = {"root": frozenset(RIGHTS), "uploads": frozenset({"read", "upload"}), "views": frozenset({"read"})}
"""Who may see a place at all: the root shows only the fixed names of the views (any user: a
client must list it to mount the share); uploads/ holds only what has not been stored yet, which
an uploader must list to write into it (Explorer, Finder and rclone list before they copy); the
views hold the archive: read only."""


def required_rights(method: str, place: str, destination: str | None = None) -> tuple[frozenset[str], ...]:
    """The rights a request needs: one of each set returned (checked in order, so the first set
    the user lacks names what it misses).

    ``place`` and ``destination`` are where the request's path and its Destination *resolve* to
    (see ``DicomfsProvider.place``): ``root`` (the root itself), ``uploads`` (uploads/ or below) or
    ``views`` (everything else, whether it exists or not: a 404 would tell a name exists). DELETE
    of stored data needs *delete*, and only that. Every other method needs to see its place first
    (and COPY and MOVE their destination); then every method but the reading ones writes, or locks
    so that others cannot write (LOCK, UNLOCK), or sets user metadata (PROPPATCH): *upload*.
    """
    method = method.upper()
    if method == "DELETE" and place == "views":
        return (frozenset({"delete"}),)  # may delete, so may learn what exists (a script's DELETE by path)
    needed = [_SEEING[place]]
    if destination is not None:
        needed.append(_SEEING[destination])
    if method not in _READING:
        needed.append(frozenset({"upload"}))
    return tuple(needed)


def refusal(rights: frozenset[str], needed: tuple[frozenset[str], ...]) -> str | None:
    """What the user lacks, as the end of "it needs the ... right"; None when nothing."""
    for choice in needed:
        if not choice & rights:
            return " or ".join(sorted(choice)) if choice != _SEEING["root"] else "any"
    return None


class MalformedCredentialsError(ValueError):
    """A Basic Authorization header whose credentials are not base64 of UTF-8 ``name:password``."""


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(name, password) from a Basic ``Authorization`` header; None when absent or another scheme;
    MalformedCredentialsError when it is Basic but unreadable."""
    if header is None or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise MalformedCredentialsError("malformed Authorization header") from None
    name, colon, password = decoded.partition(":")
    if not colon:
        raise MalformedCredentialsError("malformed Authorization header: no name:password")
    return name, password


class Credentials:
    """Checks a user name and password against the configured users, remembering successes."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self.users = users
        self._key = os.urandom(32)  # keys the remembered digests; never leaves this process
        self._remembered: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def replace_users(self, users: Mapping[str, User]) -> None:
        """Check against ``users`` from now on (a reloaded configuration); what was remembered is
        forgotten, so a removed user or a changed right is never served from memory."""
        with self._lock:
            self.users = users
            self._remembered = {}

    def check(self, user_name: str, password: str) -> User | None:
        """The user, when the password is right; None otherwise (as slow for an unknown name)."""
        user = self.users.get(user_name)
        if user is None:
            verify_password(password, _DUMMY_HASH)  # as slow as a real check: names stay secret
            return None
        digest = hmac.new(self._key, f"{user_name}\0{password}\0{user.password_hash}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            remembered = self._remembered.get(digest, 0.0) > now
        if not remembered:
            if not verify_password(password, user.password_hash):
                return None
            with self._lock:
                if len(self._remembered) > 1024:
                    self._remembered = {k: v for k, v in self._remembered.items() if v > now}
                self._remembered[digest] = now + _REMEMBERED_SECONDS
        return user


class UsersDomainController(BaseDomainController):  # type: ignore[misc]
    """wsgidav's domain controller over the configured users (``http_authenticator.domain_controller``)."""

    def __init__(self, wsgidav_app: object, config: Mapping[str, object]) -> None:
        super().__init__(wsgidav_app, config)
        credentials = config.get(USERS_KEY)
        assert isinstance(credentials, Credentials)
        self._credentials = credentials

    def __str__(self) -> str:
        return f"{self.__class__.__name__}({len(self._credentials.users)} users)"

    def get_domain_realm(self, path_info: str, environ: dict[str, object] | None) -> str:
        return REALM

    def require_authentication(self, realm: str, environ: dict[str, object] | None) -> bool:
        if not self._credentials.users:
            if environ is not None:
                environ[RIGHTS_KEY] = frozenset(RIGHTS)
            return False
        return True

    def supports_http_digest_auth(self) -> bool:
        return False  # digest needs a password-equivalent kept on the server; we keep only hashes

    def basic_auth_user(self, realm: str, user_name: str, password: str, environ: dict[str, object]) -> bool:
        user = self._credentials.check(user_name, password)
        if user is None:
            return False
        environ[RIGHTS_KEY] = user.rights
        return True


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
