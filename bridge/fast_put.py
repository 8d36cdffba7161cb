"""A plain PUT into ``uploads/`` answered before wsgidav: authenticate, write the body, queue it.

wsgidav's stack (its authenticator, dir browser, resolver and request server, two resource
objects and their lock checks) costs more than half of a small upload: with no dicomfs code at
all it takes ~380 PUTs/s where cheroot alone takes ~660 (docs/benchmarks.md). Most uploads are
the simplest kind (curl, rclone, Nautilus, a script): an authenticated PUT of a new file into an
existing folder, with no lock, no condition and no range. Those are written here; every other
request, and any of these this layer cannot answer exactly as wsgidav would (an auth failure,
a missing parent, a folder in the way, clutter, a lock anywhere that matters), goes on to wsgidav
unchanged, which answers it as before.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsgidav import util

from bridge.auth import Credentials, MalformedCredentialsError, basic_credentials
from dicomfs.errors import DicomfsError
from dicomfs.store.sources import is_os_junk
from dicomfs.uploads import new_version, rename_over
from dicomfs.views import UPLOADS

if TYPE_CHECKING:
    from bridge.provider import DicomfsProvider

__all__ = ["FastPut"]

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_DEFERRED = ("HTTP_CONTENT_RANGE", "HTTP_CONTENT_ENCODING", "HTTP_IF", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH",
             "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE", "HTTP_X_OC_MTIME")
"""Headers whose handling is wsgidav's: a request carrying any of them goes to wsgidav."""
_NAME_MAX = 255
"""Bytes in one file or folder name (NAME_MAX of Linux file systems): a longer one cannot be made."""


class FastPut:
    """A WSGI layer in front of wsgidav: plain PUTs into ``uploads/`` here, everything else on."""

    def __init__(self, next_app: WsgiApp, provider: DicomfsProvider, credentials: Credentials, block_size: int) -> None:
        self.next_app, self.provider, self.credentials, self.block_size = next_app, provider, credentials, block_size

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "PUT" or not environ.get("PATH_INFO", "").startswith(f"/{UPLOADS}/"):
            return self.next_app(environ, start_response)
        answer = self._put(environ, start_response)
        return answer if answer is not None else self.next_app(environ, start_response)

    def _put(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes] | None:
        provider = self.provider
        if not provider.settings.upload_allowed or any(key in environ for key in _DEFERRED):
            return None
        user = self._user(environ)
        if user is None:
            return None
        try:  # as wsgidav's re_encode_path_info hotfix does: PEP 3333 hands the path over as latin-1
            path = environ["PATH_INFO"].encode("latin-1").decode("utf-8")
        except UnicodeError:
            return None
        parts = tuple(part for part in path.split("/") if part)
        if path.endswith("/") or len(parts) < 2 or is_os_junk(parts[-1]):
            return None
        if any(len(part.encode("utf-8")) > _NAME_MAX for part in parts):
            return _plain(start_response, "400 Bad Request", f"a name may be {_NAME_MAX} bytes long at most (UTF-8)")
        try:
            target = provider.uploads.path(parts[1:])
        except DicomfsError:
            return None
        try:
            found: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            found = None
        except OSError:  # a file where a folder should be, a name too long: wsgidav says which
            return None
        if (found is not None and stat.S_ISDIR(found.st_mode)) or self._locked(path):
            return None
        replacement: int | None = None  # a new inode for a new version (uploads.new_version)
        try:
            replacement = new_version(target) if found is not None else None
            file = open(replacement if replacement is not None else target, "wb")
        except (FileNotFoundError, NotADirectoryError):  # no such folder: wsgidav answers 409 Conflict
            return None
        except OSError as error:  # nothing was written
            return self._failed(start_response, provider, target, error, mark=False)
        environ["wsgidav.auth.user_name"] = user  # who uploaded, for the store's RemoteUser
        expected = environ.get("CONTENT_LENGTH") or ""
        written = 0
        try:
            with file:
                stream = environ["wsgi.input"]
                while chunk := stream.read(self.block_size):
                    written += file.write(chunk)
                file.flush()
                info = os.fstat(file.fileno())  # for the ETag, the queue and StoredUpload: no stat after
                # cheroot ends the body early when the client leaves
                complete = not expected.isdigit() or written == int(expected)
                if replacement is not None and complete:
                    rename_over(file.fileno(), target)
        except OSError as error:  # the disk (ENOSPC), or the client went away mid-body
            return self._failed(start_response, provider, target, error, mark=replacement is None)
        except ValueError:  # cheroot's chunked reader: a malformed chunk, or the client left mid-chunk
            return self._failed(start_response, provider, target, None, mark=replacement is None)
        if not complete:
            if replacement is None:
                provider.uploads.write_failed(target, None)
            return _plain(start_response, "400 Bad Request", f"{written} of {expected} bytes arrived"
                          + ("; the earlier file is left as it was" if replacement is not None else ""))
        if found is not None:
            provider.uploads.clear_reason(target)  # Explorer's 0-byte PUT was marked empty
        provider.upload_completed(util.quote(path), parts[1:], environ, info)
        status = "204 No Content" if found is not None else "201 Created"
        # wsgidav's own ETag for a file (util.get_file_etag), from the stat already made
        etag = f"{info.st_ino}-{int(info.st_mtime)}-{info.st_size}"
        start_response(status, [("Content-Length", "0"), ("Date", util.get_rfc1123_time()), ("ETag", f'"{etag}"')])
        return [b""]

    @staticmethod
    def _failed(start_response: Callable[..., Any], provider: DicomfsProvider, target: Path,
                error: OSError | None, *, mark: bool) -> list[bytes]:
        """The answer to a PUT whose file could not be written whole (``error``: None for a broken
        body); ``mark``: the part written is at ``target`` and gets its reason (nothing was
        written, or a replacement's part went with its inode, when False)."""
        full = error is not None and error.errno == errno.ENOSPC
        with contextlib.suppress(FileNotFoundError):  # the open itself failed: no file to explain
            if mark:
                provider.uploads.write_failed(target, error)
        return _plain(start_response, "507 Insufficient Storage" if full else "400 Bad Request",
                      "no space left for the upload" if full else "the upload was interrupted")

    def _user(self, environ: dict[str, Any]) -> str | None:
        """The user, when the request carries good credentials with the upload right ("" when no
        users are configured); None for anything else, which wsgidav then answers (401, 403)."""
        if not self.credentials.users:
            return ""
        try:
            given = basic_credentials(environ.get("HTTP_AUTHORIZATION"))
        except MalformedCredentialsError:
            return None
        if given is None:
            return None
        name, password = given
        found = self.credentials.check(name, password)
        return name if found is not None and "upload" in found.rights else None

    def _locked(self, path: str) -> bool:
        """Whether a lock covers the file or its folder: then the lock token must be checked."""
        locks = self.provider.lock_manager
        if locks is None:
            return False
        url = util.quote(path)
        return bool(locks.get_indirect_url_lock_list(url) or locks.get_url_lock_list(util.get_uri_parent(url)))


def _plain(start_response: Callable[..., Any], status: str, message: str) -> list[bytes]:
    body = f"{status}: {message}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
