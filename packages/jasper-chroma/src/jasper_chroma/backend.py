"""The ``chroma`` backend entrypoint (chromadb is imported only by open and write)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jasper.backend import ArraySource, BackendEntrypoint, Capabilities, StoreReader
from jasper.errors import CapabilityError

if TYPE_CHECKING:
    from jasper.location import Location, ObjectStore
    from jasper.manifest import Manifest


class ChromaBackend(BackendEntrypoint):
    """Embedding tables as ChromaDB collections, other arrays as ``.npy`` beside them.

    Two locations (see :mod:`jasper_chroma.layout`): a local directory (a PersistentClient in
    ``chroma/``) and a dataset on a Chroma server, ``chroma://HOST:PORT/TENANT/DATABASE/NAME``,
    committed by core's generation protocol over :class:`jasper_chroma.objects.ChromaObjects`.
    Write option ``hnsw={...}`` overrides the bulk-load HNSW settings
    (:data:`jasper_chroma.layout.BULK_HNSW`).

    ``worker_safe`` is false: Chroma's client hangs in a process forked after it was used, so a
    forked worker that would touch Chroma is refused with a clear error (spawned workers work,
    and a preloaded dataset, the default, serves workers from memory).
    """

    name = "chroma"
    description = "embedding tables as ChromaDB collections, pair arrays as .npy beside them"
    url = "https://pypi.org/project/jasper-chroma/"
    # pinned_reads: a local reader opens every file of the version it pinned (the PersistentClient
    # included) before checking the version is still in place; a server reader reads one
    # generation, which commits never change
    capabilities = Capabilities(write=True, mmap=False, compression=False, row_access=True,
                                worker_safe=False, pinned_reads=True,
                                locations=("file", "chroma"))
    marker_files = ("chroma.json",)
    write_presets = {"default": {}}

    def object_store(self, location: Location) -> ObjectStore:
        from jasper_chroma.layout import ServerDataset
        from jasper_chroma.objects import ChromaObjects

        if location.scheme != "chroma":
            raise CapabilityError(f"backend 'chroma' takes local directories and chroma:// "
                                  f"URLs, not {location.scheme}:// ({location})")
        return ChromaObjects(ServerDataset.parse(location))

    def open(self, path: Path | Location, manifest: Manifest) -> StoreReader:
        from jasper_chroma.reader import ChromaReader

        return ChromaReader(path, manifest)

    def write_arrays(self, directory: Path | Location,
                     arrays: Mapping[str, ArraySource], manifest: Manifest, *,
                     hnsw: Mapping[str, Any] | None = None, progress: Any = None) -> None:
        from jasper_chroma.writer import write_dataset

        write_dataset(directory, arrays, manifest, hnsw=hnsw, progress=progress)

    def deep_check(self, path: Path | Location) -> list[str]:
        """Every collection holds exactly the rows ``chroma.json`` records."""
        from jasper.store import open_store
        from jasper_chroma.reader import ChromaReader

        problems = []
        with open_store(path, "chroma") as reader:
            assert isinstance(reader, ChromaReader)
            for table, rec in reader.layout.tables.items():
                have = reader.count(table)
                if have != rec.rows:
                    problems.append(f"collection {rec.collection!r} ({table}) holds {have} "
                                    f"rows, chroma.json records {rec.rows}")
        return problems
