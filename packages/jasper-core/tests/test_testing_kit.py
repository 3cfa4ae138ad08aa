"""The conformance kit and the test-data functions of ``jasper.testing``.

The kit runs in full against a small backend defined here (one ``.npy`` per array, registered
at run time), which proves it needs nothing from jasper-pt; deliberately broken variants of that
backend prove that the kit's checks fail when they should.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jasper.backend import ArrayInfo, ArraySource, BackendEntrypoint, Capabilities, StoreReader
from jasper.dtypes import from_storage, to_storage, torch_dtype
from jasper.errors import FormatError
from jasper.manifest import Manifest
from jasper.schema import ALL_ARRAYS, ARRAYS
from jasper.testing import BackendConformance, csr_to_lists, make_arrays, write_seed_dataset
from jasper.testing.conformance import assert_bit_equal
from jasper.testing.data import SEED_CONFIG_KEYS
from jasper.validation import check_arrays

pytest_plugins = ["pytester"]

NAME = "kit-npy"


# --- a minimal backend: one .npy per array -------------------------------------------------
class NpyReader(StoreReader):
    backend_name = NAME

    # every file through the pinned directory (self.files): one dataset version, regular
    # files inside the dataset only
    def _load(self, name: str, mmap_mode: str | None) -> torch.Tensor:
        if name not in ALL_ARRAYS:
            raise self._missing(name)
        member = f"{name}.npy"
        try:
            with self.files.path_for(member) as p:
                arr = np.load(p, mmap_mode=mmap_mode, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise FormatError(self.files.member(member), f"unreadable .npy file: {exc}",
                              array=name) from None
        return from_storage(arr, "bfloat16" if arr.dtype == np.uint16 else str(arr.dtype))

    def array_names(self) -> list[str]:
        return [n for n in ALL_ARRAYS if self.files.exists(f"{n}.npy")]

    def info(self, name: str) -> ArrayInfo:
        t = self._load(name, "r")
        return ArrayInfo(tuple(t.shape), t.dtype)

    def read(self, name: str) -> torch.Tensor:
        return self._load(name, None)

    def map(self, name: str) -> torch.Tensor:
        return self._load(name, "r")

    def read_slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._load(name, "r")[start:stop].clone()

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self._load(name, "r").index_select(0, rows)


class NpyBackend(BackendEntrypoint):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = "one .npy per array (conformance kit self-test)"
    capabilities: ClassVar[Capabilities] = Capabilities(write=True, mmap=True, row_access=True)
    # other backends store .npy files too, so a file of our own marks our datasets
    marker_files: ClassVar[tuple[str, ...]] = ("kit-npy.format",)

    def open(self, path: Path, manifest: Manifest) -> StoreReader:
        return NpyReader(Path(path), manifest)

    def write_arrays(self, directory: Path, arrays: Mapping[str, ArraySource],
                     manifest: Manifest, *, progress: Any = None) -> None:
        for name, source in arrays.items():
            np.save(directory / f"{name}.npy", to_storage(source.materialize()))
        (directory / "kit-npy.format").write_text("1\n")


@pytest.fixture
def npy_backend(register_for_test: Any) -> BackendEntrypoint:
    return register_for_test(NAME, NpyBackend)


class TestKitOnNpyBackend(BackendConformance):
    """The whole kit passes on a correct backend that jasper-core's tests define themselves."""

    optional_files = ("kit-npy.format",)  # only marks the format; reading does not need it

    @pytest.fixture
    def backend(self, npy_backend: BackendEntrypoint) -> BackendEntrypoint:
        return npy_backend


# --- the kit fails on broken backends -------------------------------------------------------
BROKEN = textwrap.dedent(
    """
    import numpy as np
    import pytest
    import torch

    import jasper
    from jasper.backend import Capabilities
    from jasper.dtypes import to_storage
    from jasper.testing import BackendConformance
    from test_testing_kit import NpyBackend, NpyReader


    class Reader(NpyReader):
        pass


    class Broken(NpyBackend):
        name = "kit-broken"

        def open(self, path, manifest):
            return Reader(path, manifest)


    {body}


    class TestBroken(BackendConformance):
        heavy_modules = {heavy!r}

        @pytest.fixture
        def backend(self):
            jasper.register_backend("kit-broken", Broken, force=True)
            yield jasper.get_backend("kit-broken")
            jasper.registry.unregister_backend("kit-broken")
    """
)


def run_broken(pytester: pytest.Pytester, body: str, select: str,
               heavy: tuple[str, ...] = ()) -> pytest.RunResult:
    pytester.makepyfile(test_broken=BROKEN.format(body=textwrap.dedent(body), heavy=heavy))
    return pytester.runpytest("-q", "-p", "no:cacheprovider", "-k", select)


def test_kit_catches_a_lossy_bfloat16_store(pytester: pytest.Pytester) -> None:
    body = """
    def _lossy(self, directory, arrays, manifest, *, progress=None):
        for name, source in arrays.items():
            t = source.materialize()
            if t.dtype == torch.bfloat16:  # via float16: exact for unit vectors, not extremes
                t = t.float().half().bfloat16()
            np.save(directory / f"{name}.npy", to_storage(t))
    Broken.write_arrays = _lossy
    """
    result = run_broken(pytester, body, "round_trip_bit_exact")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*round_trip_bit_exact*bfloat16*"])


def test_kit_catches_raw_library_errors(pytester: pytest.Pytester) -> None:
    body = """
    def _raw(self, name, mmap_mode):
        arr = np.load(self.path / f"{name}.npy", mmap_mode=mmap_mode)  # no typed errors
        return torch.from_numpy(np.array(arr))
    Reader._load = _raw
    """
    result = run_broken(pytester, body, "truncated_file_raises or missing_file or mapped_raises")
    result.assert_outcomes(failed=3)


def test_kit_catches_a_copy_pretending_to_be_a_map(pytester: pytest.Pytester) -> None:
    body = """
    Reader.map = lambda self, name: self._load(name, None)
    """
    result = run_broken(pytester, body, "mmap_is_zero_copy")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*anonymous memory*"])


def test_kit_catches_a_swallowed_source_error(pytester: pytest.Pytester) -> None:
    body = """
    def _swallow(self, directory, arrays, manifest, *, progress=None):
        for name, source in arrays.items():
            try:
                t = source.materialize()
            except RuntimeError:
                t = torch.zeros(source.shape, dtype=source.dtype)
            np.save(directory / f"{name}.npy", to_storage(t))
    Broken.write_arrays = _swallow
    """
    result = run_broken(pytester, body, "failed_write_leaves_nothing")
    result.assert_outcomes(failed=1)


def test_kit_catches_a_reader_that_hands_out_its_cache(pytester: pytest.Pytester) -> None:
    body = """
    _cache = {}
    def _cached(self, name):
        key = (str(self.path), name)
        if key not in _cache:
            _cache[key] = self._load(name, None)
        return _cache[key]
    Reader.read = _cached
    """
    result = run_broken(pytester, body, "round_trip_bit_exact and float32-int64")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*must return a copy*"])


def test_kit_catches_a_heavy_import_at_listing(pytester: pytest.Pytester) -> None:
    # jasper.registry is always imported by listing, so declaring it heavy must fail the check
    result = run_broken(pytester, "", "imports_no_heavy", heavy=("jasper.registry",))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*listing backends imported*jasper.registry*"])


def test_kit_catches_a_guess_that_accepts_anything(pytester: pytest.Pytester) -> None:
    body = """
    Broken.guess_can_open = lambda self, path: True
    """
    result = run_broken(pytester, body, "rejects_non_datasets")
    result.assert_outcomes(failed=1)


def test_test_data_functions_work_without_pytest() -> None:
    import subprocess
    import sys

    from jasper.testing.conformance import child_env

    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from jasper.testing import make_arrays, write_seed_dataset\n"
        "a, m = make_arrays(8, 4)\n"
        "print(len(a))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(ARRAYS))


# --- make_arrays / write_seed_dataset -------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    n_pairs=st.integers(1, 40),
    dim=st.integers(1, 9),
    n_neg=st.integers(1, 5),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
    tier=st.sampled_from(["int64", "int32", "int16", "int8", "uint8"]),
    empty_val=st.booleans(),
    every=st.integers(0, 4),
    special=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_make_arrays_is_valid_and_deterministic(n_pairs: int, dim: int, n_neg: int, dtype: str,
                                                tier: str, empty_val: bool, every: int,
                                                special: bool, seed: int) -> None:
    kwargs = dict(n_neg=n_neg, dtype=dtype, tier_dtype=tier, empty_val=empty_val,
                  zero_keyword_every=every, special_values=special, seed=seed)
    arrays, manifest = make_arrays(n_pairs, dim, **kwargs)
    assert set(arrays) == set(ARRAYS)
    findings = check_arrays(arrays, manifest, strict=True)
    assert findings == []
    assert arrays["question_embs"].dtype == torch_dtype(dtype)
    assert arrays["negative_tiers"].dtype == torch_dtype(tier)
    lengths = arrays["pair_keyword_offsets"].diff()
    assert int(lengths[0]) == 0 and int(lengths[-1]) == 0
    if every:
        assert bool((lengths[::every] == 0).all())
    if empty_val:
        assert arrays["val_idx"].numel() == 0
    assert manifest.split_sizes == {s: int(arrays[f"{s}_idx"].numel())
                                    for s in ("train", "val", "test")}
    again, _ = make_arrays(n_pairs, dim, **kwargs)
    for name, t in arrays.items():
        assert_bit_equal(again[name], t, name)


def test_make_arrays_special_values_and_seeds_differ() -> None:
    a, _ = make_arrays(16, 8, special_values=True, dtype="float16")
    row = a["question_embs"][0, :6]
    assert torch.signbit(row[0]) and float(row[0]) == 0.0
    assert float(row[1]) == torch.finfo(torch.float16).max
    assert 0 < float(row[5]) < torch.finfo(torch.float16).tiny  # a subnormal
    b, _ = make_arrays(16, 8, seed=1)
    c, _ = make_arrays(16, 8, seed=2)
    assert not torch.equal(b["source_embs"], c["source_embs"])


def test_make_arrays_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dtype"):
        make_arrays(4, 4, dtype="int8")
    with pytest.raises(ValueError, match="tier_dtype"):
        make_arrays(4, 4, tier_dtype="float32")
    with pytest.raises(ValueError, match="positive"):
        make_arrays(0, 4)


def test_write_seed_dataset_matches_the_original_layout(tmp_path: Path) -> None:
    path = write_seed_dataset(tmp_path / "seed", n_pairs=30, embedding_dim=6, seed=4)
    arrays, _ = make_arrays(30, 6, seed=4)
    files = {f.name for f in path.iterdir()}
    expected = {f"{n}.pt" for n in ARRAYS if n != "pair_keyword_offsets"} | {"config.json"}
    assert files == expected
    config = json.loads((path / "config.json").read_text())
    assert set(config) == set(SEED_CONFIG_KEYS)
    assert config["embedding_dim"] == 6 and config["n_neg"] == 4
    assert config["split_sizes"]["train"] == int(arrays["train_idx"].numel())
    ids = torch.load(path / "pair_keyword_ids.pt", weights_only=True)
    assert isinstance(ids, list) and all(isinstance(x, list) for x in ids)
    assert ids == csr_to_lists(arrays["pair_keyword_offsets"], arrays["pair_keyword_ids"])
    assert [] in ids  # pairs with no keywords
    for name in ("question_embs", "hard_negatives", "val_idx"):
        assert_bit_equal(torch.load(path / f"{name}.pt", weights_only=True), arrays[name], name)
    with pytest.raises(FileExistsError):
        write_seed_dataset(path, n_pairs=30, embedding_dim=6, seed=4)


def test_write_seed_dataset_options(tmp_path: Path) -> None:
    arrays, manifest = make_arrays(10, 4, seed=9)
    path = write_seed_dataset(tmp_path / "s", arrays, manifest, curriculum=None,
                              extra_config={"clustering_source": "keywords", "n_pairs": 10})
    config = json.loads((path / "config.json").read_text())
    assert "curriculum" not in config
    assert config["clustering_source"] == "keywords" and config["n_pairs"] == 10
    path = write_seed_dataset(path, arrays, manifest, overwrite=True)
    assert json.loads((path / "config.json").read_text())["curriculum"]["epochs_total"] == 100
    with pytest.raises(TypeError):
        write_seed_dataset(tmp_path / "t", arrays, manifest, n_pairs=3)
