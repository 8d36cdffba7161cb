"""The FUSE operations: the views' tree and the uploads folder, served through pyfuse3 on trio.

Where the work runs (the trio loop must never stall):

- answers from caches (a cached listing, an open handle's mmap, a document's bytes) run on the loop;
- everything that may touch LMDB or the disk (a listing not yet cached, opening a blob,
  decompressing, writing an upload, deleting, ingesting) runs in a thread under ``limiter``.

Reads of uncompressed instances return a ``memoryview`` of the blob mapped in memory: no thread
hop per 128 KiB request (a hop per request cut a bare pyfuse3 file system from ~1.2 to ~0.3 GB/s
on this kind of machine). Stored instances never change, so open files keep the kernel's page
cache and entries live 300 s; ``apply_changes`` invalidates what ingests and deletes change.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import mmap
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import pyfuse3
import trio

from dicomfs.errors import DicomfsError, NotFoundError
from dicomfs.mount.diskpressure import DiskPressure
from dicomfs.mount.guard import answer_errors
from dicomfs.mount.inodes import ROOT_INODE, InodeTable, Node
from dicomfs.store import Instance, Store
from dicomfs.store.blobs import BlobReader
from dicomfs.upload_queue import UploadQueue
from dicomfs.uploads import ERROR_XATTR, UploadArea, UploadOutcome, new_version, rename_over
from dicomfs.views import JOBS, UPLOADS, Entry, EntryKind, Listing, NotAFolderError, Tree
from dicomfs.views.names import MAX_NAME_BYTES
from dicomfs.views.tags import META_PREFIX, PROTECTED, protection, resource_attributes

__all__ = ["DicomOperations", "MountSettings"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_VIEW_TIMEOUT = 300.0
"""Stored data never changes in place; what does change is invalidated explicitly."""
_UPLOAD_TIMEOUT = 1.0
_BLOCK = 128 * 1024
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
_VANISHED_KEPT = 10_000
_BUILT_ENTRIES_KEPT = 100_000
"""Entries kept built for opendir (~0.4 kB each): the folders walked last, ~40 MB at most."""
_VANISHED_SECONDS = 10.0
"""How long a folder emptied by a delete still answers lookups (as an empty folder), so that
`rm -r`, which removes the files first, can remove the folder too."""
_XATTR = "user."
_META_PREFIX, _PROTECTED = _XATTR + META_PREFIX, _XATTR + PROTECTED


@dataclass(frozen=True)
class MountSettings:
    read_only: bool = False
    delete_allowed: bool = True
    uid: int = field(default_factory=os.getuid)
    gid: int = field(default_factory=os.getgid)
    shared: bool = False
    """Other local users reach the mount (``--allow-other``): the kernel checks the modes shown
    (``default_permissions``), so the group may read and upload and everyone else may do nothing."""


@dataclass
class _Handle:
    node: Node
    reader: BlobReader | None = None
    mapped: mmap.mmap | None = None
    content: bytes | None = None
    fd: int = -1
    written: bool = False
    failed: OSError | None = None
    """Why a write into the upload failed: the file is not whole, so it is kept with the reason."""


@dataclass
class _Folder:
    """An open folder: its entries as they were at opendir, so offsets stay stable."""

    node: Node
    entries: list[tuple[str, Node, pyfuse3.EntryAttributes]]


@answer_errors
class DicomOperations(pyfuse3.Operations):
    """pyfuse3 operations over one store's tree and uploads folder; no exception escapes a
    handler (``answer_errors``), so the handlers below raise what they meet and let it be mapped."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, store: Store, tree: Tree, uploads: UploadArea | None, settings: MountSettings,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        super().__init__()
        self.store, self.tree, self.uploads, self.settings = store, tree, uploads, settings
        self.limiter = limiter or trio.CapacityLimiter(8)
        self.disk = DiskPressure()
        self.inodes = InodeTable()
        self._handles: dict[int, _Handle] = {}
        self._folders: dict[int, _Folder] = {}
        # folder inode -> (the listing, its entries as opendir gives them): see _folder_entries
        self._built: collections.OrderedDict[int, tuple[Listing, list[tuple[str, Node, pyfuse3.EntryAttributes]]]] = \
            collections.OrderedDict()
        self._built_entries = 0
        self._next_fh = 1
        self._writers: dict[int, int] = {}  # upload inode -> open write handles
        self._renewing = trio.Lock()  # held from deciding that a change renews a file until it is counted
        self._nursery: trio.Nursery | None = None
        self._last_change = tree.change_number
        # Folders that vanished with their last instance, by (parent inode, name): `rm -r` still
        # removes them after their files, and must hear that it succeeded.
        self._changes_lock = trio.Lock()
        self._vanished: collections.OrderedDict[tuple[int, str], Node] = collections.OrderedDict()
        self._queue: UploadQueue | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._refresh_pending = False

    def attach(self, nursery: trio.Nursery) -> None:
        """Start ingesting finished uploads; what follows an ingest runs in ``nursery``."""
        self._nursery = nursery
        self._trio_token = trio.lowlevel.current_trio_token()
        if self.uploads is not None and not self.settings.read_only:
            # One thread ingests every upload closed meanwhile in one group commit: `cp -r` of a
            # CD closes files one after another, and a sync per file would cap it near 200 files/s.
            self._queue = UploadQueue(self.store, self.uploads, origin="fuse", on_done=self._from_queue)

    def detach(self) -> None:
        """Ingest what is queued and stop the ingest thread (the loop has ended)."""
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def adopt_leftovers(self, open_now: set[tuple[str, ...]]) -> None:
        """Queue complete-looking uploads nobody queued: a front end answered for them and died
        first (``UploadQueue.adopt_leftovers``). ``open_now`` are those open here. May walk
        uploads/: call it from a thread."""
        if self._queue is not None:
            self._queue.adopt_leftovers(busy=open_now)

    def queued_uploads(self) -> set[tuple[str, ...]]:
        """Uploads queued or being ingested (the janitor leaves them alone)."""
        return self._queue.busy() if self._queue is not None else set()

    async def _thread(self, function: Callable[..., _T], *args: Any) -> _T:
        return await trio.to_thread.run_sync(function, *args, limiter=self.limiter)

    async def _upload_call(self, function: Callable[..., _T], *args: Any) -> _T:
        """A small file operation in uploads/ (a stat, a create, a mkdir, a write into the page
        cache, a close): on the loop while the disk keeps up, where it costs less than a thread
        hop; on a thread while the disk lags and it may block (see diskpressure). Opening an
        existing upload, renaming, removing and truncating always take a thread: each may free a
        large file's blocks, which takes long on a quiet disk too."""
        if self.disk.busy:
            return await self._thread(function, *args)
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.disk.took(time.perf_counter() - started)

    # -- attributes --------------------------------------------------------------------------------

    def _attributes(self, node: Node, size: int, mtime: float, is_folder: bool) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = node.inode
        in_uploads = node.kind == "upload" or node.path == (UPLOADS,)
        writable = not self.settings.read_only and (in_uploads or self.settings.delete_allowed) and node.kind != "document"
        attributes.st_mode = self._mode(is_folder, writable, group_writes=writable and in_uploads)
        if is_folder:
            attributes.st_nlink = 2
            attributes.st_size = 0
        else:
            attributes.st_nlink = 4 if node.kind == "instance" else 1  # one name in each view
            attributes.st_size = size
        attributes.st_blksize = _BLOCK
        attributes.st_blocks = (size + 511) // 512
        attributes.st_uid, attributes.st_gid = self.settings.uid, self.settings.gid
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = int(mtime * 1e9)
        # uploads/ and jobs/ change without a store change the kernel would hear of: short timeouts
        timeout = _UPLOAD_TIMEOUT if node.kind == "upload" or node.path[:1] == (JOBS,) else _VIEW_TIMEOUT
        attributes.entry_timeout = attributes.attr_timeout = timeout
        return attributes

    def _mode(self, is_folder: bool, writable: bool, *, group_writes: bool) -> int:
        """The file type and permission bits shown. Unshared, only the owner reaches the mount and
        the bits only inform. Shared, they are the rights: the group reads everything and writes
        in uploads/ (never deletes stored data: that is writing a view folder), others get nothing."""
        kind = stat.S_IFDIR if is_folder else stat.S_IFREG
        read = 0o5 if is_folder else 0o4
        owner = read | (0o2 if writable else 0)
        if not self.settings.shared:
            return kind | owner << 6 | read << 3 | read
        return kind | owner << 6 | (read | (0o2 if group_writes else 0)) << 3

    def _entry_attributes(self, node: Node, entry: Entry) -> pyfuse3.EntryAttributes:
        return self._attributes(node, entry.size, entry.mtime, entry.is_folder)

    def _upload_attributes(self, node: Node, info: os.stat_result) -> pyfuse3.EntryAttributes:
        return self._attributes(node, info.st_size, info.st_mtime, stat.S_ISDIR(info.st_mode))

    # -- finding things ------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self.inodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def _listing(self, path: tuple[str, ...]) -> Listing:
        cached = self.tree.cached(path)
        return cached if cached is not None else await self._thread(self.tree.listing, path)

    async def _lookup(self, path: tuple[str, ...]) -> Entry | None:
        """The entry at ``path``, or None; from its folder's listing when that is cached (no thread),
        else through Tree.lookup, which finds a by-uids study without listing every study."""
        cached = self.tree.cached(path[:-1])
        if cached is not None:
            return cached.find(path[-1])
        try:
            return await self._thread(self.tree.lookup, path)
        except NotAFolderError:
            raise
        except NotFoundError:
            return None

    async def _child(self, parent: Node, name: str) -> tuple[Node, pyfuse3.EntryAttributes]:
        """The node and attributes of ``name`` in ``parent``; FUSEError(ENOENT) when there is none."""
        if parent.kind == "upload":
            return await self._upload_child(parent, name)
        if parent.kind != "folder":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            entry = await self._lookup((*parent.path, name))
        except NotAFolderError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except NotFoundError:  # the parent went too (its last instance was deleted)
            entry = None
        if entry is None:
            vanished = self._vanished.get((parent.inode, name))
            if vanished is not None and self._just_vanished(vanished):
                attributes = self._attributes(vanished, 0, time.time(), vanished.kind == "folder")
                attributes.entry_timeout = attributes.attr_timeout = 0
                return vanished, attributes
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self._node_for_entry(parent, entry)
        return node, self._entry_attributes(node, entry)

    def _node_for_entry(self, parent: Node, entry: Entry) -> Node:
        path = (*parent.path, entry.name)
        if entry.node == ("uploads",):
            return self.inodes.node_for(parent.inode, path, "upload")
        kind = {EntryKind.FOLDER: "folder", EntryKind.INSTANCE: "instance", EntryKind.DOCUMENT: "document"}[entry.kind]
        return self.inodes.node_for(parent.inode, path, kind, entry.resource_id)

    async def _upload_child(self, parent: Node, name: str) -> tuple[Node, pyfuse3.EntryAttributes]:
        if self.uploads is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = (*parent.path, name)
        info = await self._upload_call(os.lstat, self._upload_path(path))
        node = self.inodes.node_for(parent.inode, path, "upload")
        return node, self._upload_attributes(node, info)

    def _upload_path(self, path: Sequence[str]) -> Path:
        assert self.uploads is not None
        try:
            return self.uploads.path(path[1:])
        except DicomfsError:
            raise pyfuse3.FUSEError(errno.EACCES) from None

    async def _entry_of(self, node: Node) -> Entry:
        """The current entry of a view node (folders, instances, documents)."""
        if node.inode == ROOT_INODE:
            return self.tree.root_entry()
        try:
            entry = await self._lookup(node.path)
        except NotFoundError:  # a folder on the way is a file now
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        if entry is None or (entry.resource_id or None) != node.resource_id:
            if node.kind == "instance" and node.resource_id:  # shown elsewhere, or still open after a delete
                record = await self._thread(self.store.find, node.resource_id)
                if isinstance(record, Instance):
                    return Entry(node.path[-1], EntryKind.INSTANCE, record.size, record.received, (), record.id)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    # -- lookups -------------------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, attributes = await self._child(self._node(parent_inode), _name(name))
        self.inodes.looked_up(node)
        return attributes

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind == "upload":
            return self._upload_attributes(node, await self._upload_call(os.lstat, self._upload_path(node.path)))
        try:
            return self._entry_attributes(node, await self._entry_of(node))
        except pyfuse3.FUSEError:
            if not self._just_vanished(node):
                raise
            attributes = self._attributes(node, 0, time.time(), node.kind == "folder")
            attributes.attr_timeout = 0
            return attributes

    def _remember_vanished(self, node: Node, parent: int, name: str) -> None:
        node.vanished_at = trio.current_time()
        self._vanished[(parent, name)] = node
        if len(self._vanished) > _VANISHED_KEPT:
            self._vanished.popitem(last=False)

    def _just_vanished(self, node: Node) -> bool:
        return trio.current_time() - node.vanished_at < _VANISHED_SECONDS

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)

    # -- folders -------------------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.kind == "upload":
            entries = await self._upload_entries(node)
        elif node.kind == "folder":
            try:
                listing = await self._listing(node.path)
            except NotFoundError:
                if not self._just_vanished(node):
                    raise pyfuse3.FUSEError(errno.ENOENT) from None
                listing = Listing.of([], 0.0)  # emptied by a delete a moment ago: `rm -r` lists it once more
            entries = self._folder_entries(node, listing)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._new_fh()
        self._folders[fh] = _Folder(node, entries)
        return fh

    def _folder_entries(self, node: Node, listing: Listing) -> list[tuple[str, Node, pyfuse3.EntryAttributes]]:
        """The entries of a view folder, with their nodes and attributes.

        Made once per listing: a listing is a new object whenever the folder changed, and
        building ~1,000 attributes took a quarter of the time `find` spent in a second walk. A
        node the kernel forgot meanwhile makes them anew (its inode may be given again)."""
        known = self._built.get(node.inode)
        if known is not None and known[0] is listing and all(self.inodes.get(n.inode) is n for _, n, _ in known[1]):
            self._built.move_to_end(node.inode)
            return known[1]
        entries = []
        for entry in listing.entries:
            child = self._node_for_entry(node, entry)
            if entry.node == ("uploads",):
                attributes = self._attributes(child, 0, entry.mtime, True)
            else:
                attributes = self._entry_attributes(child, entry)
            entries.append((entry.name, child, attributes))
        if known is not None:
            self._built_entries -= len(known[1])
        self._built[node.inode] = (listing, entries)
        self._built.move_to_end(node.inode)
        self._built_entries += len(entries)
        while self._built_entries > _BUILT_ENTRIES_KEPT and len(self._built) > 1:
            self._built_entries -= len(self._built.popitem(last=False)[1][1])
        return entries

    async def _upload_entries(self, node: Node) -> list[tuple[str, Node, pyfuse3.EntryAttributes]]:
        folder = self._upload_path(node.path)

        def scan() -> list[tuple[str, os.stat_result]]:
            with os.scandir(folder) as found:
                return sorted((e.name, e.stat(follow_symlinks=False)) for e in found)

        scanned = await self._thread(scan)
        entries = []
        for name, info in scanned:
            child = self.inodes.node_for(node.inode, (*node.path, name), "upload")
            entries.append((name, child, self._upload_attributes(child, info)))
        return entries

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = self._folders[fh]
        for position in range(start_id, len(folder.entries)):
            name, node, attributes = folder.entries[position]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, position + 1):
                break
            self.inodes.looked_up(node)

    async def releasedir(self, fh: int) -> None:
        self._folders.pop(fh, None)

    # -- reading -------------------------------------------------------------------------------------

    def _new_fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        writing = flags & _WRITING
        if node.kind == "upload":
            return await self._open_upload(node, flags)
        if writing:
            raise pyfuse3.FUSEError(errno.EROFS if self.settings.read_only else errno.EACCES)
        handle = _Handle(node)
        if node.kind == "document":
            entry = await self._entry_of(node)
            # an attachment streams from the store (it can be large); a document is made whole
            handle.reader = await self._thread(self.tree.open_attachment, entry)
            if handle.reader is None:
                handle.content = await self._thread(self.tree.document, entry)
            fh = self._new_fh()
            self._handles[fh] = handle
            # A job's file grows as the job runs: direct I/O reads what it holds now, whatever
            # size the kernel last saw.
            return pyfuse3.FileInfo(fh=fh, direct_io=node.path[:1] == (JOBS,), keep_cache=False)
        if node.kind != "instance" or node.resource_id is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        try:
            # On the loop: one LMDB read, an open and an mmap take ~30 us, and a thread hop per
            # open cost more than that (0.6 ms per open and close was measured with one).
            handle.reader, handle.mapped = self._open_blob(node.resource_id)
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        fh = self._new_fh()
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _open_blob(self, resource_id: str) -> tuple[BlobReader, mmap.mmap | None]:
        reader = self.store.open_instance(resource_id)
        if reader.compressed or reader.size == 0:
            return reader, None
        return reader, mmap.mmap(reader.fd, reader.size, access=mmap.ACCESS_READ)

    # pyfuse3 takes any buffer (its stub says bytes): a memoryview of the mapped blob is never copied here.
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        handle = self._handles[fh]
        if handle.mapped is not None:
            return memoryview(handle.mapped)[off:off + size]
        if handle.content is not None:
            return handle.content[off:off + size]
        if handle.fd >= 0:
            return await self._thread(os.pread, handle.fd, size, off)
        assert handle.reader is not None
        return await self._thread(handle.reader.read, off, size)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        if handle.mapped is not None:
            handle.mapped.close()
        if handle.reader is not None:
            handle.reader.close()
        if handle.fd >= 0:
            await self._upload_closed(handle)

    # -- uploads -------------------------------------------------------------------------------------

    def _check_upload_write(self, parent: Node) -> None:
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.uploads is None or parent.kind != "upload":
            raise pyfuse3.FUSEError(errno.EACCES)

    def _renews(self, node: Node | None) -> bool:
        """Whether a change to the upload ``node`` goes into a new inode (uploads.new_version):
        nobody writes it, so it is complete, and may be in the ingest's hands or be a stored
        instance's blob already. A file still being written is changed in place, as asked.
        Decide under ``_renewing``, and count the writer before letting it go."""
        return not (node is not None and self._writers.get(node.inode))

    async def _open_upload(self, node: Node, flags: int) -> pyfuse3.FileInfo:
        writing = flags & _WRITING
        if writing and self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        open_flags = writing | os.O_CLOEXEC
        real = self._upload_path(node.path)
        if not writing:
            fd = await self._thread(os.open, real, open_flags)
        else:
            async with self._renewing:  # two writers of a complete file must share one new inode
                fd = await self._thread(_open_new_version if self._renews(node) else os.open, real, open_flags)
                self._writers[node.inode] = self._writers.get(node.inode, 0) + 1
        handle = _Handle(node, fd=fd, written=bool(writing))
        fh = self._new_fh()
        self._handles[fh] = handle
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        self._check_upload_write(parent)
        path = (*parent.path, _name(name))
        real = self._upload_path(path)
        open_flags = (flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_EXCL)) | os.O_CREAT | os.O_CLOEXEC
        try:
            fd, info = await self._upload_call(_create, real, open_flags | os.O_EXCL)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            # An existing name: truncating or replacing it may free a large file's blocks.
            async with self._renewing:
                fd, info = await self._thread(_create, real, open_flags, self._renews(self.inodes.at(path)))
        node = self.inodes.node_for(parent.inode, path, "upload")
        self.inodes.looked_up(node)
        self._writers[node.inode] = self._writers.get(node.inode, 0) + 1
        fh = self._new_fh()
        self._handles[fh] = _Handle(node, fd=fd, written=True)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=False), self._upload_attributes(node, info)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if handle.fd < 0:
            raise pyfuse3.FUSEError(errno.EBADF)
        try:
            if len(buf) <= _BLOCK:
                return await self._upload_call(_pwrite_all, handle.fd, buf, off)
            return await self._thread(_pwrite_all, handle.fd, buf, off)
        except OSError as error:  # the guard answers its errno; the close records why the upload failed
            handle.failed = error
            raise

    async def _upload_closed(self, handle: _Handle) -> None:
        """Close an upload's file. Closed by its last writer, it is complete: queue it for ingest."""
        complete = None
        if handle.written:
            inode = handle.node.inode
            self._writers[inode] -= 1
            if self._writers[inode] == 0:
                del self._writers[inode]
                complete = handle.node.path[1:]
        await self._upload_call(self._close_upload, handle.fd, complete, handle.failed)

    def _close_upload(self, fd: int, complete: tuple[str, ...] | None, failed: OSError | None) -> None:
        os.close(fd)
        if complete is None or self._queue is None:
            return
        if failed is None:
            self._queue.submit(complete)  # stats the file, hence here and not before the call
            return
        assert self.uploads is not None
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing left to explain
            self.uploads.write_failed(self.uploads.path(complete), failed)

    def _from_queue(self, reports: list[tuple[tuple[str, ...], UploadOutcome]]) -> None:
        """The ingest thread's report of a group, carried into the trio loop without waiting for
        it (a wait held up the next group), in one wake-up of the loop for the whole group."""
        if self._trio_token is None:
            return
        try:
            self._trio_token.run_sync_soon(self._uploaded, reports)
        except trio.RunFinishedError:
            pass  # unmounting: the kernel forgets everything anyway

    def _uploaded(self, reports: list[tuple[tuple[str, ...], UploadOutcome]]) -> None:
        for parts, outcome in reports:
            try:
                node = self.inodes.at((UPLOADS, *parts))
                if outcome.removed and node is not None:
                    self._drop_names(node, vanished=False)
            except Exception:  # raised here, in a run_sync_soon callback, it would end the loop
                _log.exception("after the ingest of uploads/%s", "/".join(parts))
        try:
            if not self._refresh_pending and self._nursery is not None:
                self._refresh_pending = True  # one refresh for the group (and any that follow before it runs)
                self._nursery.start_soon(self._refresh_after_ingest)
        except Exception:
            _log.exception("cannot refresh the tree after an ingest of %d uploads", len(reports))

    async def _refresh_after_ingest(self) -> None:
        self._refresh_pending = False
        await self.apply_changes()

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        self._check_upload_write(parent)
        path = (*parent.path, _name(name))
        info = await self._upload_call(_make_folder, self._upload_path(path))
        node = self.inodes.node_for(parent.inode, path, "upload")
        self.inodes.looked_up(node)
        return self._upload_attributes(node, info)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.kind != "upload":
            raise pyfuse3.FUSEError(errno.EROFS if self.settings.read_only else errno.EPERM)
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        real = self._upload_path(node.path)

        def apply(complete: bool) -> os.stat_result:
            if fields.update_size:
                _resize(real, attr.st_size, renew=complete)
            if fields.update_mode:
                os.chmod(real, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                info = os.lstat(real)
                atime = attr.st_atime_ns if fields.update_atime else info.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else info.st_mtime_ns
                os.utime(real, ns=(atime, mtime))
            info = os.lstat(real)
            if complete and self._queue is not None and stat.S_ISREG(info.st_mode):
                # Changed while nobody writes it (`touch`, `truncate`): complete again. Queued
                # before, it would now be passed over as being rewritten (its stamp moved on).
                self._queue.submit(node.path[1:], info=info)
            return info

        # A new size may renew the file: decided and done under the lock, as a writing open is.
        async with self._renewing if fields.update_size else contextlib.nullcontext():
            return self._upload_attributes(node, await self._thread(apply, self._renews(node)))

    # Links and device nodes, anywhere: a link in uploads/ would have the ingest read whatever it
    # points at (/etc/shadow included), and the views are named by the store. EPERM is what
    # link(2) and symlink(2) answer on a file system that has no such things (ENOSYS, pyfuse3's
    # default, reads as a broken kernel to most tools).

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS if self.settings.read_only else errno.EPERM)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS if self.settings.read_only else errno.EPERM)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS if self.settings.read_only else errno.EPERM)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        old_parent, new_parent = self._node(parent_inode_old), self._node(parent_inode_new)
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if old_parent.kind != "upload" or new_parent.kind != "upload" or self.uploads is None:
            raise pyfuse3.FUSEError(errno.EPERM)  # stored data is named by its tags, not by users
        old = (*old_parent.path, _name(name_old))
        new = (*new_parent.path, _name(name_new))
        await self._thread(os.rename, self._upload_path(old), self._upload_path(new))
        moved = self.inodes.at(old)
        if moved is not None:
            self.inodes.move(moved, old, new, new_parent.inode)
        if self._queue is not None:
            writing = {node.path for inode in self._writers if (node := self.inodes.get(inode)) is not None}
            await self._thread(self._queue_moved, new, writing)

    def _queue_moved(self, path: tuple[str, ...], writing: set[tuple[str, ...]]) -> None:
        """Queue the complete files a rename brought to ``path`` (a file, or a folder's files):
        rsync renames each file once written, `mv` moves a folder of them, and by their turn the
        names they were queued under are gone, so nothing else would queue them until a janitor
        pass. Files still open for writing (``writing``) are queued when their writer closes them."""
        assert self._queue is not None and self.uploads is not None
        for parts in self.uploads.files_at(path[1:]):
            if (UPLOADS, *parts) not in writing:
                self._queue.submit(parts)

    # -- deleting ------------------------------------------------------------------------------------

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._to_remove(self._node(parent_inode), _name(name), os.unlink)
        if node is None:
            return
        if node.kind != "instance":
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind == "folder" else errno.EPERM)
        await self._delete(node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = await self._to_remove(self._node(parent_inode), _name(name), os.rmdir)
        if node is None:
            return
        if node.kind != "folder" or len(node.path) == 1:
            raise pyfuse3.FUSEError(errno.EPERM)
        if (await self._listing(node.path)).entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)

    async def _to_remove(self, parent: Node, name: str, remove_upload: Callable[[Path], None]) -> Node | None:
        """The stored node an unlink or rmdir names; None when nothing is left to do.

        In uploads/ the real file or folder is removed here. Elsewhere a name that went with a
        delete a moment ago counts as removed: `rm -r` deletes the files first, and the folder
        (or study.json) went with its last instance.
        """
        if parent.kind == "upload":
            self._check_upload_write(parent)
            await self._thread(remove_upload, self._upload_path((*parent.path, name)))
            return None
        self._check_delete()
        vanished = self._vanished.pop((parent.inode, name), None)
        if vanished is not None and self._just_vanished(vanished):
            return None
        node, _ = await self._child(parent, name)
        return node

    def _check_delete(self) -> None:
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self.settings.delete_allowed:
            raise pyfuse3.FUSEError(errno.EACCES)

    async def _delete(self, node: Node) -> None:
        self._check_delete()
        assert node.resource_id is not None
        try:
            await self._thread(self.store.delete, node.resource_id)
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        _log.info("deleted instance %s (%s)", node.resource_id, "/".join(node.path))
        await self.apply_changes()

    # -- extended attributes ---------------------------------------------------------------------------

    async def _xattrs(self, node: Node) -> dict[str, str]:
        if node.kind == "upload":
            if self.uploads is None:
                return {}
            reason = await self._thread(self.uploads.reason, self._upload_path(node.path))
            return {ERROR_XATTR: reason} if reason else {}
        if node.resource_id is None:
            return {}
        resource_id = node.resource_id

        def gather() -> dict[str, str]:
            return {_XATTR + name: value for name, value in resource_attributes(self.store, resource_id).items()}

        try:
            return await self._thread(gather)
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [name.encode() for name in await self._xattrs(self._node(inode))]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # `ls -l` asks every entry for security.selinux and the POSIX ACLs. "Not supported"
            # (not "no such attribute") makes coreutils stop asking for the rest of the device:
            # two requests per entry cost `ls -l` of 1,000 instances ~150 ms. Like s3ql's ACLs.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        value = (await self._xattrs(self._node(inode))).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8")

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node, key = self._node(inode), os.fsdecode(name)
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.resource_id is None or node.kind == "upload":
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        text = value.decode("utf-8", "replace").strip()
        resource_id = node.resource_id
        try:
            if key == _PROTECTED:
                flag = protection(text)
                if flag is None:
                    raise pyfuse3.FUSEError(errno.EINVAL)
                await self._thread(self.store.set_protected, resource_id, flag)
            elif key.startswith(_META_PREFIX):
                await self._thread(self.store.set_metadata, resource_id, key[len(_META_PREFIX):], text)
            else:
                raise pyfuse3.FUSEError(errno.ENOTSUP)
        except DicomfsError as error:
            _log.info("setxattr %s on %s refused: %s", key, "/".join(node.path), error)
            raise pyfuse3.FUSEError(errno.EPERM if error.errno in (errno.EACCES, errno.EPERM) else errno.EINVAL) from None
        await self.apply_changes()

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node, key = self._node(inode), os.fsdecode(name)
        if self.settings.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.resource_id is None or not key.startswith(_META_PREFIX):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        try:
            await self._thread(self.store.delete_metadata, node.resource_id, key[len(_META_PREFIX):])
        except NotFoundError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
        except DicomfsError:
            raise pyfuse3.FUSEError(errno.EPERM) from None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = await self._thread(os.statvfs, self.store.folder)
        data = pyfuse3.StatvfsData()
        data.f_bsize, data.f_frsize = info.f_bsize, info.f_frsize
        data.f_blocks, data.f_bfree, data.f_bavail = info.f_blocks, info.f_bfree, info.f_bavail
        data.f_files, data.f_ffree, data.f_favail = info.f_files, info.f_ffree, info.f_favail
        data.f_namemax = 255
        return data

    def open_uploads(self) -> list[Node]:
        """Upload files open for writing (the janitor leaves them alone)."""
        return [h.node for h in self._handles.values() if h.fd >= 0 and h.written]

    def forget_uploads(self, removed: list[Path]) -> None:
        """The janitor removed these from uploads/: tell the kernel."""
        assert self.uploads is not None
        for path in removed:
            node = self.inodes.at((UPLOADS, *path.relative_to(self.uploads.root).parts))
            if node is not None:
                self._drop_names(node, vanished=False)

    # -- changes ---------------------------------------------------------------------------------------

    async def apply_changes(self) -> None:
        """Bring the tree up to the store and tell the kernel what went away or changed.

        Removed resources: every name the kernel knows them by is invalidated. Changed ones: their
        attributes (folders: new children, metadata) or contents (a replaced instance). Folders
        that lost something are checked, with their known children, since they may be gone too
        or a freed name may now belong to another resource.
        """
        async with self._changes_lock:  # a delete returns only once its invalidations are done
            await self._apply_changes()

    async def _apply_changes(self) -> None:
        if not await self._thread(self.tree.refresh):
            return
        since, self._last_change = self._last_change, self.tree.change_number
        changes = await self._thread(self.store.changes_since, since)
        affected: list[int] = []  # folders whose listing lost something
        stale: list[tuple[int, bool]] = []  # (inode, attributes only) for the kernel to drop
        for op, _, resource_id in changes:
            for node in self.inodes.with_resource(resource_id):
                if op == "-":
                    affected.extend(self._drop_names(node))
                else:  # new children or metadata; for an instance, replaced bytes
                    stale.append((node.inode, node.kind != "instance"))
        if stale:
            await self._thread(_invalidate_inodes, stale)
        # A folder that lost something may be gone itself (a by-dates month with its last study),
        # and a name freed by a delete may now belong to a sibling: check what the kernel knows.
        checked: set[int] = set()
        while affected:
            folder = affected.pop()
            if folder in checked:
                continue
            checked.add(folder)
            for known in [self.inodes.get(folder), *self.inodes.children(folder)]:
                if known is None or known.kind in ("instance", "upload") or known.inode == ROOT_INODE:
                    continue  # instances are told apart by their ids; uploads are real files
                try:
                    current: Entry | None = await self._entry_of(known)
                except pyfuse3.FUSEError:
                    current = None
                if current is None or current.resource_id != known.resource_id:
                    affected.extend(self._drop_names(known, vanished=current is None))

    def _drop_names(self, node: Node, *, vanished: bool = True) -> list[int]:
        """Tell the kernel every name of ``node`` is gone; returns the parents that lost one.

        With ``vanished``, a folder or document stays answerable for a moment (see ``_to_remove``).
        """
        parents = []
        for parent, name in list(node.links):
            self.inodes.unlink(node, parent, name)
            # notify_delete refuses a folder the kernel still knows children of (ENOTEMPTY)
            deleted = 0 if node.kind == "folder" else node.inode
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), deleted=deleted, ignore_enoent=True)
            if vanished and node.kind in ("folder", "document"):
                self._remember_vanished(node, parent, name)
            parents.append(parent)
        return parents


def _invalidate_inodes(stale: list[tuple[int, bool]]) -> None:
    """Blocks while the kernel drops cached pages (hence run in a thread)."""
    for inode, attr_only in stale:
        try:
            pyfuse3.invalidate_inode(inode, attr_only)
        except FileNotFoundError:
            # The kernel forgot the inode already (its forget is on its way to us): nothing
            # cached to drop. Raised inside a request handler (an unlink applying its changes)
            # it ended pyfuse3's main loop with that request unanswered, and the mount hung.
            continue


def _name(name: bytes) -> str:
    """A name from the kernel as a str: bytes that are not UTF-8 kept as surrogates (a real file
    in uploads/ may have them; no view name has), ENAMETOOLONG past 255 bytes, as ext4 answers
    (FUSE passes names of up to 1,024 bytes; statfs promises 255)."""
    if len(name) > MAX_NAME_BYTES:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    return os.fsdecode(name)


def _make_folder(path: Path) -> os.stat_result:
    os.mkdir(path, 0o755)
    return os.lstat(path)


def _create(path: Path, flags: int, renew: bool = False) -> tuple[int, os.stat_result]:
    """Open ``path`` with ``flags`` (which hold O_CREAT) and stat it; ``renew``: an existing file
    gets a new inode (``_open_new_version``)."""
    fd = _open_new_version(path, flags) if renew else os.open(path, flags, 0o644)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _open_new_version(path: Path, flags: int) -> int:
    """A writing open of the complete upload ``path``: a new inode under its name, empty for
    O_TRUNC and a copy of the file otherwise, where the old one may be in the ingest's hands or
    in the store (``uploads.new_version``); else the open as asked."""
    fd = new_version(path, flags, keep=0 if flags & os.O_TRUNC else None)
    if fd is None:
        return os.open(path, flags, 0o644)
    try:
        rename_over(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resize(path: Path, size: int, *, renew: bool) -> None:
    """Truncate or extend the upload ``path``; ``renew``: into a new inode, as ``_open_new_version``."""
    fd = new_version(path, keep=size) if renew else None
    if fd is None:
        os.truncate(path, size)
        return
    try:
        os.ftruncate(fd, size)
        rename_over(fd, path)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return len(data)
