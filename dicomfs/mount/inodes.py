"""Inode numbers for the mount, and the kernel's lookup counts.

pyfuse3 leaves lookup counting to the file system: every entry the kernel is told about (lookup,
create, mkdir, each readdirplus entry) adds one, and ``forget`` takes them back; a node may be
dropped only at zero. Two rules shape the numbers:

- one stable inode per stored instance, the same in every view (hard-link semantics, one page
  cache), derived from the instance's resource id so it even survives a restart;
- a distinct inode for every folder *path*: two paths sharing a folder inode confuse the kernel's
  dentry cache (``pwd`` printed the other path in an experiment), so folders are numbered from a
  counter, never reused while the mount runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["ROOT_INODE", "InodeTable", "Node", "instance_inode"]

ROOT_INODE = 1
_INSTANCE_BIT = 1 << 63
_K = TypeVar("_K")


def instance_inode(resource_id: str) -> int:
    """The inode of a stored instance: the top bit set, then 63 bits of its (SHA-1) resource id."""
    return _INSTANCE_BIT | (int(resource_id.replace("-", "")[:16], 16) & (_INSTANCE_BIT - 1))


@dataclass
class Node:
    """What the kernel may hold an inode for."""

    inode: int
    kind: str
    """``folder``, ``instance``, ``document`` (study.json…) or ``upload`` (a file or folder in uploads/)."""
    path: tuple[str, ...]
    """Its path; an instance's first known path (it has one per view)."""
    resource_id: str | None = None
    lookups: int = 0
    links: set[tuple[int, str]] = field(default_factory=set)
    """(parent inode, name) pairs the kernel knows this node by."""
    vanished_at: float = float("-inf")
    """When a delete took this folder or document away (trio time), so `rm -r` can still remove it."""


class InodeTable:
    """Nodes by inode, by path, by resource and by parent, with their lookup counts."""

    def __init__(self) -> None:
        self._nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, "folder", ())}
        self._by_path: dict[tuple[str, ...], int] = {(): ROOT_INODE}
        self._by_resource: dict[str, set[int]] = {}
        self._children: dict[int, set[int]] = {}
        self._next = ROOT_INODE + 1

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def at(self, path: tuple[str, ...]) -> Node | None:
        """The node the kernel knows by ``path`` (folders, documents, uploads; not instances)."""
        inode = self._by_path.get(path)
        return self._nodes.get(inode) if inode is not None else None

    def with_resource(self, resource_id: str) -> list[Node]:
        """Every node showing ``resource_id`` (a patient, study or series has one per view)."""
        return [self._nodes[i] for i in self._by_resource.get(resource_id, ())]

    def children(self, parent: int) -> list[Node]:
        """The nodes the kernel knows inside folder ``parent``."""
        return [self._nodes[i] for i in self._children.get(parent, ())]

    def node_for(self, parent: int, path: tuple[str, ...], kind: str, resource_id: str | None = None) -> Node:
        """The node for ``path`` (an existing one, or a new one without lookups)."""
        if kind == "instance" and resource_id is not None:
            inode = instance_inode(resource_id)
            node = self._nodes.get(inode)
            if node is None:
                node = self._add(Node(inode, kind, path, resource_id))
        else:
            node = self.at(path)
            if node is None or node.kind != kind or node.resource_id != resource_id:
                inode, self._next = self._next, self._next + 1
                node = self._add(Node(inode, kind, path, resource_id))
                self._by_path[path] = inode
        node.links.add((parent, path[-1]))
        self._children.setdefault(parent, set()).add(node.inode)
        return node

    def _add(self, node: Node) -> Node:
        self._nodes[node.inode] = node
        if node.resource_id is not None:
            self._by_resource.setdefault(node.resource_id, set()).add(node.inode)
        return node

    def looked_up(self, node: Node) -> None:
        node.lookups += 1

    def forget(self, inode: int, count: int) -> None:
        node = self._nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups > 0:
            return
        del self._nodes[inode]
        if self._by_path.get(node.path) == inode:
            del self._by_path[node.path]
        if node.resource_id is not None:
            _discard(self._by_resource, node.resource_id, inode)
        for parent, _ in node.links:
            _discard(self._children, parent, inode)
        self._children.pop(inode, None)

    def unlink(self, node: Node, parent: int, name: str) -> None:
        """The kernel was told ``name`` in ``parent`` is gone (the node lives on until forgotten)."""
        node.links.discard((parent, name))
        if not any(p == parent for p, _ in node.links):
            _discard(self._children, parent, node.inode)
        if node.kind != "instance" and self._by_path.get(node.path) == node.inode:
            del self._by_path[node.path]

    def move(self, node: Node, old: tuple[str, ...], new: tuple[str, ...], new_parent: int) -> None:
        """A rename in uploads/: the node and every node below it now live under ``new``."""
        for other in list(self._nodes.values()):
            if other.path[:len(old)] == old:
                if self._by_path.get(other.path) == other.inode:
                    del self._by_path[other.path]
                other.path = new + other.path[len(old):]
                self._by_path[other.path] = other.inode
        for parent, _ in node.links:
            _discard(self._children, parent, node.inode)
        node.links = {(new_parent, new[-1])}
        self._children.setdefault(new_parent, set()).add(node.inode)



def _discard(table: dict[_K, set[int]], key: _K, inode: int) -> None:
    members = table.get(key)
    if members is not None:
        members.discard(inode)
        if not members:
            del table[key]
