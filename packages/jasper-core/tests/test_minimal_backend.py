"""A backend written to the minimal required reader set (``array_names``, ``info``,
``read_slice_into``) passes the whole conformance kit and preloads about as fast as a raw read: the
contract's defaults carry the weight."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import jasper
from jasper.backend import ArrayInfo, ArraySource, BackendEntrypoint, Capabilities, StoreReader
from jasper.dtypes import dtype_name, to_storage, torch_dtype
from jasper.errors import FormatError
from jasper.manifest import Manifest
from jasper.schema import ALL_ARRAYS
from jasper.testing import BackendConformance

NAME = "kit-minimal"
FORMAT_FILE = "kit-minimal.json"  # {array: {"shape": [...], "dtype": "..."}}


class MinimalReader(StoreReader):
    """Raw little-endian bytes per array, shapes in one JSON file: only the three required
    methods, every file opened through the pinned directory."""

    backend_name = NAME

    def __init__(self, path: Path, manifest: Manifest) -> None:
        super().__init__(path, manifest)
        try:
            self.layout = json.loads(self.files.read_bytes(FORMAT_FILE, limit=1 << 20))
        except ValueError as exc:
            raise FormatError(self.files.member(FORMAT_FILE), f"not JSON: {exc}") from None

    def array_names(self) -> list[str]:
        return [n for n in ALL_ARRAYS if n in self.layout]

    def info(self, name: str) -> ArrayInfo:
        if name not in self.layout:
            raise self._missing(name)
        rec = self.layout[name]
        return ArrayInfo(tuple(rec["shape"]), torch_dtype(rec["dtype"]))

    def read_slice_into(self, name: str, start: int, stop: int,
                        out: torch.Tensor) -> torch.Tensor:
        info = self.info(name)
        row_bytes = ArrayInfo(info.shape[1:], info.dtype).nbytes
        fd = self.files.open_fd(f"{name}.bin")
        try:
            view = memoryview(to_storage(out).reshape(-1).view(np.uint8))
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], start * row_bytes + done)
                if n == 0:
                    raise FormatError(self.files.member(f"{name}.bin"), "truncated", array=name)
                done += n
        finally:
            os.close(fd)
        return out


class MinimalBackend(BackendEntrypoint):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "raw bytes per array, the minimal reader set (tests only)"
    capabilities: ClassVar[Capabilities] = Capabilities(write=True, mmap=False, row_access=True)
    marker_files: ClassVar[tuple[str, ...]] = (FORMAT_FILE,)

    def open(self, path: Path, manifest: Manifest) -> StoreReader:
        return MinimalReader(Path(path), manifest)

    def write_arrays(self, directory: Path, arrays: Mapping[str, ArraySource],
                     manifest: Manifest) -> None:
        layout = {}
        for name, source in arrays.items():
            with open(directory / f"{name}.bin", "wb") as f:
                for chunk in source.iter_chunks(1 << 16):
                    f.write(to_storage(chunk).reshape(-1).view(np.uint8).data)
            layout[name] = {"shape": list(source.shape), "dtype": dtype_name(source.dtype)}
        (directory / FORMAT_FILE).write_text(json.dumps(layout))


@pytest.fixture
def minimal_backend(register_for_test: Any) -> BackendEntrypoint:
    return register_for_test(NAME, MinimalBackend)


class TestKitOnMinimalBackend(BackendConformance):
    """The whole kit passes on a reader that implements only the required set."""

    @pytest.fixture
    def backend(self, minimal_backend: BackendEntrypoint) -> BackendEntrypoint:
        return minimal_backend


def _best_of_interleaved(a: Any, b: Any, repeat: int = 9) -> tuple[float, float]:
    """Best time of each of two functions, run alternately (so that load from other processes
    on the machine hits both alike)."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def test_preload_through_the_defaults_is_within_1_5x_of_a_raw_read(
        minimal_backend: BackendEntrypoint, tmp_path: Path) -> None:
    """``read_into`` of a reader with only the required methods (the default hands the whole
    destination to ``read_slice_into``) against one ``preadv`` of the same bytes into a
    preallocated buffer, both from the page cache. The ratio is asserted, never a time."""
    from jasper.testing import make_arrays

    arrays, manifest = make_arrays(n_pairs=64, embedding_dim=128, n_sources=1 << 17)
    path = jasper.write_store(tmp_path / "ds", arrays, manifest, backend=NAME)
    big = arrays["source_embs"]  # 64 MiB of float32
    reader = jasper.open_store(path)
    out = torch.empty_like(big)
    raw = np.empty(big.numel() * 4, dtype=np.uint8)

    def raw_read() -> None:
        fd = reader.files.open_fd("source_embs.bin")
        try:
            view = memoryview(raw)
            done = 0
            while done < len(view):
                done += os.preadv(fd, [view[done:]], done)
        finally:
            os.close(fd)

    raw_read()  # warm the page cache
    assert torch.equal(reader.read_into("source_embs", out), big)
    t_raw, t_default = _best_of_interleaved(raw_read,
                                            lambda: reader.read_into("source_embs", out))
    assert t_default <= 1.5 * t_raw, (t_default, t_raw)
