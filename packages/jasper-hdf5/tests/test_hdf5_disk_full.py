"""A compressed HDF5 write into a full disk is a typed error, never a crash: h5py's close after a
write that ran out of space crashed the process (SIGSEGV) in every try on a small tmpfs. The
writer checks free space before each block (:class:`jasper.atomic.FreeSpaceGuard`), so ENOSPC
never reaches HDF5; the temporary directory is removed and the previous version is untouched.

The disk is a real small file system (a tmpfs mounted for the test, which needs root); the
test skips where mounting is not permitted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import jasper
from jasper.testing import make_arrays
from jasper.testing.conformance import child_env

WRITER = textwrap.dedent("""
    import json, sys
    import jasper
    from jasper.errors import JasperError
    from jasper.testing import make_arrays
    target, compression = sys.argv[1], sys.argv[2]
    arrays, manifest = make_arrays(n_pairs=4000, embedding_dim=128)
    try:
        jasper.write_store(target, arrays, manifest, backend="hdf5", compression=compression,
                           overwrite=True)
        out = {"ok": True}
    except JasperError as e:
        out = {"error": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}
    print(json.dumps(out), flush=True)
""")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of a given size under ``tmp_path`` (skip where mounting is refused)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("size", [512 << 10, 1 << 20, 4 << 20])
@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_a_compressed_write_into_a_full_disk_is_a_typed_error_and_keeps_the_old_version(
        small_disk: Callable[[int], Path], compression: str, size: int) -> None:
    disk = small_disk(size)
    target = disk / "ds"
    old_arrays, old_manifest = make_arrays(n_pairs=64, embedding_dim=16)
    jasper.write_store(target, old_arrays, old_manifest, backend="hdf5")  # fits: uncompressed
    before = _digests(target)

    proc = subprocess.run([sys.executable, "-c", WRITER, str(target), compression],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, f"the writer died (rc {proc.returncode}): {proc.stderr[-3000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got.get("error") == "StorageError" and got["errno"] == 28, got
    assert "no space left on the device" in got["message"]
    assert sorted(p.name for p in disk.iterdir()) == ["ds"], "the failed write left files"
    assert _digests(target) == before
    assert jasper.validate(target, deep=True).ok
