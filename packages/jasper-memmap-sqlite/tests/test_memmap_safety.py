"""Hostile or damaged memmap-sqlite datasets are typed errors (issue: data safety and trust)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

import jasper
from jasper.errors import FormatError, JasperError, ShapeError
from jasper.files import OutsideDatasetError
from jasper_memmap_sqlite.backend import CATALOGUE_NAME


def _sql(d: Path, statement: str, *args: object) -> None:
    conn = sqlite3.connect(d / CATALOGUE_NAME)
    try:
        conn.execute("PRAGMA ignore_check_constraints=ON")
        conn.execute(statement, args)
        conn.commit()
    finally:
        conn.close()


def _read_all(d: Path) -> None:
    with jasper.open_store(d) as r:
        for n in r.array_names():
            r.read(n)


def test_dotdot_file_name_in_the_catalogue_is_refused(store_copy: Path) -> None:
    _sql(store_copy, "UPDATE arrays SET file = '..' WHERE name = 'pair_index'")
    with pytest.raises(FormatError, match="'..'.*plain file name"):
        _read_all(store_copy)


def test_rows_per_block_zero_is_a_format_error(store_copy: Path) -> None:
    _sql(store_copy, "UPDATE arrays SET rows_per_block = 0 WHERE name = 'pair_index'")
    with pytest.raises(FormatError, match="rows_per_block"):
        _read_all(store_copy)
    problems = jasper.get_backend("memmap-sqlite").deep_check(store_copy)
    assert problems and any("rows_per_block" in p for p in problems)


def test_damaged_sqlite_page_is_a_format_error(store_copy: Path) -> None:
    db = store_copy / CATALOGUE_NAME
    data = bytearray(db.read_bytes())
    page = 4096 if len(data) > 8192 else 1024
    data[page + 8 : page + 200] = b"\xff" * 192  # garble the b-tree page after the header page
    db.write_bytes(data)
    with pytest.raises(JasperError):
        _read_all(store_copy)
    assert jasper.get_backend("memmap-sqlite").deep_check(store_copy)


def test_array_file_replaced_by_a_directory_or_a_self_link(store_copy: Path) -> None:
    f = store_copy / "steering_centroid.npy"
    f.unlink()
    f.mkdir()
    with pytest.raises(OutsideDatasetError, match="steering_centroid.npy"):
        _read_all(store_copy)
    f.rmdir()
    f.symlink_to(f)
    with pytest.raises(OutsideDatasetError, match="steering_centroid.npy"):
        _read_all(store_copy)


def test_steering_array_one_row_short_is_a_typed_error(store_copy: Path, tmp_path: Path) -> None:
    with jasper.open_store(store_copy) as r:
        info = r.info("steering_residual")
        with pytest.raises(ShapeError, match="steering_residual"):
            r.read_into("steering_residual", torch.empty(info.shape[0] - 1, info.shape[1]))


def test_no_manifest_copy_and_no_second_whole_array_checksum(store_dir: Path) -> None:
    conn = sqlite3.connect(f"file:{store_dir / CATALOGUE_NAME}?mode=ro", uri=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM jasper_meta"))
        sums = [r[0] for r in conn.execute("SELECT checksum FROM arrays")]
    finally:
        conn.close()
    assert "manifest" not in meta
    assert set(sums) == {None}
    assert jasper.validate(store_dir, deep=True).ok  # core's checksums are the check


def test_symlinked_npy_outside_is_refused(store_copy: Path, tmp_path: Path) -> None:
    f = store_copy / "source_embs.npy"
    shutil.move(f, tmp_path / "source_embs.npy")
    f.symlink_to(tmp_path / "source_embs.npy")
    with pytest.raises(OutsideDatasetError, match="source_embs.npy.*symbolic link"):
        _read_all(store_copy)
