"""A structural check of an HDF5 file's group index, before HDF5 walks it.

jasper-hdf5 writes with h5py's default format (libver "earliest", so that old installs read
the files): a group's links live in a version-1 B-tree of symbol-table nodes (``SNOD``) whose
names are in a local heap. None of these structures carries a checksum, and HDF5 follows them
as they are: a fuzzed file whose B-tree points back at itself made a plain ``name in group``
spin inside HDF5, holding h5py's global lock, where no Python timeout can stop it.

:func:`check_group_index` walks the same structures first, in Python, with bounds HDF5 does not
impose: every node inside the file, each visited once (a cycle is an error, not a loop), levels
strictly decreasing to 0, no more entries than the node's declared capacity, every name offset
inside its heap and every name terminated there. It reads only the superblock, the root group
and the groups directly under it (what the reader looks names up in), a few small reads each.
Files in the newer formats (superblock version 2 and 3: link messages and v2 B-trees, all
checksummed) are left to HDF5, which verifies those checksums itself.

Dependency-free: the reader passes a ``read(offset, size) -> bytes`` of the pinned file.
The format is the HDF5 File Format Specification, version 3.0 (sections II.A, III.A.1, III.B,
III.D).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Where a superblock may start (after a user block of 512 * 2**k bytes).
_SEARCH_LIMIT = 1 << 30
#: Nodes visited at most (a group holding ~10**6 links; a larger index is refused, not walked).
MAX_NODES = 1 << 18
#: Deepest B-tree accepted (a 2K-ary tree this deep indexes more names than any file holds).
MAX_LEVEL = 16


class StructureError(ValueError):
    """The group index is damaged; the message says where and which rule."""


@dataclass(frozen=True)
class _Sizes:
    offsets: int
    lengths: int
    leaf_k: int
    internal_k: int
    eof: int
    base: int


def _uint(data: bytes, at: int, n: int) -> int:
    return int.from_bytes(data[at : at + n], "little")


def find_superblock(read: Callable[[int, int], bytes], size: int) -> int:
    """Offset of the superblock signature (0, 512, 1024, 2048, ...); StructureError if none."""
    at = 0
    while at + len(SIGNATURE) <= min(size, _SEARCH_LIMIT):
        if read(at, len(SIGNATURE)) == SIGNATURE:
            return at
        at = 512 if at == 0 else at * 2
    raise StructureError("no HDF5 superblock signature")


def check_group_index(read: Callable[[int, int], bytes], size: int) -> None:
    """Check the group index of the HDF5 file of ``size`` bytes that ``read`` reads (see the
    module docstring); StructureError naming the structure, its offset and the rule."""
    start = find_superblock(read, size)
    head = read(start, 96)
    if len(head) < 24:
        raise StructureError(f"superblock at byte {start} is truncated")
    version = head[8]
    if version >= 2:
        return  # link messages / v2 B-trees: checksummed, HDF5 checks them
    if version != 0 and version != 1:
        raise StructureError(f"superblock version {version} is unknown")
    so, sl = head[13], head[14]
    if so not in (2, 4, 8) or sl not in (2, 4, 8):
        raise StructureError(f"superblock sizes of offsets/lengths {so}/{sl} are invalid")
    leaf_k, internal_k = struct.unpack_from("<HH", head, 16)
    at = 24 + (4 if version == 1 else 0)
    need = at + 4 * so + _entry_size(so)
    if len(head) < need:
        head = read(start, need)
        if len(head) < need:
            raise StructureError(f"superblock at byte {start} is truncated")
    base = _uint(head, at, so)
    eof = _uint(head, at + 2 * so, so)
    if leaf_k == 0 or internal_k == 0:
        raise StructureError("superblock group K values are 0 (rule: K > 0)")
    sizes = _Sizes(so, sl, leaf_k, internal_k, min(eof, size), base)
    root = head[at + 4 * so : at + 4 * so + _entry_size(so)]
    walker = _Walker(read, sizes)
    groups = walker.group_of_entry(root, "root group")
    if groups is None:
        return  # root without a cached symbol table: nothing of the old index to walk
    for child, where in walker.walk_group(*groups, where="root group"):
        sub = walker.group_of_entry(child, where)
        if sub is not None:
            # groups directly under the root (the legacy layout's pair_data): their index is
            # walked too, their own subgroups not (HDF5 reaches those only when asked by name)
            for _ in walker.walk_group(*sub, where=where):
                pass


def _entry_size(so: int) -> int:
    return 2 * so + 4 + 4 + 16


class _Walker:
    def __init__(self, read: Callable[[int, int], bytes], sizes: _Sizes) -> None:
        self.read = read
        self.s = sizes
        self.seen: set[int] = set()

    def _addr(self, rel: int, what: str, nbytes: int) -> int:
        at = self.s.base + rel
        if rel == (1 << (8 * self.s.offsets)) - 1 or at + nbytes > self.s.eof:
            raise StructureError(f"{what} at byte {at} lies outside the file (rule: inside "
                                 f"the file's {self.s.eof} bytes)")
        return at

    def _visit(self, at: int, what: str) -> None:
        if at in self.seen:
            raise StructureError(f"{what} at byte {at} is reached twice (rule: the group "
                                 "index is a tree; a cycle would loop HDF5 forever)")
        if len(self.seen) >= MAX_NODES:
            raise StructureError(f"group index has more than {MAX_NODES} nodes")
        self.seen.add(at)

    def group_of_entry(self, entry: bytes, where: str) -> tuple[int, int] | None:
        """``(btree, heap)`` of the object a symbol-table entry points at, when it is a group
        indexed the old way (its object header holds a symbol-table message), else None.

        HDF5 takes these addresses from the object header, not from the entry's cached copy,
        so the header is read: version 1 (no checksum), its continuation blocks followed with
        every block visited once. A version-2 header (``OHDR``) is checksummed: HDF5 checks it.
        """
        so = self.s.offsets
        header = _uint(entry, so, so)
        block_at = self._addr(header, f"object header of {where}", 16)
        head = self.read(block_at, 16)
        if head[:4] == b"OHDR":
            return None
        if len(head) < 16 or head[0] != 1:
            raise StructureError(f"object header of {where} at byte {block_at} has version "
                                 f"{head[0] if head else '?'} (rule: 1, or an OHDR header)")
        n_messages = _uint(head, 2, 2)
        blocks = [(block_at + 16, _uint(head, 8, 4))]
        seen_blocks: set[int] = set()
        found: tuple[int, int] | None = None
        messages = 0
        while blocks:
            at, length = blocks.pop(0)
            if at in seen_blocks:
                raise StructureError(f"object header of {where}: block at byte {at} is "
                                     "continued into twice (rule: no cycle)")
            seen_blocks.add(at)
            if at + length > self.s.eof or len(seen_blocks) > MAX_LEVEL * 64:
                raise StructureError(f"object header of {where}: block at byte {at} lies "
                                     "outside the file")
            data = self.read(at, length)
            pos = 0
            while pos + 8 <= len(data) and messages < n_messages:
                mtype, msize = _uint(data, pos, 2), _uint(data, pos + 2, 2)
                body = data[pos + 8 : pos + 8 + msize]
                if len(body) < msize:
                    raise StructureError(f"object header of {where}: message at byte "
                                         f"{at + pos} runs past its block")
                if mtype == 0x10 and msize >= so + self.s.lengths:  # continuation
                    cont = self._addr(_uint(body, 0, so), f"object header of {where}", 0)
                    blocks.append((cont, _uint(body, so, self.s.lengths)))
                elif mtype == 0x11 and msize >= 2 * so:  # symbol table
                    found = (_uint(body, 0, so), _uint(body, so, so))
                messages += 1
                pos += 8 + msize
        return found

    def _heap(self, rel: int, where: str) -> tuple[int, int]:
        so, sl = self.s.offsets, self.s.lengths
        n = 8 + 2 * sl + so
        at = self._addr(rel, f"local heap of {where}", n)
        data = self.read(at, n)
        if data[:4] != b"HEAP" or len(data) < n:
            raise StructureError(f"local heap of {where} at byte {at} has no HEAP signature")
        seg_size = _uint(data, 8, sl)
        seg = self._addr(_uint(data, 8 + 2 * sl, so), f"heap data of {where}", seg_size)
        return seg, seg_size

    def walk_group(self, btree: int, heap: int, *, where: str
                   ) -> list[tuple[bytes, str]]:
        """Every symbol-table entry of the group (checked); names are checked in its heap."""
        seg, seg_size = self._heap(heap, where)
        names = self.read(seg, seg_size)
        if len(names) < seg_size:
            raise StructureError(f"heap data of {where} at byte {seg} is truncated")
        entries: list[tuple[bytes, str]] = []
        self._node(btree, None, where, names, entries)
        return entries

    def _node(self, rel: int, level: int | None, where: str, names: bytes,
              entries: list[tuple[bytes, str]]) -> None:
        so, sl = self.s.offsets, self.s.lengths
        head_n = 8 + 2 * so
        at = self._addr(rel, f"B-tree node of {where}", head_n)
        self._visit(at, f"B-tree node of {where}")
        head = self.read(at, head_n)
        if head[:4] != b"TREE" or len(head) < head_n:
            raise StructureError(f"B-tree node of {where} at byte {at} has no TREE signature")
        node_type, node_level, used = head[4], head[5], _uint(head, 6, 2)
        if node_type != 0:
            raise StructureError(f"B-tree node of {where} at byte {at} is of type "
                                 f"{node_type}, not a group node")
        if node_level > MAX_LEVEL or (level is not None and node_level != level):
            raise StructureError(f"B-tree node of {where} at byte {at} has level "
                                 f"{node_level}" + ("" if level is None else
                                                    f", expected {level}") +
                                 " (rule: levels fall by one to 0)")
        if used > 2 * self.s.internal_k:
            raise StructureError(f"B-tree node of {where} at byte {at} claims {used} entries, "
                                 f"more than its capacity {2 * self.s.internal_k}")
        body_n = used * (sl + so) + sl
        body = self.read(at + head_n, body_n)
        if len(body) < body_n:
            raise StructureError(f"B-tree node of {where} at byte {at} is truncated")
        for i in range(used):
            child = _uint(body, sl + i * (sl + so), so)
            if node_level > 0:
                self._node(child, node_level - 1, where, names, entries)
            else:
                self._snod(child, where, names, entries)

    def _snod(self, rel: int, where: str, names: bytes,
              entries: list[tuple[bytes, str]]) -> None:
        so = self.s.offsets
        esize = _entry_size(so)
        at = self._addr(rel, f"symbol table node of {where}", 8)
        self._visit(at, f"symbol table node of {where}")
        head = self.read(at, 8)
        if head[:4] != b"SNOD" or len(head) < 8:
            raise StructureError(f"symbol table node of {where} at byte {at} has no SNOD "
                                 "signature")
        count = _uint(head, 6, 2)
        if count > 2 * self.s.leaf_k:
            raise StructureError(f"symbol table node of {where} at byte {at} claims {count} "
                                 f"entries, more than its capacity {2 * self.s.leaf_k}")
        body = self.read(at + 8, count * esize)
        if len(body) < count * esize:
            raise StructureError(f"symbol table node of {where} at byte {at} is truncated")
        for i in range(count):
            entry = body[i * esize : (i + 1) * esize]
            name_at = _uint(entry, 0, so)
            end = names.find(b"\0", name_at) if name_at < len(names) else -1
            if end < 0:
                raise StructureError(f"symbol table node of {where} at byte {at}: entry {i}'s "
                                     f"name offset {name_at} is outside its heap or "
                                     "unterminated")
            name = names[name_at:end].decode("utf-8", "replace")
            entries.append((entry, f"group {name!r}"))


__all__ = ["MAX_NODES", "StructureError", "check_group_index", "find_superblock"]
