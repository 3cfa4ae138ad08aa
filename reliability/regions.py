"""Where the regions of each stored file lie (header, payload, index structures), so a corrupt
byte can be placed in every one of them.

Known formats are parsed with the library made for them (``zipfile`` for torch's ``.pt``
archives, ``h5py`` for HDF5 dataset extents, ``numpy.lib.format`` for ``.npy`` headers, SQLite's
page size from its header); any other file gets head, middle and tail.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

Region = tuple[str, int, int]  # name, start, stop (bytes)


def _npy(path: Path, size: int) -> list[Region]:
    import numpy as np

    with open(path, "rb") as fh:
        major, _minor = np.lib.format.read_magic(fh)
        if major == 1:
            np.lib.format.read_array_header_1_0(fh)
        else:
            np.lib.format.read_array_header_2_0(fh)
        data = fh.tell()
    return [("magic", 0, 6), ("version", 6, 8), ("header-length", 8, 10),
            ("header-dict", 10, data), ("data", data, size)]


def _zip(path: Path, size: int) -> list[Region]:
    out: list[Region] = []
    with zipfile.ZipFile(path) as zf:
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        with open(path, "rb") as fh:
            for info in infos:
                fh.seek(info.header_offset)
                head = fh.read(30)
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                data = info.header_offset + 30 + name_len + extra_len
                member = info.filename.split("/", 1)[-1]
                out.append((f"local-header:{member}", info.header_offset, data))
                if info.compress_size:
                    out.append((f"member:{member}", data, data + info.compress_size))
        cd = zf.start_dir
    out.append(("central-directory", cd, max(cd + 1, size - 22)))
    out.append(("end-record", size - 22, size))
    return out


def _hdf5(path: Path, size: int) -> list[Region]:
    import h5py

    extents: list[Region] = []
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                off = obj.id.get_offset()
                n = obj.id.get_storage_size()
                if off is not None and n:
                    extents.append((f"data:{name}", int(off), int(off) + int(n)))
        f.visititems(visit)
    extents.sort(key=lambda r: r[1])
    out: list[Region] = [("superblock", 0, 48)]
    pos = 48
    for i, (name, start, stop) in enumerate(extents):
        if start > pos:
            out.append((f"metadata-{i}", pos, start))  # object headers, heaps, B-trees
        out.append((name, start, stop))
        pos = max(pos, stop)
    if pos < size:
        out.append(("metadata-tail", pos, size))
    return out


def _sqlite(path: Path, size: int) -> list[Region]:
    with open(path, "rb") as fh:
        head = fh.read(100)
    page = struct.unpack(">H", head[16:18])[0]
    page = 65536 if page == 1 else page
    out: list[Region] = [("db-header", 0, 100), ("page-1-btree", 100, min(page, size))]
    for p in range(1, size // page):
        out.append((f"page-{p + 1}", p * page, (p + 1) * page))
    return out


def regions(path: Path) -> list[Region]:
    """The regions of ``path``; a file that does not parse as its extension says gets the
    generic three."""
    size = path.stat().st_size
    try:
        if path.suffix == ".npy":
            return _npy(path, size)
        if path.suffix == ".pt" and zipfile.is_zipfile(path):
            return _zip(path, size)
        if path.suffix in (".h5", ".hdf5"):
            return _hdf5(path, size)
        if path.suffix in (".db", ".sqlite"):
            return _sqlite(path, size)
    except Exception:
        pass
    if size == 0:
        return []
    return [("head", 0, min(size, 64)), ("middle", size // 2, size // 2 + 1),
            ("tail", size - 1, size)]
