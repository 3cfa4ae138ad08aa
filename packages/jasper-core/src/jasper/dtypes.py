"""Logical dtypes, and the bridge between torch tensors and numpy storage.

jasper's public API is tensors in, tensors out. Most storage libraries (numpy, h5py, zarr) speak
numpy, which has no bfloat16; bfloat16 arrays are therefore stored as their raw 16-bit pattern
(``uint16``) and the manifest records the logical dtype, so the round trip is bit-exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.lazy import lazy_torch

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())

#: The logical dtype names, which the manifest records (each is also the torch dtype's name).
LOGICAL_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64", "int64", "int32",
                                   "int16", "int8", "uint8", "bool")

# Logical dtype name -> numpy dtype used on disk. bfloat16 travels as its bit pattern.
STORAGE_NUMPY: dict[str, np.dtype] = {
    name: np.dtype("uint16") if name == "bfloat16" else np.dtype(name) for name in LOGICAL_DTYPES
}

#: Bytes per element of each logical dtype (no torch needed).
ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in STORAGE_NUMPY.items()}

_TORCH: dict[str, torch.dtype] = {}
_NAMES: dict[torch.dtype, str] = {}


def _torch_dtypes() -> dict[str, torch.dtype]:
    if not _TORCH:
        import torch as _t

        _TORCH.update({name: getattr(_t, name) for name in LOGICAL_DTYPES})
        _NAMES.update({v: k for k, v in _TORCH.items()})
    return _TORCH


def __getattr__(name: str) -> Any:
    # ``TORCH_DTYPES`` (logical name -> torch dtype) is built on first use: it needs torch
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def dtype_name(dtype: torch.dtype | str) -> str:
    """The logical name of a torch dtype, e.g. ``torch.bfloat16 -> "bfloat16"`` (a logical
    name is returned as it is)."""
    if isinstance(dtype, str) and dtype in ITEMSIZE:
        return dtype
    _torch_dtypes()
    try:
        return _NAMES[dtype]  # type: ignore[index]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by jasper") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a logical dtype name."""
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise TypeError(
            f"unknown dtype name {name!r}; known: {', '.join(sorted(LOGICAL_DTYPES))}"
        ) from None


def storage_logical(storage: np.dtype) -> str:
    """The logical dtype whose values numpy dtype ``storage`` holds: ``uint16`` is bfloat16's
    bit pattern (no array of the data model is ``uint16``); a ``TypeError`` for a dtype jasper
    cannot hold."""
    storage = np.dtype(storage).newbyteorder("=")
    for name, stored in STORAGE_NUMPY.items():
        if stored == storage:
            return name
    raise TypeError(f"dtype {storage} is not supported by jasper")


def to_storage(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor's bytes, in its storage dtype (no copy when contiguous)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
        return t.numpy().view(np.uint16)
    return t.numpy()


def from_storage(array: np.ndarray, logical: str) -> torch.Tensor:
    """A tensor sharing memory with ``array`` (storage dtype) that has the logical dtype.

    Read-only arrays (memory maps opened ``"r"``) are shared as well; torch warns about writing to
    them, so callers that hand such tensors to users must treat them as read-only.
    """
    expected = STORAGE_NUMPY[logical]
    if array.dtype != expected:
        array = array.astype(expected)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    import warnings

    with warnings.catch_warnings():
        # torch warns once for non-writable numpy arrays; jasper documents mapped tensors as
        # read-only instead of paying for a copy.
        warnings.simplefilter("ignore", UserWarning)
        if logical == "bfloat16":
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)
