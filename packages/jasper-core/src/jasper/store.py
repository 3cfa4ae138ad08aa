"""Open, write and convert datasets through any installed backend.

Writes are atomic (docs/design.md#atomic-dataset-writes): the backend fills a temporary directory
beside the target; core fsyncs every file, writes ``config.json`` (checksums, shapes) last as the
commit marker and commits the directory with one atomic rename or exchange (:mod:`jasper.atomic`).
An interrupted write leaves no dataset at the target and never loses the old one; overwrite
replaces only a dataset; leftovers of dead writers are removed by the next write.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jasper.atomic import (
    SCRATCH_MARK,
    TMP_MARK,
    TRASH_MARK,
    atomic_directory,
    clean_leftovers,
    recover_interrupted_commit,
)
from jasper.backend import ArraySource, StoreReader, as_source
from jasper.dtypes import dtype_name
from jasper.errors import (
    CapabilityError,
    ChecksumError,
    DatasetExistsError,
    DatasetNotFoundError,
    JasperError,
    ManifestError,
    NoBackendCanOpenError,
    ShapeError,
    WriteOptionError,
)
from jasper.interrupts import checkpoint, holds_interrupts
from jasper.lazy import lazy_torch
from jasper.location import Location, as_target
from jasper.manifest import MANIFEST_NAME, ArrayRecord, Checksummer, Manifest
from jasper.progress import byte_bar
from jasper.registry import get_backend, guess_backend, list_backends
from jasper.schema import ARRAYS, PAIRS, Cols, Role, dataset_kind
from jasper.validation import check_array_names, check_claimed_sizes, check_manifest_trust

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_torch(globals())


def open_store(path: str | Path | Location, backend: str = "auto", *,
               mmap: bool = False) -> StoreReader:
    """Open the dataset directory (or object-store URL, see :mod:`jasper.location`) ``path``.

    ``backend="auto"`` uses the writer recorded in the manifest when installed, else asks every
    installed backend's ``guess_can_open``. ``mmap=True`` asks for zero-copy mapped arrays and
    raises :class:`CapabilityError` for a backend that cannot map.
    """
    p = as_target(path)
    if isinstance(p, Location):
        from jasper.remote import open_remote

        return open_remote(p, backend, mmap=mmap)
    if not p.is_dir():
        recover_interrupted_commit(p)
    if not p.is_dir():
        raise DatasetNotFoundError(p, hint="Check the path; `jasper synth DIR` creates a dataset")
    if not (p / MANIFEST_NAME).exists():
        from jasper.kinds import open_foreign

        foreign = open_foreign(p, backend)  # e.g. the original system's cluster-labeled layout
        if foreign is not None:
            return foreign
    manifest = Manifest.load(p)
    check_array_names(manifest.arrays, path=p / MANIFEST_NAME)
    name = choose_backend(p, manifest, backend)
    impl = get_backend(name)
    if mmap and not impl.capabilities.mmap:
        raise CapabilityError(
            f"backend {name!r} cannot memory-map {p}; open with mmap=False (preload) or convert it "
            f"to a backend that maps: "
            + ", ".join(n for n in list_backends() if get_backend(n).capabilities.mmap)
        )
    available = dir_size(p)
    ratio = float(getattr(impl, "max_compression_ratio",
                          _COMPRESSED_RATIO if impl.capabilities.compression else 1.0))
    check_claimed_sizes({n: (r.shape, _itemsize(r.dtype, p)) for n, r in manifest.arrays.items()},
                        available, max_ratio=ratio, path=p / MANIFEST_NAME, source="the manifest")
    reader = impl.open(p, manifest)
    try:
        check_claimed_sizes(_stored_claims(reader), available, max_ratio=ratio, path=p,
                            source=f"the {name} store")
    except BaseException:
        reader.close()
        raise
    return reader


def _stored_claims(reader: StoreReader) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shape and itemsize of every array as the store's own metadata says. An array whose
    metadata the backend already refuses is left to the backend, which raises on its use."""
    claims = {}
    for n in ARRAYS:
        try:
            if reader.has(n):
                i = reader.info(n)
                claims[n] = (tuple(i.shape), i.itemsize)
        except JasperError:
            continue
    return claims


#: Best compression ratio assumed of a compressing backend when bounding claimed sizes (a
#: backend may declare its own ``max_compression_ratio``): generous for constant arrays, yet a
#: claim of 10^15 rows still needs tens of GB of files.
_COMPRESSED_RATIO = float(1 << 16)


def _itemsize(dtype: str, path: Path) -> int:
    from jasper.dtypes import ITEMSIZE, LOGICAL_DTYPES

    try:
        return ITEMSIZE[dtype]
    except (KeyError, TypeError):
        raise ManifestError(path / MANIFEST_NAME, f"unknown dtype name {dtype!r}; known: "
                            f"{', '.join(sorted(LOGICAL_DTYPES))}") from None


def choose_backend(p: Path, manifest: Manifest, backend: str) -> str:
    """The backend to open ``p`` with. A forced backend that declares marker files must find
    one of them when the manifest names another writer; ``auto`` asks the recorded writer, then
    every backend, and when the recorded writer's files are partly gone names the missing one."""
    writer = (manifest.writer or {}).get("backend")
    if backend != "auto":
        impl = get_backend(backend)
        markers = impl.marker_files
        if writer and writer != backend and markers and not any(
                (p / m).exists() for m in markers):
            raise NoBackendCanOpenError(
                f"backend {backend!r} does not recognise {p} (it has none of "
                f"{', '.join(markers)}): the manifest says backend {writer!r} wrote it; open it "
                f"with backend={writer!r} (--backend {writer}) or 'auto'")
        return backend
    # the original system wrote .pt files: a seed-era directory holding some is a pt dataset
    seed_pt = manifest.is_seed_era and any(p.glob("*.pt"))
    expected = writer or ("pt" if seed_pt else None)
    try:
        return guess_backend(p, writer)
    except NoBackendCanOpenError:
        data_files = [f for f in p.iterdir() if f.name != MANIFEST_NAME
                      and not f.name.startswith(".")]
        if expected is None or expected not in list_backends() or not data_files:
            raise  # nothing of the dataset is there: the original's "No dataset files found"
        missing = [m for m in get_backend(expected).marker_files if not (p / m).exists()]
        if not missing:
            raise
        raise DatasetNotFoundError(
            p / missing[0], "required file " + " or ".join(repr(m) for m in missing)
            + f" of this {expected} dataset",
            "the dataset is incomplete: restore the file or rewrite the dataset") from None


class _HashingSource(ArraySource):
    """Pass chunks through while checksumming them and counting rows and bytes."""

    def __init__(self, name: str, source: ArraySource, on_bytes: Any) -> None:
        self.name = name
        self.inner = source
        self.shape = source.shape
        self.dtype = source.dtype
        self.hasher = Checksummer()
        self.rows = 0
        self.consumed = False
        self._on_bytes = on_bytes

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        if self.consumed:
            raise RuntimeError(f"array {self.name!r} was iterated twice by the backend writer")
        self.consumed = True
        for chunk in self.inner.iter_chunks(rows_per_chunk):
            if chunk.dtype != self.dtype or tuple(chunk.shape[1:]) != tuple(self.shape[1:]):
                raise ShapeError(
                    f"array {self.name!r}: a chunk has shape {tuple(chunk.shape)} and dtype "
                    f"{chunk.dtype}, expected rows of {self.shape[1:]} and {self.dtype}",
                    array=self.name, rule="chunk shape",
                )
            chunk = chunk.contiguous()
            self.hasher.update(chunk)
            self.rows += chunk.shape[0] if chunk.dim() else 1
            self._on_bytes(chunk.numel() * chunk.element_size())
            checkpoint()  # Ctrl-C held during the write stops it here, between chunks
            yield chunk

    def materialize(self) -> torch.Tensor:
        return ArraySource.materialize(self)


def check_layout(arrays: Mapping[str, ArraySource], manifest: Manifest) -> None:
    """Shape-level checks before a write (no data read): every array of the manifest's kind
    present, ranks, dtypes, columns and row counts consistent. Value checks are
    :func:`jasper.validate`'s job."""
    from jasper.kinds import kind_job

    kind_job(manifest.dataset_kind, "check_layout")(arrays, manifest)


def check_steering_layout(arrays: Mapping[str, ArraySource], manifest: Manifest) -> None:
    """:func:`check_layout` of the ``jasper-steering`` kind (derived steering: the derived
    steering arrays are not stored, those of kept variants and the exception arrays are,
    :mod:`jasper.steering`)."""
    from jasper.steering import check_exception_layout, derived_spec, stored_names

    derived = derived_spec(manifest)
    expected = stored_names(manifest)
    if derived is not None:
        given = [n for n in derived.derived_arrays if n in arrays]
        if given:
            raise ShapeError(f"the manifest declares derived steering, so {', '.join(given)} "
                             "must not be written (each batch computes them)", array=given[0],
                             rule="derived steering not stored")
    missing = [n for n in expected if n not in arrays]
    if missing:
        from jasper.build import missing_report

        raise ShapeError(missing_report([], missing), array=missing[0], rule="required array")
    unknown = [n for n in arrays if n not in expected]
    if unknown:
        raise ShapeError(f"unknown arrays {', '.join(unknown)}; the data model has: "
                         f"{', '.join(expected)}", array=unknown[0], rule="known array")
    if derived is not None:
        check_exception_layout({n: arrays[n] for n in (*derived.stored_arrays, *expected)
                                if n not in ARRAYS or n in derived.stored_arrays}, derived,
                               manifest.embedding_dim)
    n_pairs = arrays["pair_index"].shape[0]
    for name, spec in ARRAYS.items():
        if name not in arrays:
            continue  # derived steering
        src = arrays[name]
        shape = tuple(src.shape)
        if len(shape) != spec.rank:
            raise ShapeError(f"{name} has shape {shape}, expected rank {spec.rank}", array=name,
                             rule="rank")
        if dtype_name(src.dtype) not in spec.dtypes:
            raise ShapeError(f"{name} has dtype {dtype_name(src.dtype)}, allowed: "
                             f"{', '.join(sorted(spec.dtypes))}", array=name, rule="dtype")
        want = {Cols.EMBEDDING_DIM: manifest.embedding_dim, Cols.N_NEG: manifest.n_neg,
                Cols.TWO: 2}.get(spec.cols) if spec.cols else None
        if want is not None and shape[1] != want:
            raise ShapeError(f"{name} has {shape[1]} columns, expected {want}",
                             array=name, rule="columns")
        if spec.role is Role.PAIR and shape[0] != n_pairs:
            raise ShapeError(f"{name} has {shape[0]} rows but pair_index has {n_pairs}",
                             array=name, rule="pair rows")
        if spec.role is Role.CSR_OFFSETS and shape[0] != n_pairs + 1:
            raise ShapeError(f"{name} has {shape[0]} rows, expected N_p + 1 = {n_pairs + 1}",
                             array=name, rule="csr offsets rows")
    # compact index arrays: a narrow dtype must hold every row of the table it references
    from jasper.index_dtypes import check_index_capacity

    rows = {n: int(src.shape[0]) for n, src in arrays.items() if len(tuple(src.shape))}
    check_index_capacity({n: dtype_name(src.dtype) for n, src in arrays.items()},
                         {**rows, PAIRS: n_pairs}, n_tiers=manifest.n_tiers)


def _report_all_missing(arrays: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """A hand-made steering manifest and arrays: every missing key and array in one error,
    each with what builds it (instead of one ``ManifestError`` per key)."""
    from jasper.build import missing_report

    if (dict(manifest).get("kind") or dataset_kind(None).name) != dataset_kind(None).name:
        return  # other kinds' required keys are their own check_layout's
    keys = [k for k in ("embedding_dim", "n_neg") if k not in manifest]
    names = [n for n in ARRAYS if n not in arrays]
    if keys:
        raise ShapeError(missing_report(keys, names), array=names[0] if names else None,
                         rule="required array")


def _accepted_options(backend: Any) -> list[str]:
    sig = inspect.signature(backend.write_arrays)
    return [
        p.name for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "progress"
    ]


def _check_options(backend: Any, options: Mapping[str, Any]) -> None:
    accepted = _accepted_options(backend)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise WriteOptionError(
            f"backend {backend.name!r} does not accept option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


def dir_size(path: str | Path | Location) -> int:
    """Bytes on disk of every file under ``path`` (of the committed objects at a URL)."""
    p = as_target(path)
    if isinstance(p, Location):
        from jasper.remote import remote_size

        return remote_size(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@holds_interrupts
def write_store(
    path: str | Path | Location,
    arrays: Mapping[str, torch.Tensor | ArraySource],
    manifest: Manifest | Mapping[str, Any],
    *,
    backend: str = "pt",
    overwrite: bool = False,
    progress: bool | None = None,
    protect: tuple[str | Path, ...] = (),
    expect_checksums: Mapping[str, str] | None = None,
    **options: Any,
) -> Path:
    """Write a dataset directory atomically with ``backend``.

    ``arrays`` maps every array of :data:`jasper.schema.ARRAYS` to a tensor or an
    :class:`~jasper.backend.ArraySource` (for data larger than RAM). ``options`` are the
    backend's write options (e.g. ``compression="lzf"`` for hdf5); unknown ones raise
    :class:`WriteOptionError` listing what the backend accepts. ``overwrite`` replaces only an
    existing dataset (:class:`~jasper.errors.OverwriteRefusedError` for anything else);
    ``protect`` names paths the target must neither be, contain nor lie inside (a conversion's
    source). ``expect_checksums`` (array -> checksum) makes any other checksum of the bytes
    written a :class:`~jasper.errors.ChecksumError` before the commit, so nothing unverified is
    committed. OS failures are :class:`~jasper.errors.StorageError` naming the file and what to
    do. Returns the dataset path (the :class:`~jasper.location.Location` for an object-store
    URL, committed by generation: see :mod:`jasper.location`).
    """
    where = as_target(path)
    impl = get_backend(backend)
    if isinstance(where, Location):
        from jasper.remote import require_location_support

        require_location_support(impl, where)
    if not impl.capabilities.write:
        raise CapabilityError(f"backend {backend!r} cannot write datasets")
    _check_options(impl, options)
    if not isinstance(manifest, Manifest):
        _report_all_missing(arrays, manifest)
    m = copy.deepcopy(manifest) if isinstance(manifest, Manifest) else Manifest.from_dict(dict(manifest))
    sources = {n: as_source(a) for n, a in arrays.items()}
    check_layout(sources, m)
    total = sum(s.nbytes for s in sources.values())
    if isinstance(where, Location):
        from jasper.remote import write_remote

        return write_remote(  # type: ignore[return-value]
            where, impl, lambda gen: _fill(gen, where, impl, backend, sources, m, total,
                                           progress, options, expect_checksums),
            overwrite=overwrite)
    target = where.absolute()
    with atomic_directory(target, overwrite=overwrite, protect=protect) as tmp:
        _fill(tmp, target, impl, backend, sources, m, total, progress, options,
              expect_checksums)
        m.dump(tmp, fsync=False)  # config.json last: it is the commit marker
    return target


def _fill(into: Path | Location, target: Path | Location, impl: Any, backend: str,
          sources: Mapping[str, ArraySource], m: Manifest, total: int, progress: bool | None,
          options: Mapping[str, Any], expect_checksums: Mapping[str, str] | None) -> Manifest:
    """Let the backend write every array into ``into`` (a temporary directory, or a new
    generation's location) while core hashes them; fills ``m.arrays`` and stamps ``m``."""
    with byte_bar(total, f"writing {target.name} ({backend})", progress) as update:
        hashing = {n: _HashingSource(n, s, update) for n, s in sources.items()}
        impl.write_arrays(into, hashing, m, **options)
    for n, h in hashing.items():
        expected = h.shape[0] if h.shape else 1
        if not h.consumed or h.rows != expected:
            raise JasperError(
                f"backend {backend!r} wrote {h.rows} of {expected} rows of {n!r}; this is a bug "
                "in the backend"
            )
    m.arrays = {
        n: ArrayRecord(tuple(h.shape), dtype_name(h.dtype), h.hasher.hexdigest())
        for n, h in hashing.items()
    }
    _verify_checksums(m, expect_checksums or {}, target)
    m.stamp(backend, _backend_version(backend), _json_options(options))
    return m


def _verify_checksums(m: Manifest, expected: Mapping[str, str],
                      target: Path | Location) -> None:
    for n, want in expected.items():
        got = m.arrays[n].checksum if n in m.arrays else None
        if got != want:
            raise ChecksumError(
                f"{n}: the bytes read have checksum {got} but the source's manifest records "
                f"{want}; the source array was changed or corrupted after it was written, so "
                "nothing was written", array=n, rule="checksum", path=str(target))


def _json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The write options worth recording in the manifest (JSON values only)."""
    import json

    out = {}
    for k, v in options.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue
        out[k] = v
    return out


def _backend_version(name: str) -> str | None:
    info = list_backends().get(name)
    return info.version if info else None


@dataclass
class ConvertReport:
    """What :func:`convert` did: both sizes on disk, the target's write options (given, and
    carried over from the source), the source options not carried, and the time it took."""

    src: Path | Location
    dst: Path | Location
    src_backend: str
    dst_backend: str
    src_bytes: int
    dst_bytes: int
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    carried: dict[str, Any] = field(default_factory=dict)
    not_carried: dict[str, str] = field(default_factory=dict)
    #: ``--derive-steering``: what checking the stored steering found (exceptions kept)
    derived: Any = None

    @property
    def saving(self) -> float:
        """Fraction of the source size saved (negative when the target is larger)."""
        return 1.0 - self.dst_bytes / self.src_bytes if self.src_bytes else 0.0

    def options_line(self) -> str:
        """One line on the target's options: what it got and what of the source's it did not."""
        got = ", ".join(f"{k}={v!r}" + (" (from the source)" if k in self.carried else "")
                        for k, v in self.options.items()) or f"{self.dst_backend} defaults"
        line = f"target options: {got}"
        if self.not_carried:
            line += "; not carried: " + "; ".join(f"{k} ({why})" for k, why in
                                                  self.not_carried.items())
        return line

    def __str__(self) -> str:
        mb = 1024 * 1024
        return (
            f"converted {self.src} ({self.src_backend}, {self.src_bytes / mb:.1f} MiB) -> "
            f"{self.dst} ({self.dst_backend}, {self.dst_bytes / mb:.1f} MiB): "
            f"{self.saving * 100:+.1f}% saved, {self.seconds:.1f} s; {self.options_line()}"
            + (f"; {self.derived}" if self.derived is not None else "")
        )


def _carry_options(source: Manifest, src_backend: str, to: str,
                   given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The source's recorded write options the target takes (same backend: all; another: those
    whose value is one of the target's own presets), and why each other one is not carried.
    Options go together (a compression and its level), so when the caller gives any of the
    recorded ones, none is carried."""
    recorded = (source.writer or {}).get("options") or {}
    if any(k in given for k in recorded):
        return {}, {f"{k}={v!r}": "options were given for the target" for k, v in recorded.items()
                    if k not in given}
    impl = get_backend(to)
    accepted = _accepted_options(impl)
    known: dict[str, list[Any]] = {}
    for preset in impl.write_presets.values():
        for k, v in preset.items():
            known.setdefault(k, []).append(v)
    carried: dict[str, Any] = {}
    dropped: dict[str, str] = {}
    for k, v in recorded.items():
        if k not in accepted:
            dropped[f"{k}={v!r}"] = f"backend {to!r} has no {k!r} option"
        elif to == src_backend or v in known.get(k, []):
            carried[k] = v
        else:
            dropped[f"{k}={v!r}"] = f"not a value backend {to!r} is known to take; pass one"
    return carried, dropped


def _kind_arrays(manifest: Manifest) -> tuple[str, ...]:
    """The arrays a dataset with this manifest stores (its kind's; derived steering's)."""
    if manifest.dataset_kind == dataset_kind(None).name:
        from jasper.steering import stored_names

        return stored_names(manifest)
    return tuple(dataset_kind(manifest.dataset_kind).arrays)


@holds_interrupts
def convert(
    src: str | Path | Location,
    dst: str | Path | Location,
    *,
    to: str,
    src_backend: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    derive_steering: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    keep_steering: Sequence[str] | str | None = None,
    **options: Any,
) -> ConvertReport:
    """Convert the dataset at ``src`` into backend ``to`` at ``dst``, streaming array by array.

    ``derive_steering`` (a formula of :data:`jasper.steering.FORMULAS`, e.g. ``"jasper-v1"``)
    writes the target with derived steering: every stored steering row (checksum verified) is
    checked against the formula and the rows it does not reproduce within ``atol`` + ``rtol``
    * ``|stored|`` (defaults :data:`~jasper.steering.DEFAULT_ATOL`, ``DEFAULT_RTOL``) are kept
    as stored exceptions, so the batches served do not change; the report counts them.
    ``keep_steering`` (variant names ``centroid``, ``keyword``, ``residual``; at most two)
    keeps those variants stored: their arrays are copied (checksums verified like any copied
    array), not compared, and only the other variants are derived.

    Bit-exact and verified: a jasper-written source must record a checksum for every array and
    an unedited manifest (:func:`jasper.validation.check_manifest_trust`), and every array's
    bytes must match its recorded checksum before the target is committed. The source's write
    options (e.g. its compression) are carried where the target takes them; the report says
    what the target got. Unknown manifest keys are kept.
    """
    t0 = time.perf_counter()
    src_at = as_target(src)
    src_bytes = dir_size(src_at) if isinstance(src_at, Location) or src_at.is_dir() else 0
    with open_store(src, src_backend) as reader:
        names = [n for n in _kind_arrays(reader.manifest) if reader.has(n)]
        check_manifest_trust(reader.manifest, names, reader.path)
        sources: dict[str, Any] = {n: reader.source(n) for n in names}
        manifest = copy.deepcopy(reader.manifest)
        # the source's checksums, before a derivation rewrites the manifest's array records:
        # every array copied is verified against them
        recorded = {n: rec.checksum for n, rec in manifest.arrays.items() if rec.checksum}
        derived = None
        if keep_steering and derive_steering is None:
            raise WriteOptionError("keep_steering (--keep-steering) names the steering "
                                   "variants a derived dataset keeps stored: it needs "
                                   "derive_steering (--derive-steering)")
        if derive_steering is not None:
            sources, manifest, derived = _derive_sources(reader, sources, manifest,
                                                         derive_steering, atol, rtol,
                                                         keep_steering)
        expected = {n: c for n, c in recorded.items() if n in sources}
        carried, dropped = _carry_options(manifest, reader.backend_name, to, options)
        opts = {**carried, **options}
        out = write_store(dst, sources, manifest, backend=to, overwrite=overwrite,
                          progress=progress, protect=(src_at,) if isinstance(src_at, Path) else (), expect_checksums=expected,
                          **opts)
        src_name = reader.backend_name
    return ConvertReport(src_at, out, src_name, to, src_bytes, dir_size(out),
                         time.perf_counter() - t0, opts, carried, dropped, derived)


class _RowSlices:
    """``x[start:stop]`` of a stored array through the reader (no whole copy)."""

    def __init__(self, reader: StoreReader, name: str) -> None:
        self.reader, self.name = reader, name

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.reader.read_slice(self.name, rows.start, rows.stop)


def _derive_sources(reader: StoreReader, sources: dict[str, Any], manifest: Manifest,
                    formula_name: str, atol: float | None, rtol: float | None,
                    keep: Sequence[str] | str | None = None
                    ) -> tuple[dict[str, Any], Manifest, Any]:
    """The sources and manifest of a conversion to derived steering (see :func:`convert`)."""
    from jasper import steering

    if steering.derived_spec(manifest) is not None:
        raise WriteOptionError(f"{reader.path}: its steering is derived already")
    try:
        f = steering.formula(formula_name)
        kept_names = steering.kept_variants(keep)
    except ValueError as exc:
        raise WriteOptionError(str(exc)) from None
    kept_arrays = {steering.STEERING[steering.KEEPABLE.index(n)] for n in kept_names}
    # the derived steering arrays are read, not copied: verify their bytes as a copy would be
    # (the kept ones are copied, and verified by the copy)
    for n in (a for a in steering.STEERING if a not in kept_arrays):
        rec = manifest.arrays.get(n)
        if rec is not None and rec.checksum:
            h = Checksummer()
            for chunk in reader.iter_chunks(n):
                h.update(chunk)
            if h.hexdigest() != rec.checksum:
                raise ChecksumError(
                    f"{n}: the bytes read have checksum {h.hexdigest()} but the manifest "
                    f"records {rec.checksum}; nothing was written", array=n, rule="checksum",
                    path=str(reader.path))
    mapped = get_backend(reader.backend_name).capabilities.mmap
    tables = {n: reader.map(n) if mapped else reader.read(n) for n in steering.FORMULA_INPUTS}
    stored = {n: reader.map(n) if mapped else _RowSlices(reader, n) for n in steering.STEERING}
    dtype = reader.info(steering.STEERING[0]).dtype
    for n in steering.STEERING[1:]:
        dtype = torch.promote_types(dtype, reader.info(n).dtype)
    try:
        out, m, report = steering.derive_arrays(
            {**tables, **stored}, manifest, f, dtype=dtype,
            atol=steering.DEFAULT_ATOL if atol is None else atol,
            rtol=steering.DEFAULT_RTOL if rtol is None else rtol, keep=kept_names)
    except ValueError as exc:  # a kept array of another dtype than the one served
        raise WriteOptionError(f"{reader.path}: {exc}") from None
    kept = {n: s for n, s in sources.items()
            if n not in steering.STEERING or n in kept_arrays}
    for n in steering.EXCEPTION_ARRAYS:
        kept[n] = out[n]
    return kept, m, report


__all__ = [
    "MANIFEST_NAME",
    "SCRATCH_MARK",
    "TMP_MARK",
    "TRASH_MARK",
    "ConvertReport",
    "DatasetExistsError",
    "atomic_directory",
    "choose_backend",
    "clean_leftovers",
    "convert",
    "dir_size",
    "open_store",
    "write_store",
]
