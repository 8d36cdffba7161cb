"""Error answers: a status and one readable line, never a traceback or an exception's repr.

Replaces wsgidav's ErrorPrinter, whose pages quote the exception that caused a 500 (paths, names
from the code) to whoever sent the request. Also answers a malformed Basic Authorization header
with a 401 (wsgidav would fail on it with a 500).
"""

from __future__ import annotations

import errno
import logging
from typing import Any, Callable, Iterator

from wsgidav import util
from wsgidav.dav_error import HTTP_FORBIDDEN, HTTP_INTERNAL_ERROR, HTTP_NO_CONTENT, HTTP_NOT_MODIFIED, DAVError
from wsgidav.mw.base_mw import BaseMiddleware

from bridge.auth import REALM, MalformedCredentialsError, basic_credentials
from dicomfs.errors import DicomfsError

__all__ = ["ErrorPages", "PathGuard"]

_log = logging.getLogger("dicomfs.webdav")


class ErrorPages(BaseMiddleware):  # type: ignore[misc]
    """A wsgidav middleware (in ``middleware_stack`` where ErrorPrinter would be)."""

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        if not _well_formed_basic(environ.get("HTTP_AUTHORIZATION")):
            yield from _answer(start_response, DAVError(401, "malformed Authorization header"),
                               [("WWW-Authenticate", f'Basic realm="{REALM}"')])
            return
        captured = util.SubAppStartResponse()
        try:
            started = False
            answer = self.next_app(environ, captured)
            try:
                for chunk in answer:
                    if not started:
                        start_response(captured.status, captured.response_headers, captured.exc_info)
                        started = True
                    yield chunk
            finally:
                if hasattr(answer, "close"):
                    answer.close()
            if not started:
                start_response(captured.status, captured.response_headers, captured.exc_info)
            return
        except DAVError as error:
            failure = error
        except DicomfsError as error:
            failure = DAVError(error.http_status, str(error))
        except OSError as error:
            failure = DAVError(HTTP_FORBIDDEN, "permission denied") if error.errno == errno.EACCES else _internal(environ)
        except Exception:
            failure = _internal(environ)
        if started:  # the status line is gone: all that is left is to cut the answer short
            raise ConnectionAbortedError("request failed after its answer started; see the log above")
        yield from _answer(start_response, failure, failure.add_headers or [])


class PathGuard:
    """Outside wsgidav: refuses a path that climbs (``..``, also as ``%2e%2e``: the server has
    decoded it), holds a NUL or an encoded slash, or is not UTF-8 once decoded (wsgidav would
    fail on it with a 500), with a plain 400. wsgidav refuses ``..`` too, but from inside a
    generator, so its answer loses the body its Content-Length promised and the client hangs."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        segments = path.split("/")
        if "\0" in path or ".." in segments or "." in segments:
            return list(_answer(start_response, DAVError(400, "a path may not hold '.', '..' or NUL segments"), []))
        if not _utf8_path(path):  # wsgidav's re-encoding of the path would fail with no answer at all
            return list(_answer(start_response, DAVError(400, "a path must be UTF-8"), []))
        if "%2f" in environ.get("REQUEST_URI", "").lower():  # the server leaves %2F encoded: a slash in disguise
            return list(_answer(start_response, DAVError(400, "a path may not hold an encoded slash (%2F)"), []))
        return self._app(environ, start_response)


def _utf8_path(path: str) -> bool:
    """Whether a PATH_INFO (its bytes as latin-1, PEP 3333) is UTF-8."""
    if path.isascii():
        return True
    try:
        path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True


def _internal(environ: dict[str, Any]) -> DAVError:
    _log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
    return DAVError(HTTP_INTERNAL_ERROR, "internal error; the server log says more")


def _answer(start_response: Callable[..., Any], error: DAVError, headers: list[tuple[str, str]]) -> Iterator[bytes]:
    status = util.get_http_status_string(error)
    if error.value in (HTTP_NOT_MODIFIED, HTTP_NO_CONTENT):
        start_response(status, [("Content-Length", "0"), ("Date", util.get_rfc1123_time())])
        yield b""
        return
    if error.err_condition:
        content_type, body = "application/xml; charset=utf-8", util.to_bytes(error.err_condition.as_string())
    else:
        content_type, body = "text/plain; charset=utf-8", f"{status}: {error.context_info or _reason(status)}\n".encode()
    if not error.add_body:
        body = b""
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Date", util.get_rfc1123_time()), *headers])
    yield body


def _reason(status: str) -> str:
    return status.partition(" ")[2].lower()


def _well_formed_basic(header: str | None) -> bool:
    """Absent, another scheme (the authenticator answers those itself) or readable Basic."""
    try:
        basic_credentials(header)
    except MalformedCredentialsError:
        return False
    return True
