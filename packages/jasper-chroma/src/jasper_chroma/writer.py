"""Writing a Chroma-backed dataset into the fresh directory jasper's core hands the backend."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.backend import ArraySource
from jasper.dtypes import dtype_name, to_storage
from jasper.errors import CapabilityError
from jasper.location import Location
from jasper_chroma.client import ChromaStoreError, get_client, release_client
from jasper_chroma.layout import (
    ARRAYS_DIR,
    BULK_HNSW,
    CHROMA_DIR,
    LAYOUT_FILE,
    Layout,
    ServerDataset,
    TableRecord,
    collection_name,
    table_names,
)
from jasper_chroma.objects import ChromaObjects
from jasper_chroma.reader import PAGE

if TYPE_CHECKING:
    from jasper.manifest import Manifest


def _write_npy(path: Path, source: ArraySource, on_bytes: Callable[[int], None]) -> None:
    n = 1
    for s in source.shape:
        n *= s
    first = True
    row = 0
    out: Any = None
    for chunk in source.iter_chunks(max(1, (64 << 20) // max(1, source.row_bytes()))):
        arr = to_storage(chunk)
        if first:
            first = False
            if n == 0:
                np.save(path, np.empty(source.shape, dtype=arr.dtype), allow_pickle=False)
                continue
            out = np.lib.format.open_memmap(path, mode="w+", dtype=arr.dtype, shape=source.shape)
        if n == 0:
            continue
        rows = arr.shape[0]
        out[row : row + rows] = arr
        row += rows
        on_bytes(arr.nbytes)
    if out is not None:
        out.flush()
        del out


def _npy_bytes(source: ArraySource, on_bytes: Callable[[int], None]) -> bytes:
    """The ``.npy`` file of ``source`` (storage dtype), for an object on a server."""
    out: np.ndarray | None = None
    row = 0
    for chunk in source.iter_chunks(max(1, (64 << 20) // max(1, source.row_bytes()))):
        arr = to_storage(chunk)
        if out is None:
            out = np.empty(source.shape, dtype=arr.dtype)
        if arr.ndim == 0:
            out[()] = arr
        else:
            out[row : row + arr.shape[0]] = arr
            row += arr.shape[0]
        on_bytes(arr.nbytes)
    if out is None:  # no chunk at all: an empty array of the source's storage dtype
        import torch

        out = to_storage(torch.empty(source.shape, dtype=source.dtype))
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


def _fill_collection(client: Any, name: str, src: ArraySource, config: Mapping[str, Any],
                     where: str, on_bytes: Callable[[int], None],
                     created: list[str] | None = None) -> None:
    try:
        col = client.create_collection(name, embedding_function=None, configuration=config,
                                       metadata={"jasper": "table"})
    except Exception as exc:
        raise ChromaStoreError(f"{where}: cannot create collection {name!r}: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from None
    if created is not None:
        created.append(name)
    row = 0
    for chunk in src.iter_chunks(PAGE):
        if chunk.shape[0] == 0:
            continue
        # float32 holds float16 and bfloat16 exactly; Chroma stores float32
        emb = chunk.float().numpy()
        try:
            col.add(ids=[str(i) for i in range(row, row + emb.shape[0])], embeddings=emb)
        except Exception as exc:
            raise ChromaStoreError(f"{where}: writing rows {row}.. of collection {name!r} "
                                   f"failed: {type(exc).__name__}: {str(exc)[:300]}") from None
        row += emb.shape[0]
        on_bytes(chunk.numel() * chunk.element_size())


def _refuse_float64(tables: list[str], arrays: Mapping[str, ArraySource]) -> None:
    wide = [t for t in tables if dtype_name(arrays[t].dtype) == "float64"]
    if wide:
        raise CapabilityError(
            f"backend 'chroma' cannot store float64 tables ({', '.join(wide)}): Chroma keeps "
            "float32, so values would change; write float32/float16/bfloat16 tables or use "
            "another backend")


def write_dataset(directory: Path | Location, arrays: Mapping[str, ArraySource],
                  manifest: Manifest, *, hnsw: Mapping[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None) -> None:
    """Tables into collections (ids = row numbers), everything else into ``.npy``.

    ``directory`` is core's fresh temporary directory (a local dataset: a PersistentClient in
    ``chroma/``, files in ``arrays/``) or one new generation's location on a server (collections
    ``jasper.NAME.GENERATION-TABLE``, objects in the dataset's object collection; core's
    generation commit deletes all of it when the write fails).
    """
    on_bytes = progress or (lambda n: None)
    tables_of_kind = table_names(manifest.dataset_kind)
    _refuse_float64(tables_of_kind, arrays)
    config = {"hnsw": {**BULK_HNSW, **dict(hnsw or {})}}
    if isinstance(directory, Location):
        _write_generation(directory, arrays, tables_of_kind, config, on_bytes)
        return
    prefix = f"jasper-{uuid.uuid4().hex[:12]}"
    location = directory / CHROMA_DIR
    location.mkdir()
    client = get_client(location)
    where = str(location)
    tables: dict[str, TableRecord] = {}
    try:
        for table in tables_of_kind:
            src = arrays[table]
            name = collection_name(prefix, table)
            _fill_collection(client, name, src, config, where, on_bytes)
            tables[table] = TableRecord(name, int(src.shape[0]), int(src.shape[1]),
                                        dtype_name(src.dtype))
        (directory / ARRAYS_DIR).mkdir()
        for name, src in arrays.items():
            if name not in tables:
                _write_npy(directory / ARRAYS_DIR / f"{name}.npy", src, on_bytes)
        Layout("local", None, tables).dump(directory)
    finally:
        release_client(location)  # core renames the directory next


def _write_generation(location: Location, arrays: Mapping[str, ArraySource],
                      tables_of_kind: list[str], config: Mapping[str, Any],
                      on_bytes: Callable[[int], None]) -> None:
    dataset = ServerDataset.parse(location)
    assert dataset.generation is not None, "core hands the writer a generation's location"
    objects = ChromaObjects(dataset)
    client = objects.client()
    prefix = f"generations/{dataset.generation}/"
    tables: dict[str, TableRecord] = {}
    for table in tables_of_kind:
        src = arrays[table]
        name = dataset.table_collection(dataset.generation, table)
        _fill_collection(client, name, src, config, dataset.url, on_bytes)
        tables[table] = TableRecord(name, int(src.shape[0]), int(src.shape[1]),
                                    dtype_name(src.dtype))
    for name, src in arrays.items():
        if name not in tables:
            objects.put(f"{prefix}{ARRAYS_DIR}/{name}.npy", _npy_bytes(src, on_bytes))
    objects.put(prefix + LAYOUT_FILE, Layout("server", dataset.server, tables).to_bytes())
