"""Salted password hashes for the WebDAV bridge's users: made by ``dicomfs passwd``, kept in the
configuration, checked by the bridge. Never a plaintext password anywhere.

The format is ``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>``: scrypt because it is in the
standard library (``hashlib.scrypt``) and memory-hard; the parameters travel with the hash so they
can be raised later without invalidating existing users. Checking one costs ~60 ms by design,
which is why the bridge remembers successful checks (see ``bridge.auth``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from dicomfs.errors import ConfigError

__all__ = ["hash_password", "check_hash_format", "verify_password"]

_SCHEME = "scrypt"
_N, _R, _P = 2**14, 8, 1  # OWASP's scrypt floor: 16 MiB of memory per check
_MIN_N, _MIN_R = _N, _R
"""Weaker parameters are refused when a hash is read: a hash made with N=2 (pasted, or edited to
check faster) would let whoever reads the configuration try passwords by the million per second."""
_MAX_MEMORY = 1 << 30
"""Memory one check may take (128·N·r bytes): more would let a configured hash exhaust the server."""
_SALT_BYTES, _HASH_BYTES = 16, 32


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A new salted hash of ``password``."""
    salt = os.urandom(_SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, _N, _R, _P, _HASH_BYTES)
    return "$".join([_SCHEME, str(_N), str(_R), str(_P), _b64(salt), _b64(digest)])


def check_hash_format(text: str) -> None:
    """ConfigError unless ``text`` is a hash ``hash_password`` could have made."""
    _parse(text)


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash (constant-time comparison)."""
    n, r, p, salt, digest = _parse(stored)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(digest)), digest)


def _parse(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise ConfigError("must be a hash made by `dicomfs passwd NAME` (scrypt$N$r$p$salt$hash), never a plaintext password")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ConfigError("is not a well-formed scrypt hash; make a new one with `dicomfs passwd NAME`") from None
    if n < _MIN_N or r < _MIN_R:
        raise ConfigError(f"has scrypt parameters too weak (N={n}, r={r}; at least N={_MIN_N}, r={_MIN_R} as OWASP "
                          "advises); make a new one with `dicomfs passwd NAME`")
    if n & (n - 1) or 128 * n * r > _MAX_MEMORY or not 1 <= p <= 16 or len(salt) < 8 or len(digest) < 16:
        raise ConfigError("has scrypt parameters out of range; make a new one with `dicomfs passwd NAME`")
    return n, r, p, salt, digest


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * r * (n + p + 2) + (1 << 20))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
