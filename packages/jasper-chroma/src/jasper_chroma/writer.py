"""Writing a Chroma-backed dataset into the fresh directory jasper's core hands the backend."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jasper.backend import ArraySource
from jasper.dtypes import dtype_name, to_storage
from jasper.errors import CapabilityError
from jasper_chroma.client import ChromaStoreError, get_client, release_client
from jasper_chroma.layout import (
    ARRAYS_DIR,
    BULK_HNSW,
    CHROMA_DIR,
    Layout,
    ServerLocation,
    TableRecord,
    collection_name,
    table_names,
)
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


def write_dataset(directory: Path, arrays: Mapping[str, ArraySource], manifest: Manifest, *,
                  server: str | None = None, hnsw: Mapping[str, Any] | None = None,
                  progress: Callable[[int], None] | None = None) -> None:
    """Tables into collections (ids = row numbers), everything else into ``arrays/*.npy``.

    Collections get a fresh ``jasper-<uid>`` prefix, so two writes never share one; on a server
    a failed write deletes the collections it created (it wrote them, nothing else).
    """
    on_bytes = progress or (lambda n: None)
    tables_of_kind = table_names(manifest.dataset_kind)
    wide = [t for t in tables_of_kind if dtype_name(arrays[t].dtype) == "float64"]
    if wide:
        raise CapabilityError(
            f"backend 'chroma' cannot store float64 tables ({', '.join(wide)}): Chroma keeps "
            "float32, so values would change; write float32/float16/bfloat16 tables or use "
            "another backend")
    prefix = f"jasper-{uuid.uuid4().hex[:12]}"
    location: Path | ServerLocation
    if server is not None:
        location = ServerLocation.parse(server)
    else:
        location = directory / CHROMA_DIR
        location.mkdir()
    client = get_client(location)
    where = location.url() if isinstance(location, ServerLocation) else str(location)
    config = {"hnsw": {**BULK_HNSW, **dict(hnsw or {})}}
    created: list[str] = []
    tables: dict[str, TableRecord] = {}
    try:
        for table in tables_of_kind:
            src = arrays[table]
            name = collection_name(prefix, table)
            try:
                col = client.create_collection(name, embedding_function=None,
                                               configuration=config)
            except Exception as exc:
                raise ChromaStoreError(f"{where}: cannot create collection {name!r}: "
                                       f"{type(exc).__name__}: {str(exc)[:300]}") from None
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
                    raise ChromaStoreError(f"{where}: writing rows {row}.. of {name!r} failed: "
                                           f"{type(exc).__name__}: {str(exc)[:300]}") from None
                row += emb.shape[0]
                on_bytes(chunk.numel() * chunk.element_size())
            tables[table] = TableRecord(name, int(src.shape[0]), int(src.shape[1]),
                                        dtype_name(src.dtype))
        (directory / ARRAYS_DIR).mkdir()
        for name, src in arrays.items():
            if name not in tables:
                _write_npy(directory / ARRAYS_DIR / f"{name}.npy", src, on_bytes)
        Layout("server" if server is not None else "local",
               location if isinstance(location, ServerLocation) else None, tables).dump(directory)
    except BaseException:
        if isinstance(location, ServerLocation):
            for name in created:
                with contextlib.suppress(Exception):  # a server gone away: nothing to remove
                    client.delete_collection(name)
        raise
    finally:
        if not isinstance(location, ServerLocation):
            release_client(location)  # core renames the directory next
