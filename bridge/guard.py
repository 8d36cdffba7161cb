"""What every request passes before anything of wsgidav answers it (its directory pages included):
the request is put on its canonical path, checked against the user's rights there, and its
hostile parts are bounded or dropped.

In wsgidav's ``middleware_stack`` right after the authenticator (which puts the user's rights in
the environ) and before the dir browser (which would otherwise list a folder to anyone).

- The path's first segment is rewritten as the tree names it (``/UPLOADS/x`` is ``/uploads/x``,
  as the tree finds it), so the rights, the locks and the properties all see one path.
- The rights are those of ``bridge.auth.required_rights`` for the resolved path and Destination.
- The root cannot be deleted, copied, moved or overwritten (403); a COPY or MOVE needs a
  Destination (400; wsgidav answers 502 for one on another server, RFC 4918 9.8.5).
- A name longer than a file system takes (255 bytes) is refused with 400 before it reaches one.
- A body other than a PUT's is read whole by wsgidav (XML): past ``webdav.xml_body_max``, 413.
- A LOCK's Timeout is capped at ``webdav.lock_timeout_max`` (Infinite included).
- A GET's Range is passed on only when it is one well-formed byte range; anything else is
  ignored (RFC 9110 14.2), so the answer is the whole body, never wrong bytes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote, urlsplit

from wsgidav import util
from wsgidav.dav_error import HTTP_BAD_REQUEST, HTTP_FORBIDDEN, HTTP_REQUEST_ENTITY_TOO_LARGE, DAVError
from wsgidav.mw.base_mw import BaseMiddleware

from bridge.auth import RIGHTS_KEY, refusal, required_rights
from dicomfs.views.names import MAX_NAME_BYTES

if TYPE_CHECKING:
    from bridge.provider import DicomfsProvider

__all__ = ["RequestGuard"]

_ONE_RANGE = re.compile(r"bytes=(?:(\d+)-(\d*)|-(\d*[1-9]\d*))", re.ASCII | re.IGNORECASE)
"""One byte range (RFC 9110 14.1.2): ``first-[last]`` or a suffix ``-length`` of at least one byte."""
_CHANGES_ROOT = frozenset({"DELETE", "COPY", "MOVE", "PUT", "MKCOL", "LOCK", "PROPPATCH"})


class RequestGuard(BaseMiddleware):  # type: ignore[misc]
    """A wsgidav middleware (see the module docstring)."""

    def __init__(self, wsgidav_app: object, next_app: Callable[..., Any], config: dict[str, Any]) -> None:
        super().__init__(wsgidav_app, next_app, config)
        self.provider: DicomfsProvider = config["provider_mapping"]["/"]

    def is_disabled(self) -> bool:
        return False

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        provider, settings = self.provider, self.provider.settings
        method = environ["REQUEST_METHOD"].upper()
        if environ.get("wsgidav.provider") is not provider:  # the HTML listing's style sheet and icons
            return self.next_app(environ, start_response)  # (a read-only share): the same for everyone
        path, place = provider.place(environ["PATH_INFO"])
        environ["PATH_INFO"] = path
        destination = self._destination(environ, method)
        to_place = provider.place(destination)[1] if destination is not None else None
        lacking = refusal(environ.get(RIGHTS_KEY, frozenset()), required_rights(method, place, to_place))
        if lacking is not None:
            user = environ.get("wsgidav.auth.user_name") or "anonymous"
            raise DAVError(HTTP_FORBIDDEN, f"{user} may not {method} here: it needs the {lacking} right")
        if place == "root" and method in _CHANGES_ROOT or to_place == "root":
            raise DAVError(HTTP_FORBIDDEN, "the root cannot be deleted, copied, moved or written")
        for name in (*path.split("/"), *(destination or "").split("/")):
            if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
                raise DAVError(HTTP_BAD_REQUEST, f"a name may hold {MAX_NAME_BYTES} bytes at most")
        length = environ.get("CONTENT_LENGTH", "").strip()
        if method != "PUT" and length.isdigit() and int(length) > settings.xml_body_max:
            _drain(environ["wsgi.input"], int(length), 8 * settings.xml_body_max)
            raise DAVError(HTTP_REQUEST_ENTITY_TOO_LARGE, f"a {method} body may hold {settings.xml_body_max} bytes at most")
        if method == "LOCK":
            asked = util.read_timeout_value_header(environ.get("HTTP_TIMEOUT", ""))
            capped = settings.lock_timeout_max if asked is None or asked < 0 else min(asked, settings.lock_timeout_max)
            environ["HTTP_TIMEOUT"] = f"Second-{capped}"
        if "HTTP_RANGE" in environ and not _one_byte_range(environ["HTTP_RANGE"]):
            del environ["HTTP_RANGE"]
        return self.next_app(environ, start_response)

    def _destination(self, environ: dict[str, Any], method: str) -> str | None:
        """The canonical path of a COPY's or MOVE's Destination (written back to the header);
        None for other methods. DAVError 400 when it is missing or unreadable."""
        if method not in ("COPY", "MOVE"):
            return None
        header = environ.get("HTTP_DESTINATION", "").strip()
        try:
            parts = urlsplit(header)
            parts.port  # noqa: B018 -- raises ValueError for a port that is not one
        except ValueError:
            raise DAVError(HTTP_BAD_REQUEST, "the Destination header is not a URL") from None
        if not parts.path.startswith("/"):
            raise DAVError(HTTP_BAD_REQUEST, "a COPY or MOVE needs a Destination: the URL to copy or move to")
        # another server's Destination is wsgidav's to refuse (502), as it knows the proxy headers
        asked = unquote(parts.path)
        path, _ = self.provider.place(asked)
        if path != asked:
            environ["HTTP_DESTINATION"] = parts._replace(path=util.quote(path)).geturl()
        return path


def _drain(stream: Any, length: int, most: int) -> None:
    """Read and drop a refused body that is not too big, so the client, still sending it, gets
    to read the answer (cheroot closes a connection whose body was left unread: the client then
    sees a broken pipe, not the 413). A bigger one is left: the connection closes."""
    if length > most:
        return
    while length > 0:
        chunk = stream.read(min(length, 1 << 16))
        if not chunk:
            return
        length -= len(chunk)


def _one_byte_range(header: str) -> bool:
    """Whether a Range header asks for exactly one well-formed, non-empty byte range."""
    match = _ONE_RANGE.fullmatch(header.strip())
    if match is None:
        return False
    first, last = match[1], match[2]
    return first is None or not last or int(first) <= int(last)
