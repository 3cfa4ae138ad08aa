"""The zarr backend: one zarr v3 group per dataset, on local disk or at an ``s3://`` URL.

This module stays import-light (no zarr, numpy or obstore at module level): jasper imports
backend classes to list them and to ask ``guess_can_open``. Reading and writing live in
:mod:`jasper_zarr.reader` and :mod:`jasper_zarr.writer`, the client layer in
:mod:`jasper_zarr.stores`, the layout in :mod:`jasper_zarr.layout`.

At a URL, core commits each write as a generation (:mod:`jasper.location`): this backend
provides the byte operations (:meth:`ZarrBackend.object_store`) and writes its group under the
generation's prefix; the manifest and the pointer are core's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from jasper.backend import ArraySource, BackendEntrypoint, Capabilities, StoreReader
from jasper.errors import CapabilityError, DatasetNotFoundError
from jasper.location import Location, ObjectStore
from jasper.manifest import Manifest
from jasper_zarr.layout import DEFAULT_COMPRESSION, FORMAT_NAME, GROUP_FILE, PRESETS


class ZarrBackend(BackendEntrypoint):
    """Sharded zarr v3 arrays with crc32c on every chunk; local directories and s3:// URLs."""

    name: ClassVar[str] = "zarr"
    description: ClassVar[str] = (
        "zarr v3 sharded arrays (none / zstd / blosc-lz4) on local disk or s3://"
    )
    url: ClassVar[str] = "https://pypi.org/project/jasper-zarr/"
    # pinned_reads: a local group is read through descriptors of all its files opened when the
    # reader opens (jasper_zarr.pinned, on core's DatasetDir); at a URL the reader resolves the
    # generation pointer once and reads only that generation's immutable objects
    capabilities: ClassVar[Capabilities] = Capabilities(
        write=True, mmap=False, compression=True, row_access=True, worker_safe=True,
        locations=("file", "s3"), pinned_reads=True,
    )
    marker_files: ClassVar[tuple[str, ...]] = (GROUP_FILE,)
    write_presets: ClassVar[dict[str, dict[str, Any]]] = {k: dict(v) for k, v in PRESETS.items()}

    def guess_can_open(self, path: str | Path) -> bool:
        """A directory whose ``zarr.json`` is a jasper-zarr group (reads one small file)."""
        p = Path(path) / GROUP_FILE
        try:
            return p.is_file() and FORMAT_NAME.encode() in p.read_bytes()[:65536]
        except OSError:
            return False

    def object_store(self, location: Location) -> ObjectStore:
        from jasper_zarr.stores import S3Objects

        if location.scheme != "s3":
            raise CapabilityError(f"backend 'zarr' takes local directories and s3:// URLs, not "
                                  f"{location.scheme}:// ({location}); S3-compatible stores "
                                  "(GCS interop, MinIO...) are reached as s3:// with "
                                  "AWS_ENDPOINT_URL")
        return S3Objects(location)

    def open(self, path: Path | Location,  # type: ignore[override]
             manifest: Manifest) -> StoreReader:
        """Open the group at ``path`` (a directory, or a generation's location from core).
        The group metadata is read right away, so a missing or foreign group fails here."""
        from jasper_zarr.reader import ZarrReader

        if isinstance(path, Path) and not path.is_dir():
            raise DatasetNotFoundError(path)
        reader = ZarrReader(path, manifest)
        reader.check_open()
        return reader

    def write_arrays(  # type: ignore[override]
        self,
        directory: Path | Location,
        arrays: Mapping[str, ArraySource],
        manifest: Manifest,
        *,
        compression: str = DEFAULT_COMPRESSION,
        compression_level: int | None = None,
        shard_bytes: int | None = None,
        chunk_rows: int | None = None,
        progress: Any = None,
    ) -> None:
        """Write every array as one sharded zarr array of a new group at ``directory``.

        - ``compression``: ``"none"`` (default: crc32c only, the fastest preload and row
          reads), ``"zstd"`` or ``"blosc-lz4"`` (README "Choosing a preset" has the sizes and
          speeds measured).
        - ``compression_level``: zstd 1..22 (default 3) or blosc 1..9 (default 5).
        - ``shard_bytes``: target bytes of one shard object (default 64 MiB).
        - ``chunk_rows``: rows per inner chunk (default about 128 KiB of rows): the unit a lazy
          row read fetches.

        Bad values raise :class:`~jasper.errors.WriteOptionError`.
        """
        from jasper_zarr.writer import WriteOptions, write_group

        opts = WriteOptions.checked(compression, compression_level, shard_bytes, chunk_rows)
        write_group(directory, arrays, opts)

    def deep_check(self, path: Path | Location) -> list[str]:  # type: ignore[override]
        """Every chunk object the arrays' shapes imply is present (``validate --deep``);
        crc32c of every chunk is checked by the checksum pass reading all data."""
        from jasper.location import committed_generation, generation_prefix
        from jasper_zarr.reader import ZarrReader

        where: Path | Location = path
        if isinstance(path, Location) and not path.is_local:
            gen = committed_generation(self.object_store(path), path)
            where = path.join(generation_prefix(gen))
        # the chunk listing needs shapes and grids only, which the group records itself
        reader = ZarrReader(where, Manifest(embedding_dim=0, n_neg=0))
        problems = []
        for name in reader.array_names():
            problems += [f"{name}: chunk object {k!r} is missing"
                         for k in reader.missing_chunks(name)]
        return problems
