"""Reading ``.npy`` data safely: header checks before numpy parses, sizes, direct reads.

Several backends keep arrays as ``.npy`` (files, zip members): the checks a damaged or hostile
header needs live here once. numpy's header parser is a Python literal parser that takes seconds
on a few KB of damaged bytes, so a header is refused unless it is a short line of text first; a
header of Python objects is refused (it would need unpickling); a file shorter than its shape is
a :class:`~jasper.errors.ShapeError` naming the first incomplete row.
"""

from __future__ import annotations

import contextlib
import math
import os
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from jasper.errors import FormatError, ShapeError, UnsafeFileError


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header says: storage dtype, shape and where the data starts."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.row_bytes * (self.shape[0] if self.shape else 1)


#: Bytes a .npy header (a Python dict literal padded with spaces) may hold.
_HEADER_TEXT = bytes(range(32, 127)) + b"\n"
#: numpy refuses longer headers by default too (``max_header_size``).
_MAX_HEADER = 10_000


def _check_header_text(f: IO[bytes], major: int) -> None:
    """Refuse a header that is not a short line of text before numpy parses it: numpy's
    literal parser takes seconds on a few KB of damaged bytes (zeroed, flipped), which made a
    damaged file hang a reader. Leaves ``f`` where it was."""
    start = f.tell()
    width = 2 if major == 1 else 4
    raw_len = f.read(width)
    length = int.from_bytes(raw_len, "little") if len(raw_len) == width else -1
    if length < 0 or length > _MAX_HEADER:
        raise ValueError(f"header length {length} is outside 0..{_MAX_HEADER}")
    header = f.read(length)
    if len(header) < length:
        raise EOFError(f"the header is cut short ({len(header)} of {length} bytes)")
    if header.translate(None, _HEADER_TEXT):
        raise ValueError("the header holds bytes that are not text (damaged header)")
    f.seek(start)


def read_header(path: Path, array: str | None = None, *,
                fileobj: IO[bytes] | None = None) -> NpyHeader:
    """Parse the header of ``path`` (or of the open ``fileobj``, read from its start; ``path``
    then only names it); typed errors for anything that is not a plain ``.npy``."""
    try:
        with contextlib.nullcontext(fileobj) if fileobj is not None else open(path, "rb") as f:
            f.seek(0)
            try:
                major, _minor = np.lib.format.read_magic(f)
                _check_header_text(f, major)
                if major == 1:
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif major in (2, 3):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {major}")
            except (ValueError, SyntaxError, EOFError, TypeError, RecursionError,
                    MemoryError, tokenize.TokenError) as exc:
                raise FormatError(path, f"not a readable .npy file (rule: .npy header): {exc}",
                                  array=array) from None
            offset = f.tell()
    except FileNotFoundError:
        raise FormatError(path, "file is missing from the dataset directory", array=array) from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a .npy file", array=array) from None
    if dtype.hasobject:
        raise UnsafeFileError(path, "refused: the .npy file holds Python objects, which need "
                              "unpickling to load (rule: plain numeric dtype)")
    if fortran and len(shape) > 1:
        raise FormatError(path, "Fortran-ordered arrays are not supported; rows must be "
                          "contiguous (rule: C order)", array=array)
    return NpyHeader(np.dtype(dtype), tuple(int(s) for s in shape), offset)


def check_size(path: Path, header: NpyHeader, array: str | None = None, *,
               size: int | None = None) -> None:
    """Raise :class:`ShapeError` when the file (``size`` bytes, else stat'ed) holds fewer bytes
    than its shape needs (a truncated file would otherwise SIGBUS on first touch)."""
    size = path.stat().st_size if size is None else size
    need = header.offset + header.nbytes
    if size < need:
        row_bytes = max(1, header.row_bytes)
        complete = max(0, size - header.offset) // row_bytes
        raise ShapeError(
            f"{path.name} is {size} bytes but its shape {header.shape} needs {need}: it holds "
            f"only {complete} complete rows, row {complete} is cut short (truncated write?)",
            array=array, row=int(complete), rule="file size covers the recorded shape", path=path,
        )


def pread_into(path: Path, offset: int, out: memoryview, *, array: str | None = None,
               fd: int | None = None) -> None:
    """Fill ``out`` from ``path`` (or the open descriptor ``fd``) at ``offset`` with ``preadv``
    (one copy: page cache -> out)."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        total = len(out)
        while done < total:
            n = os.preadv(fd, [out[done:]], offset + done)
            if n == 0:
                raise ShapeError(
                    f"{path.name} ended after {offset + done} bytes while reading {total} bytes "
                    f"at offset {offset} (the file shrank after it was opened?)",
                    array=array, rule="file size covers the recorded shape", path=path)
            done += n
    finally:
        if own:
            os.close(fd)
