"""Data safety of the HDF5 backend (each case fails on the code before its fix): Ctrl-C stops a
write, data outside the dataset directory is refused, storage must cover what a dataset claims,
the structural rules hold in rows mode, and broken attributes are typed errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import jasper
from jasper.errors import FormatError, IntegrityError, JasperError
from jasper.files import OutsideDatasetError
from jasper.testing.conformance import sigint_as_from_a_terminal
from jasper_hdf5.layout import FILE_NAME, PATHS

WRITER = textwrap.dedent("""
    import sys, torch
    import jasper
    from jasper.testing import make_arrays
    arrays, manifest = make_arrays(n_pairs=64, embedding_dim=256, n_sources=1 << 17)
    print("ready", flush=True)
    jasper.write_store(sys.argv[1], arrays, manifest, backend="hdf5", compression="gzip",
                       compression_level=6)
    print("COMPLETED", flush=True)
""")


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_during_an_hdf5_write_stops_it_and_leaves_nothing(tmp_path: Path,
                                                                  attempt: int) -> None:
    """One SIGINT while h5py compresses: the process must not complete the write (it used to
    print "Exception ignored ... KeyboardInterrupt" and exit 0 in 3 of 5 tries)."""
    target = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_from_a_terminal)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until h5py is writing the file
        tmp = [p for p in tmp_path.glob(".ds.jasper-tmp-*") if (p / FILE_NAME).exists()]
        if tmp and (tmp[0] / FILE_NAME).stat().st_size > 1 << 20:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "COMPLETED" not in out, err
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err and "Exception ignored" not in err
    assert not target.exists()
    assert not list(tmp_path.glob(".ds.jasper-*"))


def _edit(path: Path) -> h5py.File:
    return h5py.File(path / FILE_NAME, "r+")


def test_external_link_virtual_and_external_storage_are_refused(tmp_path: Path,
                                                                small_dataset: Path) -> None:
    import shutil

    outside = tmp_path / "elsewhere.h5"
    arrays = {}
    with h5py.File(small_dataset / FILE_NAME) as f:
        arrays = {n: f[PATHS[n]][()] for n in ("steering_residual", "source_embs", "pair_index")}
    with h5py.File(outside, "w") as g:
        g["x"] = arrays["steering_residual"] + 1
    cases = {}
    for case in ("link", "virtual", "external"):
        d = tmp_path / case
        shutil.copytree(small_dataset, d)
        with _edit(d) as f:
            if case == "link":
                del f[PATHS["steering_residual"]]
                f[PATHS["steering_residual"]] = h5py.ExternalLink(str(outside), "x")
            elif case == "virtual":
                src = arrays["source_embs"]
                layout = h5py.VirtualLayout(shape=src.shape, dtype=src.dtype)
                layout[:] = h5py.VirtualSource(str(outside), "x", shape=src.shape)
                del f[PATHS["source_embs"]]
                f.create_virtual_dataset(PATHS["source_embs"], layout)
            else:
                raw = tmp_path / "raw.bin"
                arrays["pair_index"].tofile(raw)
                del f[PATHS["pair_index"]]
                f.create_dataset(PATHS["pair_index"], shape=arrays["pair_index"].shape,
                                 dtype=arrays["pair_index"].dtype,
                                 external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        cases[case] = d
    for case, d in cases.items():
        with pytest.raises(OutsideDatasetError, match="allow_external") as e, \
                jasper.open_store(d) as r:
            for n in r.array_names():
                r.read_rows(n, torch.tensor([0]))
        assert FILE_NAME in str(e.value), case
        # opting in reads through HDF5 (never a map of local bytes)
        reader = jasper.get_backend("hdf5").open(d, jasper.Manifest.load(d), allow_external=True)
        with reader:
            if case == "link":
                got = reader.read_rows("steering_residual", torch.tensor([1, 0]))
                assert np.array_equal(got.numpy(), arrays["steering_residual"][[1, 0]] + 1)


def test_legacy_split_pt_symlinked_outside_is_refused(tmp_path: Path, small_dataset: Path) -> None:
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(small_dataset, d)
    with _edit(d) as f:
        ids = f[PATHS["test_idx"]][()]
        del f[PATHS["test_idx"]]
    torch.save(torch.from_numpy(ids), tmp_path / "test_idx.pt")
    (d / "test_idx.pt").symlink_to(tmp_path / "test_idx.pt")
    with jasper.open_store(d) as r, pytest.raises(OutsideDatasetError, match="test_idx.pt"):
        r.read("test_idx")
    (d / "test_idx.pt").unlink()
    shutil.copy(tmp_path / "test_idx.pt", d / "test_idx.pt")  # a regular file inside: fine
    with jasper.open_store(d) as r:
        assert np.array_equal(r.read("test_idx").numpy(), ids)


def test_unallocated_huge_dataset_is_refused_before_reading(tmp_path: Path,
                                                            small_dataset: Path) -> None:
    """10^15 rows that were never written: refused at once, in rows mode and validation."""
    import shutil

    for chunked in (False, True):
        d = tmp_path / f"huge{chunked}"
        shutil.copytree(small_dataset, d)
        with _edit(d) as f:
            del f[PATHS["source_embs"]]
            kw = {"chunks": (1024, 32)} if chunked else {}
            f.create_dataset(PATHS["source_embs"], shape=(10**15, 32), dtype="float32", **kw)
        t0 = time.monotonic()
        with pytest.raises(FormatError, match="source_embs|embeddings/sources"), \
                jasper.open_store(d) as r:
            r.read_rows("source_embs", torch.tensor([5]))
        with pytest.raises(JasperError):
            jasper.validate(d)
        assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("name", ["centroid_embs", "pair_relevance", "centroid_distances"])
def test_rows_mode_checks_nan_like_preload(tmp_path: Path, small_dataset: Path,
                                           name: str) -> None:
    import shutil

    d = tmp_path / "nan"
    shutil.copytree(small_dataset, d)
    with _edit(d) as f:
        ds = f[PATHS[name]]
        data = ds[()]
        data.reshape(-1)[0] = np.nan
        ds[...] = data
    for mmap in (False, True):  # preload, and rows mode (hdf5 cannot map)
        with pytest.raises(IntegrityError, match="not finite"):
            jasper.JASPERSteeringDataset(d, "train", use_mmap=mmap)


def test_layout_version_that_is_not_a_number_is_a_format_error(tmp_path: Path,
                                                                small_dataset: Path) -> None:
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(small_dataset, d)
    with _edit(d) as f:
        f.attrs["jasper_layout_version"] = "abc"
    with pytest.raises(FormatError, match="'abc'.*layout version"):
        jasper.open_store(d)


def test_read_into_with_wrong_shape_is_a_typed_shape_error(small_dataset: Path) -> None:
    from jasper.errors import ShapeError

    with jasper.open_store(small_dataset) as r:
        info = r.info("steering_centroid")
        with pytest.raises(ShapeError, match="steering_centroid"):
            r.read_into("steering_centroid", torch.empty(info.shape[0] - 1, info.shape[1]))


def test_reader_pins_the_generation_it_opened(tmp_path: Path, small_dataset: Path) -> None:
    import shutil

    d = tmp_path / "ds"
    shutil.copytree(small_dataset, d)
    with jasper.open_store(d) as r:
        before = r.read("steering_residual")
        new = tmp_path / "new"
        shutil.copytree(small_dataset, new)
        with _edit(new) as f:
            f[PATHS["steering_residual"]][...] = 7.0
        os.rename(d, tmp_path / "old")
        os.rename(new, d)
        assert torch.equal(r.read_rows("steering_residual", torch.tensor([0, 3])), before[[0, 3]])


def test_full_disk_is_a_typed_error_before_hdf5_starts(tmp_path: Path) -> None:
    """A write into too little space is refused with a StorageError naming the file and the
    bytes needed, before h5py runs: h5py's close after a write that ran out of space crashed
    the process (SIGSEGV) in some runs. Needs a real small file system: a tmpfs (root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        for i in range(3):  # the crash showed in about one run of six
            r = subprocess.run([sys.executable, "-m", "jasper", "synth", str(mnt / f"ds{i}"),
                                "--backend", "hdf5", "--pairs", "2000", "--dim", "32",
                                "--no-progress"], capture_output=True, text=True, timeout=300)
            assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
            # refused up front, with the numbers, not after HDF5 failed half-way
            assert "no space left on the device" in lines[0] and "are free" in lines[0], lines[0]
            assert not any(mnt.iterdir()), list(mnt.iterdir())  # nothing left behind
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
