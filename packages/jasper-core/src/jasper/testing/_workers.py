"""Pieces of the conformance kit that run in other processes: DataLoader worker datasets
(importable by spawned workers, so they live in a module, not in a test), array sources that fail
or stall half-way through a write, and the command-line entry used by the kit's subprocesses::

    python -m jasper.testing._workers kill-target BACKEND CLASS_PATH TARGET READY_FILE OPTIONS_JSON
    python -m jasper.testing._workers read-mapped BACKEND CLASS_PATH PATH
    python -m jasper.testing._workers list-backends HEAVY_MODULE...

``CLASS_PATH`` (``"module:Class"``) lets the child register a backend that the parent registered
at run time (no entry point); it is ignored when the child already lists ``BACKEND``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from jasper.backend import ArraySource, BackendEntrypoint, StoreReader, TensorSource
from jasper.manifest import Manifest

#: The pair arrays every worker item carries (one row each), plus a gathered table row.
WORKER_ARRAYS: tuple[str, ...] = (
    "pair_index",
    "pair_relevance",
    "hard_negatives",
    "negative_tiers",
    "steering_residual",
    "centroid_distances",
)


def _item(reader: StoreReader, i: int) -> dict[str, Any]:
    info = get_worker_info()
    row = torch.tensor([i], dtype=torch.int64)
    out: dict[str, Any] = {
        "row": i,
        "worker": -1 if info is None else info.id,
        "pid": os.getpid(),
    }
    for name in WORKER_ARRAYS:
        out[name] = reader.read_rows(name, row)[0]
    q = out["pair_index"][0:1]
    out["question_emb"] = reader.read_rows("question_embs", q.to(torch.int64))[0]
    return out


class PickledReaderRows(Dataset[dict[str, Any]]):
    """Rows served through a reader that was opened in the parent and pickled (spawn) or
    inherited (fork) by each worker."""

    def __init__(self, reader: StoreReader, n_rows: int) -> None:
        self.reader = reader
        self.n_rows = n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        return _item(self.reader, i)


class OpenInWorkerRows(Dataset[dict[str, Any]]):
    """Rows served through a reader that each process opens for itself on first use, from the
    backend instance and the dataset path (the pattern h5py-style backends need)."""

    def __init__(self, backend: BackendEntrypoint, path: Path, n_rows: int) -> None:
        self.backend = backend
        self.path = Path(path)
        self.n_rows = n_rows
        self._reader: StoreReader | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None
        return state

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._reader is None or self._pid != os.getpid():
            self._reader = self.backend.open(self.path, Manifest.load(self.path))
            self._pid = os.getpid()
        return _item(self._reader, i)


class HalfThenFail(ArraySource):
    """Yields the first half of a tensor's rows, then raises :class:`SourceFailed`."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.inner = TensorSource(tensor)
        self.shape = self.inner.shape
        self.dtype = self.inner.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        half = max(1, self.shape[0] // 2)
        yield self.inner.tensor[:half]
        raise SourceFailed("the array source failed half-way (deliberately, by the kit)")


class HalfThenStall(ArraySource):
    """Yields the first half of a tensor's rows, creates ``ready``, then sleeps (until killed)."""

    def __init__(self, tensor: torch.Tensor, ready: Path, seconds: float = 120.0) -> None:
        self.inner = TensorSource(tensor)
        self.shape = self.inner.shape
        self.dtype = self.inner.dtype
        self.ready = Path(ready)
        self.seconds = seconds

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        half = max(1, self.shape[0] // 2)
        yield self.inner.tensor[:half]
        self.ready.write_text(str(os.getpid()))
        time.sleep(self.seconds)
        yield self.inner.tensor[half:]


class SourceFailed(RuntimeError):
    """Raised by :class:`HalfThenFail`; the kit checks that it reaches the caller."""


def _ensure_backend(name: str, class_path: str) -> None:
    from jasper.registry import list_backends, register_backend

    if name not in list_backends():
        register_backend(name, class_path)


def _kill_target(backend: str, class_path: str, target: str, ready: str,
                 options_json: str) -> None:
    from jasper.store import write_store

    _ensure_backend(backend, class_path)
    from jasper.testing.data import make_arrays

    arrays, manifest = make_arrays(48, 8, seed=3)
    sources: dict[str, Any] = dict(arrays)
    sources["steering_residual"] = HalfThenStall(arrays["steering_residual"], Path(ready))
    write_store(target, sources, manifest, backend=backend, progress=False,
                **json.loads(options_json))


def _read_mapped(backend: str, class_path: str, path: str) -> None:
    """Open ``path`` mapped and touch every byte of every array; report what happened as JSON.

    A mapped file shorter than its header claims kills the process with SIGBUS here, which the
    parent reports instead of dying itself.
    """
    from jasper.errors import JasperError
    from jasper.schema import ARRAYS
    from jasper.store import open_store

    _ensure_backend(backend, class_path)
    try:
        with open_store(path, backend, mmap=True) as reader:
            for name in ARRAYS:
                t = reader.map(name)
                if t.numel():
                    t.to(torch.float64).sum()  # touches every page of the map
        result: dict[str, Any] = {"raised": None}
    except Exception as exc:
        result = {"raised": type(exc).__name__, "jasper": isinstance(exc, JasperError),
                  "message": str(exc)[:500]}
    print(json.dumps(result))


def _list_backends(heavy: Sequence[str]) -> None:
    import jasper

    names = sorted(jasper.list_backends())
    loaded = sorted(m for m in heavy if m in sys.modules)
    print(json.dumps({"names": names, "heavy_loaded": loaded}))


def main(argv: Sequence[str]) -> None:
    command, *args = argv
    if command == "kill-target":
        _kill_target(*args)
    elif command == "read-mapped":
        _read_mapped(*args)
    elif command == "list-backends":
        _list_backends(args)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
