"""The WebDAV resources: folders and files of the views, and the real files of ``uploads/``.

View resources are made from ``dicomfs.views`` entries; a folder's members come from its one
listing (one index snapshot), so a PROPFIND of 2,000 instances does no per-child lookup. Nothing
here names or orders anything: that is the views' job.

``uploads/`` is a real folder, so its resources are wsgidav's own file-system resources (PUT,
MKCOL, COPY, MOVE, DELETE, Win32 times: all as on a plain share), with what dicomfs adds: a
completed file is queued for ingest, a file under a client's lock waits for the UNLOCK, and a
file that was not stored shows its reason as the property ``{urn:dicomfs}dicomfs.error``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from wsgidav.dav_error import HTTP_FORBIDDEN, HTTP_METHOD_NOT_ALLOWED, HTTP_NOT_FOUND, DAVError
from wsgidav.dav_provider import DAVCollection, DAVNonCollection
from wsgidav.fs_dav_provider import FileResource, FolderResource

from bridge.auth import RIGHTS_KEY
from bridge.propfind import href
from bridge.streams import open_stream
from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.store.sources import is_os_junk
from dicomfs.uploads import ERROR_XATTR, new_version, rename_over
from dicomfs.views import Entry, EntryKind, attachment_mime, attachment_sha256
from dicomfs.views.tags import META_PREFIX, PROTECTED, protection, resource_attributes

if TYPE_CHECKING:
    from bridge.provider import DicomfsProvider

_log = logging.getLogger("dicomfs.webdav")

__all__ = ["NAMESPACE", "StoredUpload", "UploadFile", "UploadFolder", "ViewFile", "ViewFolder", "content_type", "dav_error",
           "etag"]

NAMESPACE = "urn:dicomfs"
"""Properties ``{urn:dicomfs}dicom.PatientID``, ``{urn:dicomfs}dicomfs.meta.<name>``, ...: the
names the mount shows as extended attributes ``user.<name>``."""
_PREFIX = "{" + NAMESPACE + "}"
_ERROR_PROPERTY = _PREFIX + ERROR_XATTR.removeprefix("user.")
_WIN32 = "{urn:schemas-microsoft-com:}"


def dav_error(error: DicomfsError) -> DAVError:
    """The WebDAV answer for a dicomfs error: its HTTP status and its one-line message."""
    return DAVError(error.http_status, str(error))


# -- the views -----------------------------------------------------------------------------------


def content_type(entry: Entry) -> str:
    """The type of a view file (bridge.propfind writes it without a resource)."""
    if entry.kind is EntryKind.INSTANCE:
        return "application/dicom"
    return attachment_mime(entry) or "application/json"


def etag(entry: Entry, content: Callable[[], bytes]) -> str:
    """The ETag of a view file; ``content`` gives a document's bytes (not read for an instance or
    an attachment)."""
    if entry.kind is EntryKind.INSTANCE:
        # An instance's bytes change only if it is replaced, which also moves its reception time.
        return f"{entry.resource_id}-{entry.size}-{int(entry.mtime * 1000)}"
    return attachment_sha256(entry) or hashlib.sha1(content(), usedforsecurity=False).hexdigest()


class _Href:
    """The href of every resource of the bridge: the one form bridge.propfind writes (see there)."""

    provider: DicomfsProvider
    if TYPE_CHECKING:
        def get_preferred_path(self) -> str: ...

    def get_href(self) -> str:
        return href(self.provider.mount_path + self.provider.share_path + self.get_preferred_path())


class _ViewResource(_Href):
    """What view folders and files share: their entry, and the stored resource's properties."""

    provider: DicomfsProvider
    entry: Entry
    environ: dict[str, Any]
    path: str
    _attributes_read: dict[str, str] | None = None

    def _attributes(self) -> dict[str, str]:
        """Read once per resource: a PROPFIND asks for each named property separately."""
        if self._attributes_read is not None:
            return self._attributes_read
        if self.entry.resource_id is None:
            return {}
        try:
            cached = resource_attributes(self.provider.store, self.entry.resource_id)
        except NotFoundError:
            raise DAVError(HTTP_NOT_FOUND) from None
        self._attributes_read = cached
        return cached

    def get_property_names(self, *, is_allprop: bool) -> list[str]:
        names: list[str] = super().get_property_names(is_allprop=is_allprop)  # type: ignore[misc]
        if not is_allprop:  # allprop is RFC 4918's live properties: tags only when asked for
            names.extend(_PREFIX + name for name in self._attributes())
        return names

    def get_property_value(self, name: str) -> Any:
        if name.startswith(_PREFIX):
            value = self._attributes().get(name[len(_PREFIX):])
            if value is None:
                raise DAVError(HTTP_NOT_FOUND)
            return value
        return super().get_property_value(name)  # type: ignore[misc]

    def set_property_value(self, name: str, value: Any, *, dry_run: bool = False) -> Any:
        """User metadata and patient protection are writable; the rest of the tree is read-only."""
        resource_id = self.entry.resource_id
        local = name[len(_PREFIX):] if name.startswith(_PREFIX) else ""
        if resource_id is None or not (local.startswith(META_PREFIX) or local == PROTECTED):
            raise DAVError(HTTP_FORBIDDEN)
        if local == PROTECTED and "delete" not in self.environ.get(RIGHTS_KEY, ()):
            # lifting protection exposes a patient to recycling: as good as deleting it
            raise DAVError(HTTP_FORBIDDEN, "changing dicomfs.protected needs the delete right")
        if dry_run:
            return True
        store = self.provider.store
        text = "" if value is None else "".join(value.itertext()).strip()
        try:
            if local == PROTECTED:
                flag = protection(text)
                if flag is None:
                    raise DAVError(HTTP_FORBIDDEN, "dicomfs.protected takes 1 or 0")
                store.set_protected(resource_id, flag)
            elif value is None:
                store.delete_metadata(resource_id, local[len(META_PREFIX):])
            else:
                store.set_metadata(resource_id, local[len(META_PREFIX):], text)
        except NotFoundError as error:
            if value is not None:  # a metadata name the configuration does not define
                raise DAVError(HTTP_FORBIDDEN, str(error)) from None
            # removing a property that is not there is no error (RFC 4918 9.2)
        except DicomfsError as error:
            raise DAVError(HTTP_FORBIDDEN, str(error)) from None
        self._attributes_read = None
        self.provider.changed()
        return True

    def prevent_locking(self) -> bool:
        return False  # clients lock what they read (Office, Explorer); a lock changes nothing here

    def handle_delete(self) -> bool:
        """DELETE of an instance, series, study or patient deletes it from the store, if allowed."""
        resource_id = self.entry.resource_id
        if resource_id is None or self.entry.kind is EntryKind.DOCUMENT:
            raise DAVError(HTTP_FORBIDDEN, "only instances, series, studies and patients can be deleted")
        if not self.provider.settings.delete_allowed:
            raise DAVError(HTTP_FORBIDDEN, "deleting stored data is turned off (webdav.delete_allowed)")
        try:
            removed = self.provider.store.delete(resource_id)
        except NotFoundError:
            raise DAVError(HTTP_NOT_FOUND) from None
        self.provider.deleted(tuple(part for part in self.path.split("/") if part))
        self.provider.forget_properties(self.path)
        self.provider.log_change(self.environ, f"deleted {self.path} ({removed} instances)")
        return True

    def handle_copy(self, dest_path: str, *, depth_infinity: bool) -> bool:
        raise DAVError(HTTP_FORBIDDEN, "the views are made from the index: copy files out with GET")

    def handle_move(self, dest_path: str) -> bool:
        raise DAVError(HTTP_FORBIDDEN, "names in the views come from the DICOM tags and cannot be changed")

    def create_empty_resource(self, name: str) -> Any:
        raise DAVError(HTTP_FORBIDDEN, "files can be added only in uploads/")

    def create_collection(self, name: str) -> Any:
        raise DAVError(HTTP_FORBIDDEN, "folders can be made only in uploads/")


class ViewFolder(_ViewResource, DAVCollection):  # type: ignore[misc]
    """A folder of a view (or the root)."""

    def __init__(self, path: str, environ: dict[str, Any], entry: Entry, parts: tuple[str, ...]) -> None:
        DAVCollection.__init__(self, path, environ)
        self.entry = entry
        self.parts = parts

    def _listing(self) -> Any:
        try:
            return self.provider.tree.listing(self.parts)
        except NotFoundError:
            raise DAVError(HTTP_NOT_FOUND) from None

    def get_display_name(self) -> str:
        return self.entry.name

    def get_creation_date(self) -> float:
        return self.entry.mtime

    def get_last_modified(self) -> float:
        return self.entry.mtime

    def get_etag(self) -> None:
        return None

    def support_etag(self) -> bool:
        return False

    def get_member_names(self) -> list[str]:
        return [entry.name for entry in self._listing().entries]

    def get_member(self, name: str) -> Any:
        entry = self._listing().find(name)
        return None if entry is None else self.provider.resource_for(self.parts, entry, self.environ)

    def get_member_list(self) -> list[Any]:
        return [self.provider.resource_for(self.parts, entry, self.environ) for entry in self._listing().entries]

    def support_recursive_delete(self) -> bool:
        return True


class ViewFile(_ViewResource, DAVNonCollection):  # type: ignore[misc]
    """A stored instance (``.dcm``) or a document made from the index (``study.json``)."""

    def __init__(self, path: str, environ: dict[str, Any], entry: Entry) -> None:
        DAVNonCollection.__init__(self, path, environ)
        self.entry = entry
        self._document: bytes | None = None

    def _content(self) -> bytes:
        if self._document is None:
            try:
                self._document = self.provider.tree.document(self.entry)
            except NotFoundError:
                raise DAVError(HTTP_NOT_FOUND) from None
        return self._document

    def get_display_name(self) -> str:
        return self.entry.name

    def get_content_length(self) -> int:
        return self.entry.size

    def get_content_type(self) -> str:
        return content_type(self.entry)

    def get_creation_date(self) -> float:
        return self.entry.mtime

    def get_last_modified(self) -> float:
        return self.entry.mtime

    def support_etag(self) -> bool:
        return True

    def get_etag(self) -> str:
        return etag(self.entry, self._content)

    def support_ranges(self) -> bool:
        return True

    def get_content(self) -> io.RawIOBase | io.BytesIO:
        if self.entry.kind is EntryKind.DOCUMENT:
            try:
                reader = self.provider.tree.open_attachment(self.entry)  # streamed: it can be large
            except NotFoundError:
                raise DAVError(HTTP_NOT_FOUND) from None
            return io.BytesIO(self._content()) if reader is None else open_stream(reader)
        assert self.entry.resource_id is not None
        try:
            return open_stream(self.provider.store.open_instance(self.entry.resource_id))
        except NotFoundError:
            raise DAVError(HTTP_NOT_FOUND) from None


# -- uploads/ ------------------------------------------------------------------------------------


class UploadFolder(_Href, FolderResource):  # type: ignore[misc]
    """``uploads/`` or a folder in it: a real folder."""

    provider: DicomfsProvider

    def create_empty_resource(self, name: str) -> Any:
        self.provider.check_upload()
        _refuse_clutter(name)
        self.provider.uploads.path([*self.path.strip("/").split("/")[1:], name])  # refuses escaping names
        return super().create_empty_resource(name)

    def create_collection(self, name: str) -> None:
        self.provider.check_upload()
        self.provider.uploads.path([*self.path.strip("/").split("/")[1:], name])  # refuses escaping names
        try:
            super().create_collection(name)
        except FileExistsError:  # another client (rclone copies in parallel) made it a moment ago
            raise DAVError(HTTP_METHOD_NOT_ALLOWED, f"{name} exists already") from None

    def get_member_names(self) -> list[str]:
        """The names in the folder that a URL can carry: one that is not UTF-8 (made in the store's
        folder or the mount by a program that writes bytes) has no href, and listing it made every
        PROPFIND and GET of the folder fail. It is left out, and logged once."""
        names: list[str] = super().get_member_names()
        shown = [name for name in names if name.isascii() or _is_utf8(name)]
        if len(shown) < len(names):
            for name in names:
                if not _is_utf8(name) and name not in _HIDDEN_NAMES and len(_HIDDEN_NAMES) < 1024:
                    _HIDDEN_NAMES.add(name)
                    _log.warning("uploads: %r is not UTF-8 and cannot be shown over WebDAV; rename it in the mount",
                                 os.path.join(self._file_path, name))
        return shown

    def delete(self) -> None:
        if self.path.strip("/") == "uploads":
            raise DAVError(HTTP_FORBIDDEN, "uploads/ itself cannot be deleted")
        super().delete()
        self.provider.forget_properties(self.path)

    def handle_move(self, dest_path: str) -> bool:
        if self.path.strip("/") == "uploads":
            raise DAVError(HTTP_FORBIDDEN, "uploads/ itself cannot be moved")
        self.provider.check_in_uploads(dest_path)
        return False

    def handle_copy(self, dest_path: str, *, depth_infinity: bool) -> bool:
        self.provider.check_in_uploads(dest_path)
        return False

    def move_recursive(self, dest_path: str) -> None:
        self.provider.check_in_uploads(dest_path)
        super().move_recursive(dest_path)
        self.provider.folder_arrived(dest_path, self.environ)


class UploadFile(_Href, FileResource):  # type: ignore[misc]
    """A file in ``uploads/``: being written, waiting for ingest, or kept with its reason."""

    provider: DicomfsProvider
    _new_version: int | None = None
    """The nameless file a PUT over this one writes into, until ``end_write`` names it."""

    def get_content_type(self) -> str:
        return "application/dicom" if self.name.lower().endswith(".dcm") else super().get_content_type()

    def get_property_names(self, *, is_allprop: bool) -> list[str]:
        names: list[str] = super().get_property_names(is_allprop=is_allprop)
        if self.provider.uploads.reason(self.file_path) is not None:
            names.append(_ERROR_PROPERTY)
        return names

    def get_property_value(self, name: str) -> Any:
        if name == _ERROR_PROPERTY:
            reason = self.provider.uploads.reason(self.file_path)
            if reason is None:
                raise DAVError(HTTP_NOT_FOUND)
            return reason
        return super().get_property_value(name)

    def set_property_value(self, name: str, value: Any, *, dry_run: bool = False) -> Any:
        if name == _ERROR_PROPERTY:
            raise DAVError(HTTP_FORBIDDEN)
        if name.startswith(_WIN32) and "Win32LastModifiedTime" not in name:
            # Explorer sets these on every copy; they mean nothing here, and refusing them would
            # only make it retry. Accepted without being kept, as wsgidav does for its own files.
            return True
        return super().set_property_value(name, value, dry_run=dry_run)

    @property
    def file_path(self) -> Path:
        return Path(self._file_path)

    def get_etag(self) -> str | None:
        try:
            return str(super().get_etag())
        except FileNotFoundError:  # ingested and removed already (wsgidav asks after end_write): no ETag
            return None

    def begin_write(self, *, content_type: str | None = None) -> Any:
        self.provider.check_upload()
        _refuse_clutter(self.name)
        # A new version of a file with content goes into a new inode, named in end_write (see
        # uploads.new_version); a name just made for this PUT, or Explorer's 0-byte placeholder,
        # is written in place.
        fd = new_version(self.file_path)
        if fd is None:
            self.provider.uploads.clear_reason(self.file_path)  # Explorer's 0-byte PUT was marked empty
            return super().begin_write(content_type=content_type)
        self._new_version = fd
        return open(os.dup(fd), "wb")  # wsgidav closes this one; ``fd`` names the file in end_write

    def end_write(self, *, with_errors: bool) -> None:
        fd, self._new_version = self._new_version, None
        if fd is not None:
            try:
                if with_errors:  # the earlier version stays as it was; the part that came goes with its inode
                    return
                rename_over(fd, self.file_path)
            finally:
                os.close(fd)
            self.provider.uploads.clear_reason(self.file_path)
        self.provider.upload_written(self, with_errors=with_errors)

    def set_last_modified(self, dest_path: str, time_stamp: Any, *, dry_run: bool) -> bool:
        done: bool = super().set_last_modified(dest_path, time_stamp, dry_run=dry_run)
        if not dry_run:
            # A new date (PROPPATCH of getlastmodified, Win32LastModifiedTime) moves the file's
            # stamp on, and the queue would pass it over as being rewritten: queue it again.
            self.provider.upload_arrived(self.path, self.environ)
        return done

    def delete(self) -> None:
        super().delete()
        self.provider.upload_removed(self.path)

    def copy_move_single(self, dest_path: str, *, is_move: bool) -> None:
        target = self.provider.check_in_uploads(dest_path)
        if not is_move:
            # A COPY of a folder over a folder keeps the destination's files of the same name, and
            # wsgidav's copy2 would rewrite them in place: such a file may be in the ingest's hands
            # or be a stored instance's blob already (uploads.new_version), so it goes first.
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass
        super().copy_move_single(dest_path, is_move=is_move)
        self.provider.upload_arrived(dest_path, self.environ)

    def move_recursive(self, dest_path: str) -> None:
        self.provider.check_in_uploads(dest_path)
        super().move_recursive(dest_path)
        self.provider.upload_removed(self.path)
        self.provider.upload_arrived(dest_path, self.environ)

    def handle_copy(self, dest_path: str, *, depth_infinity: bool) -> bool:
        self.provider.check_in_uploads(dest_path)
        return False

    def handle_move(self, dest_path: str) -> bool:
        self.provider.check_in_uploads(dest_path)
        return False


class StoredUpload(_Href, DAVNonCollection):  # type: ignore[misc]
    """A file of ``uploads/`` that was stored moments ago and so is gone from the folder. For ten
    seconds its path still answers PROPFIND and HEAD with what was uploaded (size, date, ETag):
    rclone reads back every file right after its PUT and calls the copy failed ("object not found")
    if it is not there. Every other method sees a free path."""

    def __init__(self, path: str, environ: dict[str, Any], info: os.stat_result) -> None:
        super().__init__(path, environ)
        self.info = info

    def get_content_length(self) -> int:
        return self.info.st_size

    def get_content_type(self) -> str:
        return "application/dicom"

    def get_creation_date(self) -> float:
        return self.info.st_ctime

    def get_last_modified(self) -> float:
        return self.info.st_mtime

    def support_etag(self) -> bool:
        return True

    def get_etag(self) -> str:
        return f"{self.info.st_ino}-{int(self.info.st_mtime)}-{self.info.st_size}"  # as the PUT answered it (wsgidav's file ETag)

    def support_ranges(self) -> bool:
        return False

    def get_content(self) -> Any:
        raise DAVError(HTTP_NOT_FOUND)


_HIDDEN_NAMES: set[str] = set()
"""Names not UTF-8 already logged (bounded: a folder of them must not grow this without end)."""


def _is_utf8(name: str) -> bool:
    """Whether a name read from the file system was UTF-8 (Python keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_clutter(name: str) -> None:
    """Finder's ``._name`` and ``.DS_Store``, Explorer's ``desktop.ini``: refused, never ingested."""
    if is_os_junk(name):
        raise DAVError(HTTP_FORBIDDEN, f"{name} is operating-system clutter, not DICOM: not uploaded")
