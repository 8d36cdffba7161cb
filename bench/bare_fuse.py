"""A bare pyfuse3 file system over a plain folder: the floor under any pyfuse3 mount.

Run by ``bench/fuse.py`` beside dicomfs, never by the product::

    python bench/bare_fuse.py SOURCE MOUNTPOINT [--writable]

It serves SOURCE as it is when it starts, from memory: every name, size and time is read once,
then lookups, attributes and listings are answered from dictionaries, with the attribute and
entry timeouts dicomfs gives its views (300 s; 1 s with ``--writable``, as dicomfs's
``uploads/``), and reads are slices of an mmap of the file (dicomfs's read path without the
store). With ``--writable`` files and folders may be created and written, straight into SOURCE,
on the event loop, as dicomfs's ``uploads/`` does, and nothing is ingested. Extended attributes
outside ``user.`` are refused as dicomfs refuses them. No cache, index or thread hop of dicomfs's is
here: what this takes per request is what pyfuse3, trio and the kernel take, so dicomfs's figures
against it say how much of their cost is dicomfs's own. The mount has dicomfs's options
(pyfuse3's defaults, ``auto_unmount``); it prints ``ready`` once mounted and unmounts on SIGTERM.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

VIEW_TIMEOUT, WRITABLE_TIMEOUT = 300.0, 1.0


@dataclass
class Node:
    path: Path
    info: os.stat_result
    children: dict[bytes, int] = field(default_factory=dict)  # folders only: name -> inode
    entries: list[tuple[bytes, pyfuse3.EntryAttributes]] | None = None  # the listing, made once


class BareOperations(pyfuse3.Operations):
    def __init__(self, source: Path, *, writable: bool) -> None:
        super().__init__()
        self.writable = writable
        self.timeout = WRITABLE_TIMEOUT if writable else VIEW_TIMEOUT
        self.nodes: dict[int, Node] = {}
        self.open_files: dict[int, mmap.mmap | int] = {}  # fh -> mapping (reading) or fd (writing)
        self.next_fh = 1
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self.nodes[pyfuse3.ROOT_INODE] = Node(source, os.lstat(source))
        self._mirror(pyfuse3.ROOT_INODE)

    def _mirror(self, inode: int) -> None:
        folder = self.nodes[inode]
        for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
            child = self._add(inode, os.fsencode(entry.name), Path(entry.path), entry.stat(follow_symlinks=False))
            if entry.is_dir(follow_symlinks=False):
                self._mirror(child)

    def _add(self, parent: int, name: bytes, path: Path, info: os.stat_result) -> int:
        inode, self.next_inode = self.next_inode, self.next_inode + 1
        self.nodes[inode] = Node(path, info)
        self.nodes[parent].children[name] = inode
        self.nodes[parent].entries = None
        return inode

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        info = self.nodes[inode].info
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = inode
        attributes.st_mode = info.st_mode
        attributes.st_nlink = info.st_nlink
        attributes.st_size = info.st_size
        attributes.st_blksize = 128 * 1024
        attributes.st_blocks = info.st_blocks
        attributes.st_uid, attributes.st_gid = info.st_uid, info.st_gid
        attributes.st_atime_ns = attributes.st_mtime_ns = attributes.st_ctime_ns = info.st_mtime_ns
        attributes.entry_timeout = attributes.attr_timeout = self.timeout
        return attributes

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self._node(parent_inode).children.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._node(inode)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not stat.S_ISDIR(self._node(inode).info.st_mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder = self.nodes[fh]
        if folder.entries is None:  # once per folder, as dicomfs makes its entries once per listing
            folder.entries = [(name, self._attributes(inode)) for name, inode in folder.children.items()]
        entries = folder.entries
        for number in range(start_id, len(entries)):
            name, attributes = entries[number]
            if not pyfuse3.readdir_reply(token, name, attributes, number + 1):
                return

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        if flags & (os.O_WRONLY | os.O_RDWR):
            if not self.writable:
                raise pyfuse3.FUSEError(errno.EACCES)
            self.open_files[fh] = os.open(node.path, flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC) | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False)
        fd = os.open(node.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.open_files[fh] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if node.info.st_size else -1
        finally:
            os.close(fd)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes:  # type: ignore[override]
        mapped = self.open_files[fh]
        return memoryview(mapped)[off:off + size] if isinstance(mapped, mmap.mmap) else b""

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._writable_folder(parent_inode)
        path = parent.path / os.fsdecode(name)
        fd = os.open(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_EXCL) | os.O_CREAT | os.O_CLOEXEC, 0o644)
        inode = self._add(parent_inode, name, path, os.fstat(fd))
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.open_files[fh] = fd
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._attributes(inode)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fd = self.open_files[fh]
        assert isinstance(fd, int)
        return os.pwrite(fd, buf, off)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._writable_folder(parent_inode)
        path = parent.path / os.fsdecode(name)
        os.mkdir(path, 0o755)
        return self._attributes(self._add(parent_inode, name, path, os.lstat(path)))

    def _writable_folder(self, inode: int) -> Node:
        if not self.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self._node(inode)

    async def release(self, fh: int) -> None:
        opened = self.open_files.pop(fh)
        if isinstance(opened, mmap.mmap):
            opened.close()
        elif opened >= 0:
            os.close(opened)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR if name.startswith(b"user.") else errno.EOPNOTSUPP)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)  # cp sets modes and times; the floor needs none of them


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            print("ready", flush=True)
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main() -> int:
    source, mountpoint, *flags = sys.argv[1:]
    operations = BareOperations(Path(source), writable="--writable" in flags)
    options = set(pyfuse3.default_options) | {"fsname=bare-pyfuse3", "auto_unmount"}
    options.discard("default_permissions")
    pyfuse3.init(operations, mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
