"""The wsgidav provider: maps request paths to the views' entries and to ``uploads/``, checks each
request's right, and hands completed uploads to the ingest queue.

Every request starts with a look at the store's change number, so what the mount, the CLI or
another bridge changed shows at once, and ends with nothing cached per request.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal
from urllib.parse import unquote

from wsgidav import util
from wsgidav.dav_error import HTTP_BAD_REQUEST, HTTP_FORBIDDEN, DAVError, PRECONDITION_CODE_PropfindFiniteDepth
from wsgidav.dav_provider import DAVProvider

from bridge import propfind
from bridge.resources import StoredUpload, UploadFile, UploadFolder, ViewFile, ViewFolder, content_type, dav_error, etag
from bridge.vanished import VanishedFolder, VanishedFolders
from dicomfs.config import WebdavConfig
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.store import Store
from dicomfs.upload_queue import UploadQueue
from dicomfs.uploads import UploadArea, UploadOutcome
from dicomfs.views import UPLOADS, Entry, Tree
from dicomfs.views.tags import resource_attributes

__all__ = ["BridgeSettings", "DicomfsProvider"]

_log = logging.getLogger("dicomfs.webdav")
_READ_BACK_SECONDS = 10.0  # how long a stored upload still answers PROPFIND and HEAD (StoredUpload)


@dataclass(frozen=True)
class BridgeSettings:
    """What the bridge lets clients do (``[webdav]`` in the configuration)."""

    upload_allowed: bool = True
    delete_allowed: bool = True
    lock_timeout_max: int = 3600
    xml_body_max: int = 1 << 20

    @classmethod
    def of(cls, webdav: WebdavConfig, *, writable: bool) -> BridgeSettings:
        """The settings of ``[webdav]`` over a store that is ``writable`` or not."""
        return cls(webdav.upload_allowed and writable, webdav.delete_allowed and writable,
                   webdav.lock_timeout_max, webdav.xml_body_max)


class DicomfsProvider(DAVProvider):  # type: ignore[misc]
    """One share at ``/``: the views, and ``uploads/``."""

    def __init__(self, store: Store, tree: Tree, uploads: UploadArea, settings: BridgeSettings) -> None:
        super().__init__()
        self.store = store
        self.tree = tree
        self.uploads = uploads
        self.settings = settings
        self.fs_opts: dict[str, object] = {}  # read by wsgidav's file resources (uploads/)
        self.readonly = False
        # none where nothing may be uploaded (a read-only store): no ingest process to start, and
        # no leftover in uploads/ to take from a front end that can write
        self.queue = UploadQueue(store, uploads, origin="webdav", on_done=self._ingested) if settings.upload_allowed else None
        self._awaiting_unlock: dict[str, tuple[tuple[str, ...], str]] = {}  # ref url -> (parts, remote)
        self._awaiting_lock = threading.Lock()
        self._submitted: OrderedDict[tuple[str, ...], tuple[float, os.stat_result]] = OrderedDict()  # parts -> (when, stat)
        self.vanished = VanishedFolders()
        self.fast_propfind = True
        """PROPFIND of view folders answered by bridge.propfind; False leaves every one to wsgidav (tests compare)."""

    def __repr__(self) -> str:
        return f"DicomfsProvider({self.store.folder})"

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    # -- requests --------------------------------------------------------------------------------

    def custom_request_handler(self, environ: dict[str, Any], start_response: Callable[..., Any],
                               default_handler: Callable[..., Iterable[bytes]]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ["PATH_INFO"]  # PathGuard has refused '..', NUL and %2F; RequestGuard checked the rights
        if method == "PROPFIND" and environ.get("HTTP_DEPTH", "infinity").strip().lower() not in ("0", "1"):
            # A whole archive in one answer would be gigabytes of XML: RFC 4918 lets us refuse.
            raise DAVError(HTTP_FORBIDDEN, err_condition=PRECONDITION_CODE_PropfindFiniteDepth)
        self.tree.refresh()
        try:
            if method == "PROPFIND" and self.fast_propfind:
                fast = self._fast_propfind(environ, start_response)
                if fast is not None:
                    return fast
            new_lock = method == "LOCK" and self.get_resource_inst(path, environ) is None
            try:
                answer = default_handler(environ, start_response)
            except DAVError:
                if new_lock:
                    self._unmade(path)
                raise
        except DicomfsError as error:
            raise dav_error(error) from None
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:
                raise
            # each name is at most 255 bytes (RequestGuard), but a deep folder in uploads/ can
            # still make a path longer than the file system takes (PATH_MAX, 4096 bytes)
            raise DAVError(HTTP_BAD_REQUEST, "the path is too long for the file system") from None
        if method == "UNLOCK":
            resource = self.get_resource_inst(path.rstrip("/"), environ)
            if isinstance(resource, UploadFile):
                self.unlocked(resource.get_ref_url())
        return answer

    def _fast_propfind(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes] | None:
        """The 207 answer of a PROPFIND of the views, written by bridge.propfind; None when wsgidav's
        own handler must answer (it then sees the request unchanged, body included).

        Answered here: Depth 0 or 1, allprop or named properties, of a view folder or file when
        neither it nor a member it lists holds a lock, and nothing at or below it a dead property. Left to wsgidav: the root
        (it lists uploads/, a real folder), uploads/, propname, conditional requests (If, If-Match,
        ...: wsgidav evaluates them), bodies it would refuse or read differently, and whatever has
        a lock or a dead property (wsgidav renders those: lockdiscovery, the stored XML)."""
        path = environ["PATH_INFO"]
        parts = tuple(part for part in path.split("/") if part)
        depth = environ.get("HTTP_DEPTH")  # lower-cased by wsgidav; anything but "0" or "1" is its to refuse
        if (not parts or parts[0] == UPLOADS or depth not in ("0", "1") or "HTTP_TRANSFER_ENCODING" in environ
                or any(key in environ for key in _CONDITIONS)):
            return None
        body = _read_body(environ)
        if body is False:
            return None
        request = propfind.parse_request(body)
        if request is None:
            return None
        resource = self.get_resource_inst(path, environ)
        if not isinstance(resource, (ViewFolder, ViewFile)):
            return None  # not found (wsgidav's 404) or not a view
        lock_manager = self.lock_manager
        if lock_manager is not None:
            # lockdiscovery shows the locks whose root is the resource itself: wsgidav renders them
            root = "/" + resource.get_ref_url().strip("/")  # as the lock manager normalises roots
            locks = lock_manager.get_url_lock_list(root, recursive=depth == "1")
            if any(lock["root"] == root or lock["root"].rsplit("/", 1)[0] == root for lock in locks):
                return None
        properties = self.prop_manager
        if properties is not None and properties.any_under(resource.get_ref_url()):
            return None  # views refuse dead properties, but one may have been kept from elsewhere
        href, with_attributes = resource.get_href(), request.wants_attributes
        try:
            members = self.tree.listing(resource.parts).entries if depth == "1" and isinstance(resource, ViewFolder) else ()
            # rows are made as the answer is written, each dropped once written: a 20,000-patient
            # listing held as rows at once is ~10 MB more to pass through the CPU's caches
            rows = itertools.chain((self._row(href, resource.entry, with_attributes),),
                                   (self._row(_member_href(href, entry), entry, with_attributes) for entry in members))
            pieces = propfind.multistatus(request, rows, locking=lock_manager is not None)
        except NotFoundError:
            return None  # gone meanwhile: wsgidav answers as it does for that
        start_response("207 Multi-Status", [("Content-Type", "application/xml; charset=utf-8"), ("Date", util.get_rfc1123_time()),
                                            ("Content-Length", str(sum(len(piece) for piece in pieces)))])
        return pieces

    def _row(self, href: str, entry: Entry, with_attributes: bool) -> propfind.Row:
        """What ViewFolder or ViewFile would answer for ``entry``, read once; its tags only if asked for."""
        attributes: dict[str, str] | None = None
        if with_attributes:
            attributes = {}
            if entry.resource_id is not None:
                try:
                    attributes = resource_attributes(self.store, entry.resource_id)
                except NotFoundError:
                    pass  # each asked for is then "404 Not Found", as the resource answers
        if entry.is_folder:
            return propfind.Row(href, entry.name, True, entry.mtime, attributes=attributes)
        return propfind.Row(href, entry.name, False, entry.mtime, entry.size, content_type(entry),
                            etag(entry, lambda: self.tree.document(entry)), attributes)

    def place(self, path: str) -> tuple[str, str]:
        """``path`` with its first segment as the tree names it, and where it is: ``root``,
        ``uploads`` or ``views`` (bridge.auth.required_rights). The tree finds names whatever their
        case (Windows and macOS clients change it), so the rights, the locks and the properties
        must all see the name it finds, not the string sent."""
        first, slash, rest = path.lstrip("/").partition("/")
        if not first or first == "*":  # "OPTIONS *" asks about the server, as the root does
            return path, "root"
        entry = self.tree.listing(()).find(first)
        if entry is not None and entry.name != first:
            path, first = "/" + entry.name + slash + rest, entry.name
        return path, "uploads" if first == UPLOADS and self.tree.uploads else "views"

    def _unmade(self, path: str) -> None:
        """A LOCK of a new name was refused after wsgidav made the empty file it would lock
        (RFC 4918 9.10.4): the file goes, unless something wrote into it meanwhile."""
        parts = tuple(part for part in path.split("/") if part)
        if len(parts) < 2 or parts[0] != UPLOADS:
            return
        try:
            made = self.uploads.path(parts[1:])
            if made.is_file() and made.stat().st_size == 0:
                made.unlink()
        except (DicomfsError, OSError):
            pass  # gone already, or never made: nothing to undo

    def get_resource_inst(self, path: str | None, environ: dict[str, Any]) -> Any:
        if path is None:
            return None  # the parent of the root (wsgidav asks, for DELETE, COPY and MOVE of /)
        parts = tuple(part for part in path.split("/") if part)
        if not parts:
            return ViewFolder("/", environ, self.tree.root_entry(), ())
        if parts[0] == UPLOADS:
            return self._upload_resource(path, parts[1:], environ) if self.tree.uploads else None
        try:
            entry = self.tree.lookup(parts)
        except NotFoundError:
            if environ.get("REQUEST_METHOD") == "DELETE" and self.vanished.recent(parts):
                return VanishedFolder(path, environ, parts, self.vanished)
            return None
        return self.resource_for(parts[:-1], entry, environ)

    def deleted(self, parts: tuple[str, ...]) -> None:
        """A delete of the resource at ``parts`` is done: remember the folders above it it emptied
        (they are gone from the tree), so that their own DELETE, which follows, succeeds."""
        self.changed()
        for end in range(len(parts) - 1, 1, -1):  # never the view's own folder
            try:
                self.tree.lookup(parts[:end])
                return
            except NotFoundError:
                self.vanished.add(parts[:end])

    def resource_for(self, folder: tuple[str, ...], entry: Entry, environ: dict[str, Any]) -> Any:
        """The resource of ``entry``, listed in the folder at ``folder``."""
        parts = (*folder, entry.name)
        path = "/" + "/".join(parts) + ("/" if entry.is_folder else "")
        if parts[0] == UPLOADS:
            resource = self._upload_resource(path, parts[1:], environ)
        elif entry.is_folder:
            resource = ViewFolder(path, environ, entry, parts)
        else:
            resource = ViewFile(path, environ, entry)
        return resource

    def _upload_resource(self, path: str, parts: tuple[str, ...], environ: dict[str, Any]) -> Any:
        try:
            real = self.uploads.path(parts)
            if real.is_dir():
                return UploadFolder(path, environ, str(real))
            if real.is_file():
                return UploadFile(path, environ, str(real))
        except (DicomfsError, OSError):
            return None  # a name that could escape, or gone meanwhile: nothing there
        if environ.get("REQUEST_METHOD") in ("PROPFIND", "HEAD"):
            info = self._stored_upload(parts)
            if info is not None:
                return StoredUpload(path, environ, info)
        return None

    def _loc_to_file_path(self, path: str, environ: dict[str, Any] | None = None) -> str:
        """The real path of a URL path in uploads/ (wsgidav's file resources call this for COPY and MOVE)."""
        parts = tuple(part for part in path.split("/") if part)
        if not parts or parts[0] != UPLOADS:
            raise DAVError(HTTP_FORBIDDEN, "files can be written only in uploads/")
        return str(self.uploads.path(parts[1:]))

    # -- rules -----------------------------------------------------------------------------------

    def check_upload(self) -> None:
        if not self.settings.upload_allowed:
            raise DAVError(HTTP_FORBIDDEN, "uploads are turned off (webdav.upload_allowed)")

    def check_in_uploads(self, dest_path: str) -> str:
        """The real path of ``dest_path``; DAVError 403 when it is not in uploads/."""
        return self._loc_to_file_path(dest_path)

    def changed(self) -> None:
        """The store was changed by this bridge: drop the listings it made stale."""
        self.tree.refresh()

    def log_change(self, environ: dict[str, Any], what: str) -> None:
        _log.info("%s: %s", _remote(environ), what)

    # -- uploads ---------------------------------------------------------------------------------

    def upload_written(self, resource: UploadFile, *, with_errors: bool) -> None:
        """A PUT ended: queue the file for ingest, or wait for its client's UNLOCK."""
        parts = _upload_parts(resource.path)
        if with_errors:
            # wsgidav calls end_write(with_errors=True) in the ``except`` of the failed copy: the
            # error being handled says whether the disk was full.
            self.uploads.write_failed(resource.file_path, sys.exc_info()[1])
            return
        self._arrived(resource.get_ref_url(), parts, resource.environ)

    def upload_completed(self, ref_url: str, parts: tuple[str, ...], environ: dict[str, Any],
                         info: os.stat_result | None = None) -> None:
        """A PUT answered before wsgidav (bridge.fast_put) wrote ``uploads/<parts>`` whole; ``info``
        is the file as the PUT left it, when the caller has it (it saves two stats a file)."""
        self._arrived(ref_url, parts, environ, info)

    def upload_arrived(self, dest_path: str, environ: dict[str, Any]) -> None:
        """A COPY or MOVE put a complete file at ``dest_path``."""
        self._arrived(util.quote(dest_path), _upload_parts(dest_path), environ)

    def folder_arrived(self, dest_path: str, environ: dict[str, Any]) -> None:
        """A MOVE put a folder at ``dest_path``: its files arrive under names nothing queued (any
        queued under the old ones are passed over as gone by their turn)."""
        for parts in self.uploads.files_at(_upload_parts(dest_path)):
            self._arrived(util.quote("/".join(("", UPLOADS, *parts))), parts, environ)

    def upload_removed(self, path: str) -> None:
        with self._awaiting_lock:
            self._awaiting_unlock.pop(util.quote(path), None)
            self._submitted.pop(_upload_parts(path), None)
        self.forget_properties(path)

    def forget_properties(self, path: str) -> None:
        """Drop the dead properties of ``path`` and of what was below it: it is gone."""
        if self.prop_manager is not None:
            self.prop_manager.remove_under(util.quote(path.rstrip("/")))

    def forget_gone_properties(self) -> None:
        """Drop the dead properties of files and folders of ``uploads/`` that are gone by another
        way than this bridge (the janitor's sweep, the mount, another process). One range scan of
        the properties kept under uploads/ and a stat for each owner: bounded by what was kept."""
        if self.prop_manager is None:
            return
        for url in self.prop_manager.owners_under("/" + UPLOADS):
            parts = tuple(part for part in unquote(url).split("/") if part)[1:]
            try:
                gone = bool(parts) and not self.uploads.path(parts).exists()
            except DicomfsError:
                gone = True  # a name that could not be in uploads/: nothing there
            if gone:
                self.prop_manager.remove_under(url)

    def _arrived(self, ref_url: str, parts: tuple[str, ...], environ: dict[str, Any],
                 info: os.stat_result | None = None) -> None:
        remote = _remote(environ)
        lock_manager = self.lock_manager
        if lock_manager is not None and lock_manager.is_url_locked(ref_url):
            # Windows writes a file under a lock, then sets its times, then unlocks: until then
            # the file must stay where the client left it.
            with self._awaiting_lock:
                self._awaiting_unlock[ref_url] = (parts, remote)
            return
        self._submit(parts, remote, info)

    def unlocked(self, ref_url: str) -> None:
        """A lock was released or expired: ingest what it held back."""
        with self._awaiting_lock:
            waiting = self._awaiting_unlock.get(ref_url)
            if waiting is None or (self.lock_manager is not None and self.lock_manager.is_url_locked(ref_url)):
                return
            del self._awaiting_unlock[ref_url]
        self._submit(*waiting)

    def _submit(self, parts: tuple[str, ...], remote: str, info: os.stat_result | None = None) -> None:
        """Queue a complete upload for ingest, keeping its size and date for StoredUpload."""
        if self.queue is None:
            return  # this bridge takes no uploads: one touched here is the mount's to queue
        if info is None:
            try:
                info = self.uploads.path(parts).stat()
            except (DicomfsError, OSError):
                info = None
        now = time.monotonic()
        with self._awaiting_lock:
            while self._submitted and next(iter(self._submitted.values()))[0] < now - _READ_BACK_SECONDS:
                self._submitted.popitem(last=False)
            self._submitted.pop(parts, None)
            if info is not None:
                self._submitted[parts] = (now, info)
        self.queue.submit(parts, remote, info)

    def _stored_upload(self, parts: tuple[str, ...]) -> os.stat_result | None:
        """What a file just queued from ``uploads/<parts>`` was, for a few seconds after it was stored."""
        with self._awaiting_lock:
            when, info = self._submitted.get(parts, (0.0, None))
        return info if when >= time.monotonic() - _READ_BACK_SECONDS else None

    def release_expired(self) -> None:
        """Ingest uploads whose lock expired without an UNLOCK (a client that went away)."""
        with self._awaiting_lock:
            urls = list(self._awaiting_unlock)
        for url in urls:
            self.unlocked(url)

    def busy_uploads(self) -> set[tuple[str, ...]]:
        with self._awaiting_lock:
            held = {parts for parts, _ in self._awaiting_unlock.values()}
        return held if self.queue is None else held | self.queue.busy()

    def _ingested(self, reports: list[tuple[tuple[str, ...], UploadOutcome]]) -> None:
        """A group of uploads is ingested: forget those gone unstored, and refresh the tree once
        for all (a refresh per file read the change log 2,400 times for 2,400 PUTs)."""
        with self._awaiting_lock:
            for parts, outcome in reports:
                if outcome.removed and not outcome.results:  # gone without being stored (deleted meanwhile, clutter)
                    self._submitted.pop(parts, None)
        for parts, outcome in reports:
            if outcome.removed:  # stored or gone: what a client kept about the file goes with it
                self.forget_properties("/".join(("", UPLOADS, *parts)))
        if any(outcome.removed or outcome.results for _, outcome in reports):
            self.tree.refresh()


_CONDITIONS = ("HTTP_IF", "HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE")


def _read_body(environ: dict[str, Any]) -> bytes | None | Literal[False]:
    """The request body, None if there is none, False if wsgidav must judge it (a bad length).

    What was read is put back as ``wsgi.input``, so the default handler can still read it; the
    length rules are those of wsgidav's util.parse_xml_body (no Content-Length: no body)."""
    header = environ.get("CONTENT_LENGTH", "").strip()
    if not header:
        return None
    try:
        length = int(header)
    except ValueError:
        return False
    if length <= 0:
        return None if length == 0 else False
    body = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    return bytes(body) if len(body) == length else False


def _upload_parts(path: str) -> tuple[str, ...]:
    parts = tuple(part for part in path.split("/") if part)
    assert parts and parts[0] == UPLOADS, path
    return parts[1:]


def _remote(environ: dict[str, Any]) -> str:
    user = environ.get("wsgidav.auth.user_name") or ""
    address = environ.get("REMOTE_ADDR", "")
    return f"{user}@{address}" if user else address


def _member_href(folder_href: str, entry: Entry) -> str:
    """A member's href: its folder's and its quoted name (a folder's ending in ``/``)."""
    return folder_href + propfind.quoted_name(entry.name) + ("/" if entry.is_folder else "")
