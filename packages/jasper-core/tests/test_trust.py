"""What core must not take on trust: a manifest's checksum list and data-describing keys, a
tensor's strides, claimed sizes, array names, and what the OS says on a write."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import jasper
from jasper.backend import TensorSource
from jasper.errors import (
    ChecksumError,
    DatasetNotFoundError,
    FormatError,
    ManifestError,
    NoBackendCanOpenError,
    ShapeError,
    StorageError,
)
from jasper.manifest import Manifest
from jasper.registry import get_backend
from jasper.store import open_store, write_store
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper.validation import check_array_names, check_claimed_sizes, check_tensor_layout


def edit_manifest(ds: Path, fn: Callable[[dict], None]) -> None:
    path = ds / "config.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def corrupt_pt(ds: Path, name: str) -> None:
    """Change one value of a .pt array in place (a silent corruption)."""
    t = torch.load(ds / f"{name}.pt", weights_only=True)
    t.view(-1)[0] += 1
    torch.save(t, ds / f"{name}.pt")


# --- item 11: checksum list and data-describing keys ------------------------------------------
def test_removed_checksum_fails_deep_validation_and_convert(
    small_dataset: Path, copy_dataset: Callable[[Path], Path], tmp_path: Path
) -> None:
    ds = copy_dataset(small_dataset)
    corrupt_pt(ds, "pair_relevance")

    def drop(d: dict) -> None:
        d["arrays"]["pair_relevance"].pop("checksum")
        d.pop("data_digests")  # an editor who also knows about the digests

    edit_manifest(ds, drop)
    with pytest.raises(ChecksumError, match="records no checksum for 'pair_relevance'"):
        jasper.validate(ds, deep=True)
    with pytest.raises(ChecksumError, match="records no checksum"):
        jasper.convert(ds, tmp_path / "copy", to="pt")
    assert not (tmp_path / "copy").exists()


def test_removed_checksum_list_is_refused(small_dataset: Path,
                                          copy_dataset: Callable[[Path], Path]) -> None:
    ds = copy_dataset(small_dataset)

    def drop(d: dict) -> None:
        d.pop("arrays")
        d.pop("data_digests")

    edit_manifest(ds, drop)
    with pytest.raises(ChecksumError, match="records no checksum"):
        jasper.validate(ds, deep=True)


def test_edited_data_keys_are_reported_by_name(small_dataset: Path,
                                               copy_dataset: Callable[[Path], Path],
                                               tmp_path: Path) -> None:
    ds = copy_dataset(small_dataset)
    edit_manifest(ds, lambda d: d["arrays"]["pair_relevance"].pop("checksum"))
    with pytest.raises(ManifestError, match="'arrays' changed after the dataset was written"):
        jasper.validate(ds)
    with pytest.raises(ManifestError, match="'arrays' changed"):
        jasper.convert(ds, tmp_path / "copy", to="pt")
    # restoring the checksum restores the digest; renaming is not a data edit
    original = json.loads((small_dataset / "config.json").read_text())
    edit_manifest(ds, lambda d: d["arrays"]["pair_relevance"].update(
        checksum=original["arrays"]["pair_relevance"]["checksum"]))
    edit_manifest(ds, lambda d: d.update(dataset_name="renamed by hand"))
    assert jasper.validate(ds, deep=True).ok


def test_convert_verifies_checksums_before_committing(
    small_dataset: Path, copy_dataset: Callable[[Path], Path], tmp_path: Path
) -> None:
    ds = copy_dataset(small_dataset)
    corrupt_pt(ds, "pair_cluster_id")
    dst = tmp_path / "copy"
    with pytest.raises(ChecksumError, match="pair_cluster_id"):
        jasper.convert(ds, dst, to="pt")
    assert not dst.exists(), "a conversion of corrupted data must commit nothing"
    # and an existing good target is not replaced by corrupted data
    jasper.convert(small_dataset, dst, to="pt")
    before = Manifest.load(dst).arrays
    with pytest.raises(ChecksumError):
        jasper.convert(ds, dst, to="pt", overwrite=True)
    assert Manifest.load(dst).arrays == before


# --- item 11: aliasing strides ----------------------------------------------------------------
def test_check_tensor_layout() -> None:
    check_tensor_layout("x", torch.zeros(4, 3))
    check_tensor_layout("x", torch.zeros(4, 3).t())  # transposed: no aliasing
    check_tensor_layout("x", torch.zeros(6, 4)[::2])  # strided rows: no aliasing
    check_tensor_layout("x", torch.zeros(1, 3).expand(1, 3))
    check_tensor_layout("x", torch.zeros(()).expand(0, 8))  # empty: nothing to alias
    with pytest.raises(ShapeError, match="alias"):
        check_tensor_layout("x", torch.zeros(1, 3).expand(4, 3))
    with pytest.raises(ShapeError, match="alias"):
        check_tensor_layout("x", torch.zeros(10).as_strided((4, 3), (1, 1)))


def test_stride_zero_array_is_refused_on_load(small_dataset: Path,
                                              copy_dataset: Callable[[Path], Path]) -> None:
    ds = copy_dataset(small_dataset)
    neg = torch.load(ds / "hard_negatives.pt", weights_only=True)
    # a full-size storage (so no storage-size check trips) whose rows all alias the first one
    aliased = neg.clone().reshape(-1).as_strided(tuple(neg.shape), (0, 1))
    torch.save(aliased, ds / "hard_negatives.pt")
    with pytest.raises(ShapeError, match="hard_negatives.*alias"):
        jasper.validate(ds)
    with pytest.raises(ShapeError, match="alias"):
        jasper.JASPERSteeringDataset(ds, split="train")


# --- item 12: claimed sizes are checked before allocation --------------------------------------
def test_check_claimed_sizes() -> None:
    check_claimed_sizes({"a": ((1000, 4), 4)}, 16_000)
    with pytest.raises(FormatError, match="claims a has shape"):
        check_claimed_sizes({"a": ((10**15, 4), 4)}, 16_000)
    check_claimed_sizes({"a": ((10**6, 4), 4)}, 16_000, max_ratio=1000)


@pytest.mark.parametrize("field", ["rows", "embedding_dim"])
def test_manifest_claiming_huge_arrays_is_refused_before_open(
    small_dataset: Path, copy_dataset: Callable[[Path], Path], field: str
) -> None:
    ds = copy_dataset(small_dataset)

    def huge(d: dict) -> None:
        shape = d["arrays"]["source_embs"]["shape"]
        if field == "rows":
            shape[0] = 10**15
        else:
            shape[1] = 10**15
            d["embedding_dim"] = 10**15

    edit_manifest(ds, huge)
    with pytest.raises(FormatError, match="source_embs"):
        open_store(ds)


@pytest.mark.parametrize("use_mmap", [False, True])
@pytest.mark.parametrize("key", ["embedding_dim", "n_neg"])
def test_manifest_size_key_disagreeing_with_the_files_is_refused_before_allocating(
    small_dataset: Path, copy_dataset: Callable[[Path], Path], key: str, use_mmap: bool
) -> None:
    """A manifest whose embedding_dim or n_neg alone is huge (every array record intact) is a
    ShapeError naming an array and the column rule, before a table of that width is allocated
    (found by the reliability corpus: a 2.4e18-byte allocation error on HDF5)."""
    ds = copy_dataset(small_dataset)
    edit_manifest(ds, lambda d: d.update({key: 10**15}))
    with pytest.raises(ShapeError, match="columns") as err:
        jasper.JASPERSteeringDataset(ds, split="train", use_mmap=use_mmap)
    assert err.value.rule == "columns" and err.value.array


# --- item 13: typed manifest errors through open ------------------------------------------------
def test_writer_given_as_a_string_is_a_manifest_error(small_dataset: Path,
                                                      copy_dataset: Callable[[Path], Path]) -> None:
    ds = copy_dataset(small_dataset)
    edit_manifest(ds, lambda d: d.update(writer="pt"))
    with pytest.raises(ManifestError, match="writer"):
        open_store(ds)


# --- item 14: messages that say what is wrong ---------------------------------------------------
def test_missing_pair_index_names_the_file(small_dataset: Path,
                                           copy_dataset: Callable[[Path], Path]) -> None:
    ds = copy_dataset(small_dataset)
    (ds / "pair_index.pt").unlink()
    with pytest.raises(DatasetNotFoundError, match="pair_index.pt"):
        open_store(ds)


def test_forcing_the_wrong_backend_is_a_typed_error(tmp_path: Path) -> None:
    pytest.importorskip("jasper_hdf5")
    ds = write_synthetic(tmp_path / "h5", SynthConfig(n_pairs=80, embedding_dim=4, n_neg=2,
                                                      n_clusters=2), backend="hdf5")
    with pytest.raises(NoBackendCanOpenError, match="backend 'pt' does not recognise.*'hdf5'"):
        open_store(ds, backend="pt")
    with pytest.raises(NoBackendCanOpenError, match="backend 'pt' does not recognise"):
        jasper.create_loader(ds, split="train", batch_size=8, storage_format="pt")


# --- item 15: array names are never paths --------------------------------------------------------
def test_array_names_are_checked_for_every_backend(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match="never paths"):
        check_array_names(["../x"])
    check_array_names(["pair_index"], catalogue=["pair_index"])
    with pytest.raises(ShapeError):
        check_array_names(["pair_indexx"], catalogue=["pair_index"])
    target = tmp_path / "inner" / "ds"
    target.mkdir(parents=True)
    m = Manifest(embedding_dim=2, n_neg=1)
    for name in ("../x", "sub/x", "..", ""):
        for backend in ("pt", "hdf5"):
            try:
                impl = get_backend(backend)
            except jasper.errors.BackendError:
                continue
            with pytest.raises(ShapeError, match="never paths"):
                impl.write_arrays(target, {name: TensorSource(torch.zeros(3))}, m)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ds", "inner"]


def test_manifest_array_names_that_are_paths_are_refused(
    small_dataset: Path, copy_dataset: Callable[[Path], Path]
) -> None:
    ds = copy_dataset(small_dataset)
    edit_manifest(ds, lambda d: d["arrays"].update({"../evil": {"shape": [1], "dtype": "int64"}}))
    with pytest.raises(ShapeError, match="never paths"):
        open_store(ds)


# --- item 13: OS errors on write paths ----------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs the right to mount; skipped elsewhere)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        # lazy: a library may still hold a handle on the failed file until collected
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("backend", ["pt", "hdf5"])
def test_disk_full_is_a_storage_error_naming_the_file(small_tmpfs: Path, backend: str) -> None:
    try:
        get_backend(backend)
    except jasper.errors.BackendError:
        pytest.skip(f"{backend} not installed")
    arrays, manifest = synthesize(SynthConfig(n_pairs=4000, embedding_dim=64, n_neg=4,
                                              n_clusters=4))
    with pytest.raises(StorageError, match="no space left") as info:
        write_store(small_tmpfs / "ds", arrays, manifest, backend=backend)
    assert str(small_tmpfs) in str(info.value)
    assert os.listdir(small_tmpfs) == [], "a failed write must leave nothing"


def test_permission_denied_is_a_storage_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who writes anywhere")
        arrays, manifest = synthesize(SynthConfig(n_pairs=50, embedding_dim=4, n_neg=2,
                                                  n_clusters=2))
        with pytest.raises(StorageError, match="permission denied"):
            write_store(ro / "ds", arrays, manifest)
    finally:
        ro.chmod(0o700)


def test_hdf5_with_10e15_unallocated_rows_is_refused_on_open(tmp_path: Path) -> None:
    """The file's own metadata claims 10^15 rows (chunked, nothing allocated: a tiny file) and
    the manifest agrees: open is an immediate typed error, not a hang in rows mode."""
    h5py = pytest.importorskip("h5py")
    pytest.importorskip("jasper_hdf5")
    from jasper_hdf5.layout import FILE_NAME, PATHS

    ds = write_synthetic(tmp_path / "h5", SynthConfig(n_pairs=80, embedding_dim=4, n_neg=2,
                                                      n_clusters=2), backend="hdf5")
    with h5py.File(ds / FILE_NAME, "a") as h:
        attrs = dict(h[PATHS["source_embs"]].attrs)
        del h[PATHS["source_embs"]]
        d = h.create_dataset(PATHS["source_embs"], shape=(10**15, 4), dtype="f4",
                             chunks=(1024, 4))
        d.attrs.update(attrs)
    edit_manifest(ds, lambda m: m["arrays"]["source_embs"].update(shape=[10**15, 4]))
    with pytest.raises(FormatError, match="source_embs"):
        open_store(ds)
    with pytest.raises(FormatError, match="source_embs"):
        jasper.JASPERSteeringDataset(ds, split="train", storage_format="hdf5")


def test_synth_scratch_on_a_full_disk_is_a_storage_error_not_a_crash(small_tmpfs: Path) -> None:
    """The memory-mapped scratch files are allocated up front: a full disk is a typed error,
    not a SIGBUS killing the process on first write (run in a child to survive the old way)."""
    import subprocess as sp
    import sys
    import textwrap

    from jasper.testing.conformance import child_env

    script = textwrap.dedent("""
        import sys
        from jasper import synth
        from jasper.errors import StorageError
        real = synth.synthesize
        synth.synthesize = lambda cfg, workdir=None, progress=None: real(
            cfg, workdir=workdir, memory_limit=0, progress=progress)
        try:
            synth.write_synthetic(sys.argv[1], synth.SynthConfig(
                n_pairs=20000, embedding_dim=32, n_neg=4, n_clusters=4))
        except StorageError as exc:
            print("TYPED", exc)
    """)
    proc = sp.run([sys.executable, "-c", script, str(small_tmpfs / "ds")], capture_output=True,
                  text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("TYPED") and "no space left" in proc.stdout
    assert os.listdir(small_tmpfs) == []
