"""The ``chroma`` backend entrypoint (chromadb is imported only by open and write)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jasper.backend import ArraySource, BackendEntrypoint, Capabilities, StoreReader

if TYPE_CHECKING:
    from jasper.manifest import Manifest


class ChromaBackend(BackendEntrypoint):
    """Embedding tables as ChromaDB collections, other arrays as ``.npy`` beside them.

    Write options: ``server="chroma://HOST:PORT[/TENANT/DATABASE]"`` puts the collections on a
    Chroma server instead of the PersistentClient directory inside the dataset; ``hnsw={...}``
    overrides the bulk-load HNSW settings (:data:`jasper_chroma.layout.BULK_HNSW`).

    ``worker_safe`` is false: Chroma's client hangs in a process forked after it was used, so a
    forked worker that would touch Chroma is refused with a clear error (spawned workers work,
    and a preloaded dataset, the default, serves workers from memory).
    """

    name = "chroma"
    description = "embedding tables as ChromaDB collections, pair arrays as .npy beside them"
    url = "https://pypi.org/project/jasper-chroma/"
    # pinned_reads: the collections live in Chroma, outside the directory a reader pins, so a
    # reader open while a writer replaces the dataset is not guaranteed one version
    capabilities = Capabilities(write=True, mmap=False, compression=False, row_access=True,
                                worker_safe=False, pinned_reads=False)
    marker_files = ("chroma.json",)
    write_presets = {"default": {}}

    def open(self, path: Path, manifest: Manifest) -> StoreReader:
        from jasper_chroma.reader import ChromaReader

        return ChromaReader(Path(path), manifest)

    def write_arrays(self, directory: Path, arrays: Mapping[str, ArraySource],
                     manifest: Manifest, *, server: str | None = None,
                     hnsw: Mapping[str, Any] | None = None, progress: Any = None) -> None:
        from jasper_chroma.writer import write_dataset

        write_dataset(Path(directory), arrays, manifest, server=server, hnsw=hnsw,
                      progress=progress)

    def deep_check(self, path: Path) -> list[str]:
        """Every collection holds exactly the rows ``chroma.json`` records."""
        from jasper.manifest import Manifest
        from jasper_chroma.reader import ChromaReader

        reader = ChromaReader(Path(path), Manifest.load(path))
        problems = []
        for table, rec in reader.layout.tables.items():
            have = reader.count(table)
            if have != rec.rows:
                problems.append(f"collection {rec.collection!r} ({table}) holds {have} rows, "
                                f"chroma.json records {rec.rows}")
        return problems
