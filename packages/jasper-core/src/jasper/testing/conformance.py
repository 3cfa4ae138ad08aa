"""The backend conformance kit: a pytest base class every storage backend subclasses.

Usage, in a backend package's tests::

    import pytest
    import jasper
    from jasper.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        heavy_modules = ("mylib",)      # imported by the backend, never by listing

        @pytest.fixture
        def backend(self):
            return jasper.get_backend("mine")

Capabilities default to ``backend.capabilities`` and write presets to
``backend.write_presets``; set the class attributes below to override them. Format-specific
corruption can replace the generic hooks (``corrupt_truncate``, ``files_to_delete``,
``corrupt_wrong_shape``). Every test's docstring says what it proves and how to fix a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import jasper
from jasper.backend import BackendEntrypoint, Capabilities, StoreReader
from jasper.errors import CapabilityError, FormatError, IntegrityError, JasperError
from jasper.manifest import MANIFEST_NAME, Manifest
from jasper.schema import ARRAYS
from jasper.store import TMP_MARK, TRASH_MARK, clean_leftovers
from jasper.testing import _workers
from jasper.testing.compact import CompactIndicesConformance
from jasper.testing.data import make_arrays
from jasper.testing.datasets import DatasetConformance
from jasper.testing.derived import DerivedSteeringConformance

#: Modules no backend listing may import (a listing that does costs every user seconds).
DEFAULT_HEAVY_MODULES: tuple[str, ...] = (
    "h5py",
    "zarr",
    "numcodecs",
    "chromadb",
    "sqlite3",
    "pandas",
    "pyarrow",
    "scipy",
    "sklearn",
)

_HAVE_MAPS = Path("/proc/self/maps").exists()
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw bits as an integer tensor of the same width (so -0.0 != 0.0, NaN == NaN)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.dtype.is_floating_point:
        return t.view(_INT_VIEW[t.element_size()])
    return t


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Fail unless ``actual`` has ``expected``'s dtype, shape and exact bits; the message names
    the first differing element."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(actual)}"
    assert actual.dtype == expected.dtype, (
        f"{what}: dtype {actual.dtype}, expected {expected.dtype}")
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    )
    a, e = bits(actual), bits(expected)
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        pos = tuple(int(x) for x in diff[0])
        raise AssertionError(
            f"{what}: {int(diff.shape[0])} element(s) differ, first at {pos}: got "
            f"{actual[pos].item()!r}, expected {expected[pos].item()!r} (bits {a[pos].item():#x} "
            f"vs {e[pos].item():#x})"
        )


def data_files(path: Path) -> list[Path]:
    """The files of a dataset directory except the manifest, largest first."""
    files = [f for f in Path(path).rglob("*") if f.is_file() and f.name != MANIFEST_NAME]
    return sorted(files, key=lambda f: (-f.stat().st_size, str(f)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must see exactly this process's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("JASPER_PROGRESS", "0")
    env.update(extra)
    return env


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: Ctrl-C's default action,
    as in a terminal. A shell starts background jobs with SIGINT ignored and children inherit
    that, so a test suite launched with ``&`` would otherwise send its signal into the void."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def class_path(backend: BackendEntrypoint) -> str:
    """``"module:Class"`` of a backend instance (for children that must register it)."""
    return f"{type(backend).__module__}:{type(backend).__qualname__}"


def leftovers(target: Path) -> list[Path]:
    """Temporary or trash directories that writes to ``target`` left beside it."""
    parent = target.parent
    return sorted(
        p for mark in (TMP_MARK, TRASH_MARK) for p in parent.glob(f".{target.name}{mark}*")
    )


def read_everything(reader: StoreReader) -> dict[str, torch.Tensor]:
    """Ask the reader for every catalogue array (info and data), whatever it says it holds."""
    reader.array_names()
    out = {}
    for name in ARRAYS:
        reader.info(name)
        out[name] = reader.read(name)
    return out


@dataclass
class KitDataset:
    """A dataset the kit wrote: where, and what went in."""

    path: Path
    arrays: dict[str, torch.Tensor]
    manifest: Manifest


#: An unknown manifest key, nested, that every backend must carry through unchanged.
UNKNOWN_KEY = "kit_unknown_key"
UNKNOWN_VALUE: dict[str, Any] = {"nested": [1, 2.5, "three", None, True], "empty": {}}

#: (embedding dtype, negative_tiers dtype) pairs: together they cover every allowed dtype.
DTYPE_CASES: list[tuple[str, str]] = [
    ("float32", "int64"),
    ("float16", "int8"),
    ("bfloat16", "int16"),
    ("float64", "int32"),
    ("float32", "uint8"),
]


class BackendConformance(DatasetConformance, DerivedSteeringConformance,
                         CompactIndicesConformance):
    """Subclass this with one fixture, ``backend``, returning the backend instance.

    Besides the store-level tests below, it runs the dataset-level tests of
    :class:`~jasper.testing.datasets.DatasetConformance`: both dataset kinds on the backend.

    Class attributes (all optional):

    - ``capabilities``: the flags to test (default ``backend.capabilities``).
    - ``write_presets``: name -> write options to round-trip (default ``backend.write_presets``).
    - ``write_options``: options for every other write of the kit (default: none).
    - ``heavy_modules``: modules the backend imports that listing must not import.
    - ``optional_files``: glob patterns of files whose deletion is allowed to go unnoticed
      (caches, indexes the backend rebuilds).
    - ``n_pairs`` / ``embedding_dim``: size of the kit's datasets (keep them small).
    """

    capabilities: ClassVar[Capabilities | None] = None
    write_presets: ClassVar[dict[str, dict[str, Any]] | None] = None
    write_options: ClassVar[dict[str, Any]] = {}
    heavy_modules: ClassVar[tuple[str, ...]] = ()
    optional_files: ClassVar[tuple[str, ...]] = ()
    n_pairs: ClassVar[int] = 48
    embedding_dim: ClassVar[int] = 8
    worker_timeout: ClassVar[float] = 120.0
    subprocess_timeout: ClassVar[float] = 180.0

    # --- the fixture a subclass provides ---------------------------------------------------
    @pytest.fixture
    def backend(self) -> BackendEntrypoint:
        """Override in the subclass: return the backend instance under test."""
        raise NotImplementedError(
            "subclass BackendConformance and define a `backend` fixture returning the backend, "
            "e.g. `return jasper.get_backend('mine')`"
        )

    # --- hooks a subclass may override -----------------------------------------------------
    def caps(self, backend: BackendEntrypoint) -> Capabilities:
        """The capability flags under test."""
        return self.capabilities or backend.capabilities

    def presets(self, backend: BackendEntrypoint) -> dict[str, dict[str, Any]]:
        """The write presets to round-trip."""
        presets = self.write_presets if self.write_presets is not None else backend.write_presets
        return dict(presets) or {"default": {}}

    def write_dataset(
        self,
        backend: BackendEntrypoint,
        path: Path,
        arrays: dict[str, Any],
        manifest: Manifest,
        **options: Any,
    ) -> Path:
        """Write a dataset with the backend (override for a read-only backend: build its files
        some other way)."""
        opts = {**self.write_options, **options}
        return jasper.write_store(path, arrays, manifest, backend=backend.name, progress=False,
                                  **opts)

    def corrupt_truncate(self, path: Path) -> Path | None:
        """Truncate the dataset's largest file to half its size; return it (None skips)."""
        victim = data_files(path)[0]
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
        return victim

    def files_to_delete(self, path: Path) -> list[Path]:
        """Files whose deletion must be reported, one at a time (default: every data file not
        matched by ``optional_files``)."""
        return [
            f for f in data_files(path)
            if not any(fnmatch(f.relative_to(path).as_posix(), pat) for pat in self.optional_files)
        ]

    def corrupt_wrong_shape(self, path: Path, other: Path) -> Path | None:
        """Replace one file of ``path`` by the same-named file of ``other``, a dataset of the same
        backend with a different number of pairs (so its arrays have other shapes). Picks a
        steering file when the backend stores one file per array, else the largest common
        file. Returns the replaced file (None skips)."""
        common = [f for f in data_files(path) if (other / f.relative_to(path)).is_file()]
        if not common:
            return None
        steering = [f for f in common if "steering_centroid" in f.name]
        victim = (steering or common)[0]
        shutil.copyfile(other / victim.relative_to(path), victim)
        return victim

    # --- building datasets ---------------------------------------------------------------
    def make(self, **kwargs: Any) -> tuple[dict[str, torch.Tensor], Manifest]:
        """The kit's dataset: :func:`make_arrays` with special values and an unknown key."""
        kwargs.setdefault("special_values", True)
        arrays, manifest = make_arrays(self.n_pairs, self.embedding_dim, **kwargs)
        manifest.extra[UNKNOWN_KEY] = json.loads(json.dumps(UNKNOWN_VALUE))
        return arrays, manifest

    def write(self, backend: BackendEntrypoint, path: Path, **kwargs: Any) -> KitDataset:
        """Make and write a kit dataset at ``path`` (``kwargs`` go to :meth:`make`, except
        ``options``, the write options)."""
        options = kwargs.pop("options", {})
        arrays, manifest = self.make(**kwargs)
        out = self.write_dataset(backend, path, arrays, manifest, **options)
        return KitDataset(Path(out), arrays, manifest)

    def require_write(self, backend: BackendEntrypoint) -> None:
        custom = type(self).write_dataset is not BackendConformance.write_dataset
        if not self.caps(backend).write and not custom:
            pytest.skip("the backend cannot write and the subclass provides no write_dataset")

    @pytest.fixture
    def dataset(self, backend: BackendEntrypoint, tmp_path: Path) -> KitDataset:
        """A fresh kit dataset written with the backend under test."""
        self.require_write(backend)
        return self.write(backend, tmp_path / "kit-dataset")

    def assert_round_trip(self, reader: StoreReader, arrays: dict[str, torch.Tensor]) -> None:
        names = set(reader.array_names())
        missing = [n for n in ARRAYS if n not in names]
        assert not missing, f"array_names() lacks {missing}"
        for name, expected in arrays.items():
            info = reader.info(name)
            assert tuple(info.shape) == tuple(expected.shape), (
                f"info({name!r}).shape = {info.shape}, expected {tuple(expected.shape)}")
            assert info.dtype == expected.dtype, (
                f"info({name!r}).dtype = {info.dtype}, expected {expected.dtype}")
            assert_bit_equal(reader.read(name), expected, f"read({name!r})")

    # === registry ===========================================================================
    def test_listed_by_list_backends(self, backend: BackendEntrypoint) -> None:
        """The backend is listed by ``jasper.list_backends()`` under its ``name`` and
        ``jasper.get_backend(name)`` returns the same class.

        Fix: register it from a plugin module exposed under the ``jasper.backends`` entry-point
        group (``[project.entry-points."jasper.backends"]`` in pyproject.toml) whose
        ``jasper_register_backends(register)`` calls ``register(name, "pkg.module:Class")``;
        reinstall the package so the entry point exists; make ``name`` match.
        """
        assert backend.name, "the backend class must set `name` (the engine string users pass)"
        listed = jasper.list_backends()
        assert backend.name in listed, f"{backend.name!r} is not listed; listed: {sorted(listed)}"
        assert type(jasper.get_backend(backend.name)) is type(backend)

    def test_listing_imports_no_heavy_module(self, backend: BackendEntrypoint) -> None:
        """Listing backends in a fresh interpreter imports none of h5py, zarr, chromadb,
        sqlite3... nor the modules in ``heavy_modules``; an entry-point backend is listed there.

        Fix: keep the plugin module import-light (register the class by its ``"module:Class"``
        path, never import the class module there) and import heavy libraries inside ``open``
        and ``write_arrays``, not at module level.
        """
        heavy = sorted(set(DEFAULT_HEAVY_MODULES) | set(self.heavy_modules))
        proc = subprocess.run(
            [sys.executable, "-m", "jasper.testing._workers", "list-backends", *heavy],
            capture_output=True, text=True, env=child_env(), timeout=self.subprocess_timeout,
        )
        assert proc.returncode == 0, f"listing in a subprocess failed:\n{proc.stderr[-3000:]}"
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["heavy_loaded"] == [], (
            f"listing backends imported {result['heavy_loaded']}")
        info = jasper.list_backends()[backend.name]
        if info.distribution is not None:
            assert backend.name in result["names"], (
                f"{backend.name!r} (from {info.distribution}) is not listed in a fresh process: "
                f"{result['names']}")

    def test_metadata_and_presets(self, backend: BackendEntrypoint) -> None:
        """The backend describes itself and its write presets are accepted options.

        Fix: set ``description`` (one line) and ``capabilities``; every preset in
        ``write_presets`` may only use keyword-only parameters of your ``write_arrays``; a
        backend with the ``compression`` capability accepts a ``compression`` option.
        """
        import inspect

        assert backend.description.strip(), "set a one-line `description`"
        assert isinstance(self.caps(backend), Capabilities)
        if not self.caps(backend).write:
            return
        params = inspect.signature(backend.write_arrays).parameters
        accepted = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        for preset, options in self.presets(backend).items():
            unknown = set(options) - accepted
            assert not unknown, f"preset {preset!r} uses options {unknown} that write_arrays lacks"
        if self.caps(backend).compression:
            assert "compression" in accepted, (
                "compression capability without a `compression` option")

    # === round trips ========================================================================
    @pytest.mark.parametrize(("dtype", "tier_dtype"), DTYPE_CASES)
    def test_round_trip_bit_exact(self, backend: BackendEntrypoint, tmp_path: Path, dtype: str,
                                  tier_dtype: str) -> None:
        """Every array comes back bit-exactly (values, dtype, shape) through ``write_store`` and
        ``open_store``: ``info``, ``read``, ``read_into`` (into a view of a larger buffer),
        ``read_slice``, ``read_rows`` (any order, repeats, empty) and ``iter_chunks``. The data
        holds -0.0, subnormals and the largest finite values, ragged keyword ids with empty rows
        first, last and in between, and shuffled (unsorted) splits.

        Fix: store the exact bytes with the logical dtype (bfloat16 as its uint16 bit pattern,
        see ``jasper.dtypes.to_storage/from_storage``); never cast, normalise or sort; return
        CPU tensors of the logical dtype; handle zero-row arrays and slices.
        """
        self.require_write(backend)
        ds = self.write(backend, tmp_path / "rt", dtype=dtype, tier_dtype=tier_dtype)
        with jasper.open_store(ds.path, backend.name) as reader:
            self.assert_round_trip(reader, ds.arrays)
            for name, expected in ds.arrays.items():
                n = expected.shape[0]
                # read returns a tensor the caller owns: changing it must not change the store
                first = reader.read(name)
                if first.numel():
                    where = _mapping_of(first.data_ptr()) if _HAVE_MAPS else ""
                    assert not where, (f"read({name!r}) returned a tensor mapped from {where}; "
                                       "read must return a copy in RAM (map() is for maps)")
                    first.zero_()
                assert_bit_equal(reader.read(name), expected, f"read({name!r}) after the caller "
                                 "modified an earlier read (read must return a copy)")
                buf = torch.full((n + 2, *expected.shape[1:]), 7, dtype=expected.dtype)
                out = reader.read_into(name, buf[1 : n + 1])
                assert_bit_equal(buf[1 : n + 1], expected, f"read_into({name!r})")
                assert out.data_ptr() == buf[1].data_ptr() or n == 0, (
                    f"read_into({name!r}) must fill and return `out`, not a new tensor")
                assert int((bits(buf[0]) != bits(torch.full_like(buf[0], 7))).sum()) == 0 and \
                    int((bits(buf[-1]) != bits(torch.full_like(buf[-1], 7))).sum()) == 0, (
                    f"read_into({name!r}) wrote outside `out`")
                for start, stop in {(0, 0), (0, n), (1, n - 1), (n - 1, n), (n, n), (n // 2, n)}:
                    if 0 <= start <= stop <= n:
                        assert_bit_equal(reader.read_slice(name, start, stop), expected[start:stop],
                                         f"read_slice({name!r}, {start}, {stop})")
                empty = torch.empty(0, dtype=torch.int64)
                assert_bit_equal(reader.read_rows(name, empty), expected[empty],
                                 f"read_rows({name!r}, [])")
                if n:
                    g = torch.Generator().manual_seed(n)
                    rows = torch.randint(0, n, (2 * n + 1,), generator=g)
                    rows[0], rows[-1] = n - 1, 0
                    assert_bit_equal(reader.read_rows(name, rows), expected[rows],
                                     f"read_rows({name!r}, unsorted with repeats)")
                for step in (5, None):
                    chunks = list(reader.iter_chunks(name, step))
                    assert chunks, f"iter_chunks({name!r}) yielded nothing (yield one empty chunk)"
                    if step:
                        big = [c.shape[0] for c in chunks if c.shape[0] > step]
                        assert not big, (
                            f"iter_chunks({name!r}, {step}) yielded chunks of {big} rows")
                    assert_bit_equal(torch.cat(chunks), expected, f"iter_chunks({name!r}, {step})")

    def test_row_and_slice_reads_any_indices(self, backend: BackendEntrypoint,
                                             dataset: KitDataset) -> None:
        """``read_rows`` and ``read_slice`` return exactly the requested rows for arbitrary
        (hypothesis-generated) index lists and ranges.

        Fix: keep the caller's order and repeats in ``read_rows`` (sort/unique for I/O, then
        un-permute with the inverse); accept int64 index tensors of any length, including 0.
        """
        hypothesis = pytest.importorskip("hypothesis")
        st = hypothesis.strategies
        names = ["pair_index", "steering_centroid", "pair_keyword_ids", "question_embs",
                 "negative_tiers", "val_idx"]
        with jasper.open_store(dataset.path, backend.name) as reader:

            @hypothesis.settings(max_examples=25, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(name=st.sampled_from(names), data=st.data())
            def check(name: str, data: Any) -> None:
                expected = dataset.arrays[name]
                n = expected.shape[0]
                if n:
                    rows = data.draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
                    idx = torch.tensor(rows, dtype=torch.int64)
                    assert_bit_equal(reader.read_rows(name, idx), expected[idx],
                                     f"read_rows({name!r}, {rows})")
                start = data.draw(st.integers(0, n))
                stop = data.draw(st.integers(start, n))
                assert_bit_equal(reader.read_slice(name, start, stop), expected[start:stop],
                                 f"read_slice({name!r}, {start}, {stop})")

            check()

    def test_every_write_preset_round_trips(self, backend: BackendEntrypoint,
                                            tmp_path: Path) -> None:
        """Each named preset in ``write_presets`` writes a dataset that reads back bit-exactly
        and passes ``jasper.validate(deep=True)``.

        Fix: the preset named in the failure breaks the round trip; check the code path its
        options select (compression filters, chunk sizes...) for lossy or truncated writes.
        """
        self.require_write(backend)
        for preset, options in self.presets(backend).items():
            ds = self.write(backend, tmp_path / f"preset-{preset}", options=options,
                            dtype="bfloat16")
            with jasper.open_store(ds.path, backend.name) as reader:
                try:
                    self.assert_round_trip(reader, ds.arrays)
                except AssertionError as exc:
                    raise AssertionError(f"preset {preset!r} ({options}): {exc}") from None
            report = jasper.validate(ds.path, deep=True, backend=backend.name)
            assert report.checksums_verified == len(ARRAYS), f"preset {preset!r}"

    def test_empty_val_split_and_pairs_without_keywords(self, backend: BackendEntrypoint,
                                                        tmp_path: Path) -> None:
        """A dataset whose val split is empty and whose pairs have no keyword ids at all
        (``pair_keyword_ids`` has zero values) round-trips and validates.

        Fix: write and read zero-length arrays (shape ``(0,)``) with their dtype; some formats
        need an explicit empty dataset rather than a skipped one.
        """
        self.require_write(backend)
        ds = self.write(backend, tmp_path / "empty", empty_val=True, zero_keyword_every=1)
        assert ds.arrays["val_idx"].shape == (0,) and ds.arrays["pair_keyword_ids"].shape == (0,)
        with jasper.open_store(ds.path, backend.name) as reader:
            self.assert_round_trip(reader, ds.arrays)
            for name in ("val_idx", "pair_keyword_ids"):
                assert_bit_equal(torch.cat(list(reader.iter_chunks(name))), ds.arrays[name],
                                 f"iter_chunks({name!r})")
        jasper.validate(ds.path, deep=True, backend=backend.name)

    def test_convert_round_trips(self, backend: BackendEntrypoint, dataset: KitDataset,
                                 tmp_path: Path) -> None:
        """``jasper.convert`` copies a dataset of this backend bit-exactly to this backend and,
        when one is installed, through another backend and back (core compares checksums).

        Fix: ``iter_chunks`` must stream every row once, in order, with the stored dtype;
        ``write_arrays`` must accept any chunk sizes the source yields.
        """
        same = jasper.convert(dataset.path, tmp_path / "same", to=backend.name,
                              src_backend=backend.name, progress=False, **self.write_options)
        hops = [same.dst]
        others = [n for n in jasper.list_backends()
                  if n != backend.name and jasper.get_backend(n).capabilities.write]
        if others:
            via = "pt" if "pt" in others else others[0]
            there = jasper.convert(dataset.path, tmp_path / f"via-{via}", to=via,
                                   src_backend=backend.name, progress=False)
            back = jasper.convert(there.dst, tmp_path / "back", to=backend.name,
                                  src_backend=via, progress=False, **self.write_options)
            hops.append(back.dst)
        for path in hops:
            assert Manifest.load(path).extra.get(UNKNOWN_KEY) == UNKNOWN_VALUE
            with jasper.open_store(path, backend.name) as reader:
                self.assert_round_trip(reader, dataset.arrays)

    # === manifest ===========================================================================
    def test_manifest_survives_and_checksums_verify(self, backend: BackendEntrypoint,
                                                    dataset: KitDataset) -> None:
        """``config.json`` keeps the seed's keys and unknown keys unchanged, records the writer,
        and ``jasper.validate(deep=True)`` verifies every array's checksum.

        Fix: never write or rewrite ``config.json`` yourself (core writes it last); read the
        manifest passed to ``open`` instead of re-deriving it; if checksums fail, the bytes
        your reader returns differ from the bytes written.
        """
        m = Manifest.load(dataset.path)
        assert m.extra.get(UNKNOWN_KEY) == UNKNOWN_VALUE, "unknown manifest keys must be kept"
        for key in ("embedding_dim", "n_neg", "n_clusters", "dataset_name", "split_sizes",
                    "steering_probabilities"):
            assert getattr(m, key) == getattr(dataset.manifest, key), f"manifest key {key!r}"
        assert (m.writer or {}).get("backend") == backend.name
        assert set(m.arrays) == set(ARRAYS)
        for name, rec in m.arrays.items():
            assert rec.shape == tuple(dataset.arrays[name].shape), name
            assert rec.checksum, f"no checksum recorded for {name!r}"
        with jasper.open_store(dataset.path, backend.name) as reader:
            assert reader.manifest.extra.get(UNKNOWN_KEY) == UNKNOWN_VALUE
        report = jasper.validate(dataset.path, deep=True, backend=backend.name)
        assert report.ok and report.checksums_verified == len(ARRAYS)

    # === guessing ===========================================================================
    def test_guess_can_open_own_dataset(self, backend: BackendEntrypoint,
                                        dataset: KitDataset) -> None:
        """``guess_can_open`` is true on the backend's own dataset (as ``str`` and ``Path``), and
        ``open_store(path)`` with auto-detection opens it with this backend.

        Fix: list your format's marker files in ``marker_files`` (or override
        ``guess_can_open`` with a cheap check: no parsing, no heavy imports).
        """
        assert backend.guess_can_open(dataset.path)
        assert backend.guess_can_open(str(dataset.path))
        with jasper.open_store(dataset.path) as reader:
            assert reader.backend_name == backend.name

    def test_guess_can_open_rejects_non_datasets(self, backend: BackendEntrypoint,
                                                 tmp_path: Path) -> None:
        """``guess_can_open`` is false (and does not raise) on an empty directory, a regular
        file, and a path that does not exist.

        Fix: check that the path is a directory holding your marker files; catch nothing
        broadly, just test existence.
        """
        empty = tmp_path / "empty"
        empty.mkdir()
        a_file = tmp_path / "a_file.bin"
        a_file.write_bytes(b"not a dataset")
        for p in (empty, a_file, tmp_path / "missing"):
            assert backend.guess_can_open(p) is False, f"guess_can_open({p}) should be False"

    def test_guess_can_open_rejects_other_backends(self, backend: BackendEntrypoint,
                                                   tmp_path: Path) -> None:
        """``guess_can_open`` is false on datasets written by every other installed backend
        (skipped when none is installed).

        Fix: choose marker files no other format uses (``config.json`` is everyone's).
        """
        others = [n for n in jasper.list_backends() if n != backend.name]
        arrays, manifest = self.make()
        checked, unusable = [], []
        for name in others:
            try:
                other = jasper.get_backend(name)
                if not other.capabilities.write:
                    continue
                path = jasper.write_store(tmp_path / f"other-{name}", arrays, manifest,
                                          backend=name, progress=False)
            except Exception as exc:  # another backend's bug is its own kit's failure, not ours
                unusable.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            assert not backend.guess_can_open(path), (
                f"guess_can_open is true on a dataset written by backend {name!r}")
            checked.append(name)
        if not checked:
            pytest.skip("no other installed backend could write a dataset"
                        + (f" ({'; '.join(unusable)})" if unusable else ""))

    # === lifecycle ==========================================================================
    def test_reopen_after_close(self, backend: BackendEntrypoint, dataset: KitDataset) -> None:
        """Closing a reader keeps tensors it returned valid, ``close`` may be called twice, and
        the dataset opens again with identical data.

        Fix: in ``close`` release handles and maps you own but never free memory behind a
        tensor you handed out (``read`` returns copies); make ``close`` idempotent.
        """
        reader = jasper.open_store(dataset.path, backend.name)
        before = {n: reader.read(n) for n in ("steering_centroid", "pair_keyword_ids")}
        reader.close()
        reader.close()
        for name, t in before.items():
            assert_bit_equal(t, dataset.arrays[name], f"{name!r} read before close")
        with jasper.open_store(dataset.path, backend.name) as again:
            self.assert_round_trip(again, dataset.arrays)

    # === one dataset version, files inside the dataset ======================================
    def test_reader_during_commit_sees_one_version(self, backend: BackendEntrypoint,
                                                   tmp_path: Path) -> None:
        """A writer process commits two versions of a dataset to one path again and again (core's
        atomic directory swap) while this process opens and reads it: every reader must serve
        arrays of one version only, the one its manifest describes (the re-mine +
        ``reload_negatives`` workflow).

        Fix: open every file through ``self.files`` (:class:`jasper.files.DatasetDir`, pinned
        when the reader is created), never by path, and open lazily only through it.
        """
        self.require_write(backend)
        if not backend.capabilities.pinned_reads:
            pytest.skip("the backend declares pinned_reads=False")
        from jasper.manifest import checksum

        versions = []
        for seed in (1, 2):
            arrays, manifest = make_arrays(n_pairs=48, embedding_dim=8, seed=seed)
            versions.append(self.write_dataset(backend, tmp_path / f"v{seed}", arrays, manifest))
        target = tmp_path / "live"
        shutil.copytree(versions[0], target)
        script = (
            "import shutil, sys, time\n"
            "from jasper.store import atomic_directory\n"
            "target, a, b, stop = sys.argv[1:5]\n"
            "i = 0\n"
            "end = time.monotonic() + float(stop)\n"
            "while time.monotonic() < end:\n"
            "    with atomic_directory(target, overwrite=True) as tmp:\n"
            "        shutil.copytree((a, b)[i % 2], tmp, dirs_exist_ok=True)\n"
            "    i += 1\n"
            "print(i)\n"
        )
        writer = subprocess.Popen([sys.executable, "-c", script, str(target), str(versions[0]),
                                   str(versions[1]), "4"], stdout=subprocess.PIPE, text=True)
        served = 0
        try:
            end = time.monotonic() + 3.5
            while time.monotonic() < end:
                try:
                    reader = jasper.open_store(target, backend.name)
                except (JasperError, FileNotFoundError):
                    continue  # between the two renames of a commit there is no dataset
                with reader:
                    for name in ("pair_index", "hard_negatives", "steering_residual",
                                 "source_embs"):
                        got = checksum(reader.read(name))
                        want = reader.manifest.arrays[name].checksum
                        assert got == want, (
                            f"{name!r} read during a commit belongs to another version than the "
                            f"reader's manifest (served {served} readers before): mixed data")
                served += 1
        finally:
            out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and int(out) > 2, "the writer did not commit repeatedly"
        assert served > 0, "no reader could open the dataset while it was being replaced"

    def test_members_outside_the_dataset_are_refused(self, backend: BackendEntrypoint,
                                                     dataset: KitDataset,
                                                     tmp_path: Path) -> None:
        """Each data file of the dataset replaced by a symlink to a copy outside it, by a
        directory, or by a self-referencing symlink: opening and reading every array raises a
        ``JasperError`` naming that file (by default a dataset reads only regular files inside
        its own directory) and never serves the outside copy silently.

        Fix: open files with ``self.files.open_fd`` / ``open_file`` / ``path_for``.
        """
        files = [p for p in sorted(dataset.path.iterdir())
                 if p.is_file() and p.name != MANIFEST_NAME
                 and not any(fnmatch(p.name, pat) for pat in self.optional_files)]
        assert files, "the dataset directory holds no data files"
        outside = tmp_path / "outside"
        outside.mkdir()
        for f in files:
            for kind in ("symlink", "directory", "loop"):
                d = tmp_path / f"case-{f.name}-{kind}"
                shutil.copytree(dataset.path, d)
                victim = d / f.name
                victim.unlink()
                if kind == "symlink":
                    shutil.copy(f, outside / f.name)
                    victim.symlink_to(outside / f.name)
                elif kind == "directory":
                    victim.mkdir()
                else:
                    victim.symlink_to(victim)
                with pytest.raises(JasperError) as e, jasper.open_store(d, backend.name) as r:
                    for name in r.array_names():
                        r.read(name)
                assert f.name in str(e.value), (
                    f"{f.name} as a {kind}: the error does not name the file: {e.value}")

    # === mapping ============================================================================
    def test_mmap_is_zero_copy(self, backend: BackendEntrypoint, dataset: KitDataset) -> None:
        """With the ``mmap`` capability, ``map(name)`` returns bit-exact tensors whose memory
        is a mapping of a file inside the dataset directory (checked in ``/proc/self/maps``),
        i.e. no copy in anonymous memory.

        Fix: build the tensor on the mapped file (``torch.load(mmap=True)``,
        ``torch.from_file``, ``torch.from_numpy(np.memmap(...))``) and return it without
        ``clone``, ``contiguous()`` on a non-contiguous view, or dtype conversion.
        """
        if not self.caps(backend).mmap:
            pytest.skip("the backend does not claim mmap")
        if not Path("/proc/self/maps").exists():
            pytest.skip("needs /proc/self/maps (Linux)")
        root = dataset.path.resolve()
        with jasper.open_store(dataset.path, backend.name, mmap=True) as reader:
            for name, expected in dataset.arrays.items():
                t = reader.map(name)
                assert_bit_equal(t, expected, f"map({name!r})")
                if t.numel() == 0:
                    continue
                mapped = _mapping_of(t.data_ptr())
                assert mapped, (f"map({name!r}) is not backed by a file mapping "
                                f"({mapped!r}): it is a copy in anonymous memory")
                assert Path(mapped).resolve().is_relative_to(root), (
                    f"map({name!r}) maps {mapped}, not a file of the dataset {root}")

    def test_mmap_refused_without_capability(self, backend: BackendEntrypoint,
                                             dataset: KitDataset) -> None:
        """Without the ``mmap`` capability, ``open_store(mmap=True)`` and ``reader.map()``
        raise ``CapabilityError``.

        Fix: do not override ``StoreReader.map`` unless the tensors are really mapped; if they
        are, claim ``mmap=True`` in ``capabilities``.
        """
        if self.caps(backend).mmap:
            pytest.skip("the backend claims mmap")
        with pytest.raises(CapabilityError):
            jasper.open_store(dataset.path, backend.name, mmap=True)
        with jasper.open_store(dataset.path, backend.name) as reader, \
                pytest.raises(CapabilityError):
            reader.map("question_embs")

    def test_row_access_reads_without_preload(self, backend: BackendEntrypoint,
                                              dataset: KitDataset) -> None:
        """With the ``row_access`` capability, ``read_rows`` and ``read_slice`` work without
        ever calling ``read`` (the whole-array preload).

        Fix: override ``read_rows``/``read_slice`` to read only the requested rows (sorted and
        de-duplicated for I/O, un-permuted after), or drop the ``row_access`` claim.
        """
        if not self.caps(backend).row_access:
            pytest.skip("the backend does not claim row_access")
        with jasper.open_store(dataset.path, backend.name) as reader:

            def no_preload(name: str) -> torch.Tensor:
                raise AssertionError(f"read({name!r}) was called by a row read")

            reader.read = no_preload  # type: ignore[method-assign]
            rows = torch.tensor([5, 0, 5, 3], dtype=torch.int64)
            for name in ("steering_residual", "hard_negatives", "question_embs"):
                assert_bit_equal(reader.read_rows(name, rows), dataset.arrays[name][rows],
                                 f"read_rows({name!r})")
                assert_bit_equal(reader.read_slice(name, 2, 9), dataset.arrays[name][2:9],
                                 f"read_slice({name!r})")

    # === DataLoader workers =================================================================
    @pytest.mark.parametrize("how", ["pickled-reader", "open-in-worker"])
    @pytest.mark.parametrize("context", ["fork", "spawn"])
    def test_dataloader_workers(self, backend: BackendEntrypoint, dataset: KitDataset,
                                context: str, how: str) -> None:
        """With ``worker_safe``, two forked and two spawned DataLoader workers read correct rows,
        both through a reader opened (and used) in the parent and through one each worker opens.

        Fix: keep only paths and plain settings in the pickled state (``__getstate__`` drops
        handles and maps); reopen lazily when ``os.getpid()`` differs from the opener's; never
        share an HDF5/SQLite handle across ``fork``.
        """
        import multiprocessing

        from torch.utils.data import DataLoader

        if not self.caps(backend).worker_safe:
            pytest.skip("the backend does not claim worker_safe")
        if context not in multiprocessing.get_all_start_methods():
            pytest.skip(f"start method {context!r} is not available here")
        n = dataset.arrays["pair_index"].shape[0]
        if how == "pickled-reader":
            reader = jasper.open_store(dataset.path, backend.name)
            reader.read_rows("steering_residual", torch.tensor([0]))  # handles open in parent
            ds: Any = _workers.PickledReaderRows(reader, n)
        else:
            reader = None
            ds = _workers.OpenInWorkerRows(backend, dataset.path, n)
        try:
            loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False,
                                multiprocessing_context=context, timeout=self.worker_timeout)
            seen: list[int] = []
            workers: set[int] = set()
            for batch in loader:
                rows = batch["row"]
                seen.extend(int(r) for r in rows)
                workers.update(int(w) for w in batch["worker"])
                assert all(int(p) != os.getpid() for p in batch["pid"])
                for name in _workers.WORKER_ARRAYS:
                    assert_bit_equal(batch[name], dataset.arrays[name][rows],
                                     f"{name!r} rows {rows.tolist()} from a {context} worker")
                q = dataset.arrays["pair_index"][rows, 0]
                assert_bit_equal(batch["question_emb"], dataset.arrays["question_embs"][q],
                                 f"question_embs rows from a {context} worker")
        finally:
            if reader is not None:
                reader.close()
        assert seen == list(range(n))
        assert workers == {0, 1}, f"expected both workers to serve batches, got {workers}"

    # === corruption =========================================================================
    def test_truncated_file_raises_typed_error(self, backend: BackendEntrypoint,
                                               dataset: KitDataset) -> None:
        """Opening and reading every array of a dataset whose largest file was truncated to
        half raises a ``jasper.errors.JasperError`` subclass (not OSError, zipfile or library
        errors) whose message names the dataset or the file.

        Fix: wrap the format library's exceptions in ``FormatError(path, problem, array=...)``;
        compare sizes from headers with the file size before mapping.
        """
        victim = self.corrupt_truncate(dataset.path)
        if victim is None:
            pytest.skip("corrupt_truncate returned None")
        with pytest.raises(JasperError) as info, \
                jasper.open_store(dataset.path, backend.name) as reader:
            read_everything(reader)
        _assert_names(info.value, victim, dataset.path)

    def test_truncated_file_mapped_raises_not_crashes(self, backend: BackendEntrypoint,
                                                      dataset: KitDataset) -> None:
        """With ``mmap``, mapping and touching every array of a truncated dataset raises a
        ``JasperError`` in a subprocess instead of killing it with SIGBUS.

        Fix: before handing out a map, check that the file holds ``offset + nbytes`` bytes
        (a map past the end of a file faults on first touch).
        """
        if not self.caps(backend).mmap:
            pytest.skip("the backend does not claim mmap")
        if self.corrupt_truncate(dataset.path) is None:
            pytest.skip("corrupt_truncate returned None")
        proc = subprocess.run(
            [sys.executable, "-m", "jasper.testing._workers", "read-mapped", backend.name,
             class_path(backend), str(dataset.path)],
            capture_output=True, text=True, env=child_env(), timeout=self.subprocess_timeout,
        )
        assert proc.returncode == 0, (
            f"reading a truncated dataset mapped killed the process (returncode "
            f"{proc.returncode}{', SIGBUS' if proc.returncode == -signal.SIGBUS else ''}):\n"
            f"{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["raised"] is not None, "reading a truncated dataset mapped raised nothing"
        assert result["jasper"], (
            f"raised {result['raised']}, not a JasperError: {result['message']}")

    def test_missing_file_raises_typed_error(self, backend: BackendEntrypoint,
                                             dataset: KitDataset, tmp_path: Path) -> None:
        """Deleting any one data file (each in turn, on a fresh copy) makes opening and reading
        every array raise a ``JasperError`` subclass naming the file or the dataset.

        Fix: check that a file exists before opening it and raise ``FormatError`` /
        ``DatasetNotFoundError`` with its path; do not leave an array out of ``array_names``
        and carry on. Files the backend can rebuild go in ``optional_files``.
        """
        files = self.files_to_delete(dataset.path)
        if not files:
            pytest.skip("files_to_delete returned nothing")
        for f in files:
            copy = tmp_path / f"missing-{f.name}"
            shutil.copytree(dataset.path, copy)
            victim = copy / f.relative_to(dataset.path)
            victim.unlink()
            try:
                with pytest.raises(JasperError) as info, \
                        jasper.open_store(copy, backend.name) as reader:
                    read_everything(reader)
            except pytest.fail.Exception:
                raise AssertionError(f"deleting {f.name} went unnoticed") from None
            _assert_names(info.value, victim, copy)
            shutil.rmtree(copy)

    def test_wrong_shape_raises_typed_error(self, backend: BackendEntrypoint,
                                            dataset: KitDataset, tmp_path: Path) -> None:
        """A file replaced by the same file of a dataset with other shapes never yields a
        non-jasper exception, and ``jasper.validate`` raises a ``ShapeError`` (or another
        ``IntegrityError``) naming an array.

        Fix: report each array's real shape and dtype from the file in ``info`` (not from the
        manifest), and wrap library errors in ``FormatError``.
        """
        self.require_write(backend)
        arrays, manifest = make_arrays(self.n_pairs // 2 + 3, self.embedding_dim, seed=11)
        other_path = self.write_dataset(backend, tmp_path / "other-shape", arrays, manifest)
        victim = self.corrupt_wrong_shape(dataset.path, Path(other_path))
        if victim is None:
            pytest.skip("corrupt_wrong_shape returned None")
        try:
            with jasper.open_store(dataset.path, backend.name) as reader:
                read_everything(reader)
        except JasperError:
            pass
        with pytest.raises(JasperError) as info:
            jasper.validate(dataset.path, backend=backend.name)
        err = info.value
        assert isinstance(err, (IntegrityError, FormatError)), (
            f"expected a ShapeError/IntegrityError (or FormatError), got {err!r}")
        named = getattr(err, "array", None) in ARRAYS or any(n in str(err) for n in ARRAYS)
        assert named, f"the error names no array: {err}"

    # === interrupted writes =================================================================
    def test_failed_write_leaves_nothing(self, backend: BackendEntrypoint,
                                         tmp_path: Path) -> None:
        """An array source that raises half-way through a write propagates its error and leaves
        no dataset and no temporary directory at the target.

        Fix: let exceptions from ``ArraySource.iter_chunks`` propagate out of
        ``write_arrays``; write only inside the directory core gives you; do not create the
        target yourself.
        """
        self.require_write(backend)
        arrays, manifest = self.make()
        sources: dict[str, Any] = dict(arrays)
        sources["steering_residual"] = _workers.HalfThenFail(arrays["steering_residual"])
        target = tmp_path / "failed"
        with pytest.raises(Exception) as info:
            self.write_dataset(backend, target, sources, manifest)
        assert _in_chain(info.value, _workers.SourceFailed), (
            f"the source's error was replaced by {info.value!r}")
        assert not target.exists(), "a failed write left a dataset at the target"
        assert leftovers(target) == [], f"a failed write left {leftovers(target)}"

    def test_failed_overwrite_keeps_old_dataset(self, backend: BackendEntrypoint,
                                                dataset: KitDataset) -> None:
        """A failed ``overwrite=True`` write leaves the previous dataset intact and valid.

        Fix: never delete or modify the target before core's commit; write only into the
        temporary directory passed to ``write_arrays``.
        """
        arrays, manifest = make_arrays(self.n_pairs, self.embedding_dim, seed=5)
        sources: dict[str, Any] = dict(arrays)
        sources["steering_centroid"] = _workers.HalfThenFail(arrays["steering_centroid"])
        with pytest.raises(Exception):  # noqa: B017 - any error; the point is what remains
            self.write_dataset(backend, dataset.path, sources, manifest, overwrite=True)
        with jasper.open_store(dataset.path, backend.name) as reader:
            self.assert_round_trip(reader, dataset.arrays)
        jasper.validate(dataset.path, deep=True, backend=backend.name)
        assert leftovers(dataset.path) == []

    def test_killed_writer_leaves_nothing_and_next_write_cleans(
        self, backend: BackendEntrypoint, tmp_path: Path
    ) -> None:
        """A writer killed with SIGKILL half-way leaves no dataset at the target; the next
        write to the target removes its temporary directory and succeeds.

        Fix: keep all work inside core's temporary directory (its name carries the writer's
        pid, which is how ``jasper.store.clean_leftovers`` knows it is dead); keep no state
        outside it (lock files, sidecar caches beside the target).
        """
        self.require_write(backend)
        if not hasattr(signal, "SIGKILL"):
            pytest.skip("needs SIGKILL")
        target = tmp_path / "killed"
        ready = tmp_path / "ready"
        proc = subprocess.Popen(
            [sys.executable, "-m", "jasper.testing._workers", "kill-target", backend.name,
             class_path(backend), str(target), str(ready), json.dumps(self.write_options)],
            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + self.subprocess_timeout
            while not ready.exists():
                if proc.poll() is not None:
                    _out, err = proc.communicate()
                    raise AssertionError(
                        f"the writer exited before half-way:\n{err.decode()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError("the writer never reached half-way")
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # reap it: a zombie still looks alive to clean_leftovers
        assert not target.exists(), "a killed write left a dataset at the target"
        left = leftovers(target)
        assert left, "expected the killed writer's temporary directory beside the target"
        ds = self.write(backend, target)
        assert leftovers(target) == [], f"the next write left {leftovers(target)} behind"
        assert clean_leftovers(target) == []
        with jasper.open_store(ds.path, backend.name) as reader:
            self.assert_round_trip(reader, ds.arrays)

    def test_read_only_backend_refuses_writes(self, backend: BackendEntrypoint,
                                              tmp_path: Path) -> None:
        """A backend without the ``write`` capability refuses ``write_store`` with
        ``CapabilityError`` and creates nothing.

        Fix: set ``capabilities.write=False`` only if ``write_arrays`` is not implemented.
        """
        if self.caps(backend).write:
            pytest.skip("the backend can write")
        arrays, manifest = self.make()
        with pytest.raises(CapabilityError):
            jasper.write_store(tmp_path / "ro", arrays, manifest, backend=backend.name)
        assert not (tmp_path / "ro").exists()


def _mapping_of(ptr: int) -> str | None:
    """The file mapped at address ``ptr`` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                path = parts[5].strip() if len(parts) > 5 else ""
                return path if path.startswith("/") else ""
    return None


def _in_chain(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _assert_names(err: BaseException, victim: Path, dataset: Path) -> None:
    msg = str(err)
    assert victim.name in msg or str(dataset) in msg or dataset.name in msg, (
        f"the error does not name the file {victim.name} or the dataset: {msg}")


__all__ = [
    "DEFAULT_HEAVY_MODULES",
    "DTYPE_CASES",
    "BackendConformance",
    "KitDataset",
    "assert_bit_equal",
    "bits",
    "child_env",
    "data_files",
    "leftovers",
    "read_everything",
]
