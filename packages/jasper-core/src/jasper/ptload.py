"""Loading ``.pt`` files safely: the one place jasper calls ``torch.load``.

Every load is ``torch.load(weights_only=True)``, never retried unsafely (CVE-2025-32434 showed
how thin that line is; jasper requires torch >= 2.10). Failures are typed:

- a file whose pickle names a global outside torch's weights-only allow-list (it could run code)
  is :class:`~jasper.errors.UnsafeFileError`, and so is the legacy ``.tar`` serialisation (it
  needs unrestricted unpickling);
- anything else the unpickler or the zip reader raises on malformed bytes is
  :class:`~jasper.errors.FormatError` "not a readable .pt file": the weights-only unpickler runs
  no code, so a broken file is never a reason to load it another way.

The file kind is recognised from its first bytes before torch sees it, so that a zeroed or
foreign file says "corrupt / not a .pt file" rather than torch's guesses ("legacy .tar format").
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from jasper.dtypes import STORAGE_NUMPY
from jasper.errors import FormatError, UnsafeFileError
from jasper.files import DatasetDir
from jasper.lazy import lazy_torch
from jasper.validation import check_tensor_layout

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

_ZIP_MAGIC = b"PK\x03\x04"
#: torch's legacy (pre-1.6) serialisation starts with a pickled magic number, protocol 2
_PICKLE_PROTO = 0x80


def _kind(head: bytes, fd: int) -> str:
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head[:1] == bytes([_PICKLE_PROTO]):
        return "legacy"
    try:
        with open(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            # zero blocks read as an empty archive: a legacy file has members
            if tar.next() is not None:
                return "tar"
    except (OSError, ValueError, tarfile.TarError, EOFError):
        pass
    return "unknown"


def load_pt(files: DatasetDir, member: str, *, mmap: bool = False,
            array: str | None = None) -> Any:
    """``torch.load`` of ``member`` of the pinned dataset directory ``files``, weights-only.

    ``mmap=True`` maps the tensors' storages (zip-format files; the legacy format is read whole).
    Typed errors as described in the module docstring; the messages name the file and array.
    """
    where = files.member(member)
    fd = files.open_fd(member)
    try:
        head = os.pread(fd, 8, 0)
        kind = _kind(head, fd)
        if kind == "tar":
            raise UnsafeFileError(
                where, "refused: a .pt file in torch's legacy .tar format needs unrestricted "
                "unpickling, which can run arbitrary code; re-save it with torch.save in a "
                "trusted environment", array=array)
        if kind == "unknown":
            raise FormatError(where, "not a .pt file (corrupt or truncated?): it starts with "
                              f"{head!r}, neither a zip archive nor a pickle", array=array)
        path = files.fd_path(fd, member)
        try:
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=mmap and kind == "zip")
        except pickle.UnpicklingError as exc:
            first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
            detail = (first[0] if first else str(exc))[:200]
            if "global" in detail.lower() or "unsupported class" in detail.lower():
                raise UnsafeFileError(
                    where, "refused: loading it needs unrestricted unpickling, which can run "
                    f"arbitrary code. jasper only loads tensors and plain containers ({detail})",
                    array=array) from None
            raise FormatError(where, f"not a readable .pt file (corrupt?): {detail}",
                              array=array) from None
        except MemoryError:
            raise FormatError(where, "not a readable .pt file: it claims more memory than "
                              "there is (corrupt?)", array=array) from None
        except Exception as exc:
            raise FormatError(where, "not a readable .pt file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {str(exc)[:300]}", array=array) from None
    finally:
        os.close(fd)


def load_pt_tensor(files: DatasetDir, member: str, *, mmap: bool = False,
                   array: str | None = None) -> torch.Tensor:
    """:func:`load_pt` of a file that must hold one tensor whose storage covers its shape and
    whose strides do not alias rows (stride 0 makes every row the same bytes)."""
    obj = load_pt(files, member, mmap=mmap, array=array)
    where = files.member(member)
    if not isinstance(obj, torch.Tensor):
        raise FormatError(where, f"expected a tensor, found {type(obj).__name__}", array=array)
    check_tensor_storage(obj, where, array)
    return obj


def check_tensor_storage(t: torch.Tensor, where: Any, array: str | None) -> None:
    """Raise unless ``t``'s rows do not alias (:func:`jasper.validation.check_tensor_layout`) and its
    storage holds every element its shape and strides reach (a mapped file shorter than that
    would SIGBUS on first touch of the tail)."""
    if t.numel() == 0:
        return
    check_tensor_layout(array or 'tensor', t, where)
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride(),
                                                                   strict=True))
    need = (last + 1) * t.element_size()
    have = t.untyped_storage().nbytes()
    if have < need:
        raise FormatError(where, f"storage holds {have} bytes, shape {tuple(t.shape)} needs "
                          f"{need} (truncated or corrupt?)", array=array)


#: torch's storage classes as pickled in a ``.pt`` file -> logical dtype name
_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
                   "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
                   "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}
#: a tensor's pickle is a few hundred bytes; a larger one is a container (left to torch)
_MAX_META_PICKLE = 1 << 16


class _TensorMeta(NamedTuple):
    """What a ``.pt`` file's pickle says of its one tensor (elements, not bytes)."""

    shape: tuple[int, ...]
    dtype: str  # logical dtype name
    key: str  # the storage's member: ``<archive>/data/<key>``
    offset: int
    stride: tuple[int, ...]


class _MetaUnpickler(pickle.Unpickler):
    """Reads a ``.pt`` tensor's pickle for its layout only. It resolves no global but the three
    a plain tensor needs, each to a stand-in of its own, so it builds nothing and runs nothing
    of the file's (anything else: ``pickle.UnpicklingError``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_rest: _TensorMeta(
                tuple(size), storage[0], str(storage[1]), int(offset), tuple(stride))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            return pid[1], pid[2]  # the dtype name find_class gave the storage class, key
        raise pickle.UnpicklingError("unexpected persistent id")


def pt_info(files: DatasetDir, member: str) -> tuple[tuple[int, ...], str] | None:
    """Shape and logical dtype of the one tensor saved in ``member`` (zip format), read from its
    pickle without torch: describing a dataset (``jasper info``) then imports no torch. ``None``
    when the file is not a plain tensor in that format; :func:`load_pt_tensor` (which checks
    everything) then decides."""
    with contextlib.suppress(Exception), files.open_file(member) as fh:
        got = _tensor_meta(fh)
        if got is not None:
            return got[0].shape, got[0].dtype
    return None


def _tensor_meta(fh: Any) -> tuple[_TensorMeta, int, int] | None:
    """The layout of the one tensor in the zip-format ``.pt`` file open as ``fh``, the byte
    offset of its storage's data in the file and that storage's size in bytes; ``None`` when
    the file is anything else (another format, a container, a compressed or big-endian
    storage)."""
    if fh.read(4) != _ZIP_MAGIC:
        return None
    fh.seek(0)
    with zipfile.ZipFile(fh) as zf:
        members = {i.filename: i for i in zf.infolist()}
        pkl = [i for i in members.values() if i.filename.endswith("/data.pkl")]
        if len(pkl) != 1 or pkl[0].file_size > _MAX_META_PICKLE:
            return None
        prefix = pkl[0].filename.removesuffix("data.pkl")
        meta = _MetaUnpickler(io.BytesIO(zf.read(pkl[0]))).load()
        order = members.get(f"{prefix}byteorder")
        if (not isinstance(meta, _TensorMeta) or meta.dtype not in STORAGE_NUMPY
                or not all(isinstance(n, int) and n >= 0 for n in meta.shape)
                or (order is not None and zf.read(order) != b"little")):
            return None
        data = members.get(f"{prefix}data/{meta.key}")
        if data is None or data.compress_type != zipfile.ZIP_STORED:
            return None
    fh.seek(data.header_offset)
    local = fh.read(30)  # the member's local header: its name and extra field precede the data
    if len(local) < 30 or not local.startswith(_ZIP_MAGIC):
        return None
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return meta, data.header_offset + 30 + name_len + extra_len, data.file_size


def map_pt_numpy(files: DatasetDir, member: str) -> np.ndarray | None:
    """A read-only numpy map (storage dtype, bfloat16 as ``uint16``) of the one tensor saved in
    ``member``, found from the file's pickle without torch, when that tensor is contiguous and
    its storage holds it; ``None`` otherwise, and :func:`load_pt_tensor` (which checks
    everything and types every failure) decides. ``jasper validate`` maps ``.pt`` files so."""
    with contextlib.suppress(Exception), files.open_file(member) as fh:
        got = _tensor_meta(fh)
        if got is None:
            return None
        meta, start, stored = got
        dtype = STORAGE_NUMPY[meta.dtype]
        contiguous = tuple(math.prod(meta.shape[i + 1:]) for i in range(len(meta.shape)))
        numel = math.prod(meta.shape)
        if numel and (meta.stride != contiguous or stored < (meta.offset + numel) * dtype.itemsize
                      or start + stored > os.fstat(fh.fileno()).st_size):
            return None  # not a plain contiguous tensor its file holds: torch's load decides
        if numel == 0:
            return np.empty(meta.shape, dtype)
        return np.memmap(fh, dtype=dtype, mode="r", offset=start + meta.offset * dtype.itemsize,
                         shape=meta.shape)
    return None


__all__ = ["check_tensor_storage", "load_pt", "load_pt_tensor", "map_pt_numpy", "pt_info"]
