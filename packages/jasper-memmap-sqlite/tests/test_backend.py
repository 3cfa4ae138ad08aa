"""The memmap-sqlite backend through jasper's public API: real files, real SQLite, real workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jasper
from jasper.errors import DatasetNotFoundError, FormatError, ShapeError
from jasper.schema import ARRAYS
from jasper.synth import SynthConfig, synthesize, write_synthetic
from jasper_memmap_sqlite.backend import CATALOGUE_NAME, MemmapSqliteReader
from jasper_memmap_sqlite.catalogue import ProcessConnection


def _reader(path: Path, mmap: bool = True) -> MemmapSqliteReader:
    r = jasper.open_store(path, mmap=mmap)
    assert isinstance(r, MemmapSqliteReader)
    return r


def test_registered_and_auto_detected(store_dir: Path) -> None:
    assert "memmap-sqlite" in jasper.list_backends()
    assert jasper.guess_backend(store_dir) == "memmap-sqlite"
    b = jasper.get_backend("memmap-sqlite")
    assert b.capabilities.mmap and b.capabilities.row_access and b.capabilities.worker_safe
    assert (store_dir / CATALOGUE_NAME).is_file()


def test_every_array_is_a_page_aligned_npy(store_dir: Path) -> None:
    with _reader(store_dir) as r:
        for name in ARRAYS:
            f = store_dir / f"{name}.npy"
            e = r.entries[name]
            assert e.data_offset % 4096 == 0
            ref = np.load(f)  # plain numpy reads every file
            np.testing.assert_array_equal(ref, jasper.dtypes.to_storage(r.read(name)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_bit_exact_for_each_float_dtype(tmp_path: Path, dtype: str) -> None:
    # the reference is the generator's own arrays: this package's test environment holds no
    # other backend to compare with
    cfg = SynthConfig(n_pairs=120, embedding_dim=16, n_neg=3, n_clusters=3, dtype=dtype, seed=2)
    sources, _ = synthesize(cfg)
    expected = {n: s.materialize() for n, s in sources.items()}
    first = write_synthetic(tmp_path / "first", cfg, backend="memmap-sqlite")
    out = jasper.convert(first, tmp_path / "ms", to="memmap-sqlite")
    with _reader(out.dst) as b:
        for name in ARRAYS:
            x, y = expected[name], b.read(name)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.view(torch.uint8) if x.dtype == torch.bool else x, y), name
            m = b.map(name)
            assert m.dtype == x.dtype and torch.equal(m, x)
    assert jasper.validate(out.dst, deep=True).checksums_verified == len(ARRAYS)


def test_map_is_zero_copy_and_read_only(store_dir: Path) -> None:
    with _reader(store_dir) as r:
        m = r.map("source_embs")
        mm = r._mms["source_embs"]
        assert m.data_ptr() == mm.ctypes.data  # the tensor is the mapping itself
        assert not mm.flags.writeable
        assert r.map("source_embs") is m  # one map per array per process


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 149), min_size=0, max_size=300))
def test_read_rows_matches_index_select_in_any_order(store_dir: Path, rows: list[int]) -> None:
    with _reader(store_dir) as r:
        idx = torch.tensor(rows, dtype=torch.int64)
        full = r.read("source_embs")
        assert torch.equal(r.read_rows("source_embs", idx), full.index_select(0, idx))


def test_read_rows_out_of_range_names_the_index(store_dir: Path) -> None:
    with _reader(store_dir) as r:
        n = r.info("source_embs").shape[0]
        with pytest.raises(IndexError, match=f"index {n} .*out of range for {n} rows"):
            r.read_rows("source_embs", torch.tensor([0, n]))


def test_read_into_fills_a_view_of_a_larger_buffer(store_dir: Path) -> None:
    with _reader(store_dir, mmap=False) as r:
        info = r.info("question_embs")
        buf = torch.zeros((info.shape[0] + 5, info.shape[1]), dtype=info.dtype)
        view = buf[2 : 2 + info.shape[0]]
        assert r.read_into("question_embs", view) is view
        assert torch.equal(view, r.read("question_embs"))
        assert bool((buf[:2] == 0).all()) and bool((buf[-3:] == 0).all())
        with pytest.raises(ValueError):
            r.read_into("question_embs", torch.zeros(3, 3))


def test_read_slice_and_chunks_match_read(store_dir: Path) -> None:
    with _reader(store_dir, mmap=False) as r:
        full = r.read("steering_residual")
        assert torch.equal(r.read_slice("steering_residual", 10, 37), full[10:37])
        assert torch.equal(r.read_slice("steering_residual", 590, 10_000), full[590:])
        assert r.read_slice("steering_residual", 50, 40).shape[0] == 0
        assert torch.equal(torch.cat(list(r.iter_chunks("steering_residual", 64))), full)


def test_reader_pickles_without_maps_and_reopens(store_dir: Path) -> None:
    with _reader(store_dir) as r:
        r.map("source_embs")
        blob = pickle.dumps(r)
        assert len(blob) < 64_000  # paths and catalogue only, no data
        r2 = pickle.loads(blob)
        assert torch.equal(r2.read_rows("source_embs", torch.tensor([3, 1])),
                           r.read_rows("source_embs", torch.tensor([3, 1])))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, reader: MemmapSqliteReader) -> None:
        self.reader = reader

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.reader.read_rows("source_embs", torch.tensor([i]))[0]


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_workers_read_the_maps(store_dir: Path, ctx: str) -> None:
    with _reader(store_dir) as r:
        expect = r.read("source_embs")[:64]
        if ctx == "fork":
            r.map("source_embs")  # forked workers inherit the parent's maps
        loader = torch.utils.data.DataLoader(_Rows(r), batch_size=16, num_workers=2,
                                             multiprocessing_context=ctx)
        got = torch.cat(list(loader))
        assert torch.equal(got, expect)


def _child_pid_and_conn(db: ProcessConnection, q: mp.Queue) -> None:
    conn = db.get()
    q.put((os.getpid(), db._pid, id(conn), conn.execute("PRAGMA foreign_keys").fetchone()[0]))


def test_connection_is_per_process_and_reopened_after_fork(store_dir: Path) -> None:
    db = ProcessConnection(store_dir / CATALOGUE_NAME, readonly=True)
    parent = db.get()
    assert parent.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert parent.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    q: mp.Queue = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_child_pid_and_conn, args=(db, q))
    p.start()
    child_pid, conn_pid, _conn_id, fk = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0
    assert conn_pid == child_pid != os.getpid()
    assert fk == 1
    assert db.get() is parent  # the parent's connection is untouched
    db.close()


def test_reader_holds_no_connection_after_open(store_dir: Path) -> None:
    """The catalogue is read once, through the pinned directory, into memory: no SQLite handle
    is left to carry across fork or to lock the file."""
    with _reader(store_dir) as r:
        assert not any(isinstance(v, (sqlite3.Connection, ProcessConnection))
                       for v in vars(r).values())
        assert r.read_rows("pair_index", torch.tensor([1])).shape[0] == 1


def test_deep_validation_passes_and_runs_sqlite_checks(store_dir: Path) -> None:
    report = jasper.validate(store_dir, deep=True)
    assert report.ok and report.checksums_verified == len(ARRAYS)
    assert jasper.get_backend("memmap-sqlite").deep_check(store_dir) == []


# --- bad input ----------------------------------------------------------------------------------
def test_truncated_npy_is_a_shape_error_naming_file_row_rule(store_copy: Path) -> None:
    f = store_copy / "steering_centroid.npy"
    row_bytes = 32 * 4
    with open(f, "r+b") as fh:
        fh.truncate(4096 + 100 * row_bytes + 7)
    with pytest.raises(ShapeError) as e:
        jasper.open_store(store_copy, mmap=True)
    assert e.value.row == 100 and e.value.array == "steering_centroid"
    assert "steering_centroid.npy" in str(e.value) and e.value.rule


def test_block_corruption_is_found_by_deep_check_with_rows(store_copy: Path) -> None:
    f = store_copy / "source_embs.npy"
    with open(f, "r+b") as fh:
        fh.seek(4096 + 40 * 32 * 4)
        fh.write(b"\x00\x01\x02\x03")
    problems = jasper.get_backend("memmap-sqlite").deep_check(store_copy)
    assert any("source_embs.npy" in p and "rows 0.." in p and "block checksum" in p
               for p in problems), problems
    with pytest.raises(jasper.errors.ChecksumError, match="source_embs"):
        jasper.validate(store_copy, deep=True)


def test_not_sqlite_catalogue_is_a_format_error(store_copy: Path) -> None:
    (store_copy / CATALOGUE_NAME).write_bytes(b"PK\x03\x04 this is a zip, not a database" * 10)
    with pytest.raises(FormatError, match="not a SQLite database") as e:
        jasper.open_store(store_copy)
    assert e.value.path == store_copy / CATALOGUE_NAME
    with pytest.raises(FormatError, match="not a SQLite database"):
        jasper.validate(store_copy, deep=True, backend="memmap-sqlite")
    problems = jasper.get_backend("memmap-sqlite").deep_check(store_copy)
    assert len(problems) == 1 and "SQLite file header" in problems[0]


def test_missing_table_is_a_format_error_naming_the_table(store_copy: Path) -> None:
    conn = sqlite3.connect(store_copy / CATALOGUE_NAME)
    conn.execute("DROP TABLE array_blocks")
    conn.commit()
    conn.close()
    with pytest.raises(FormatError, match="table 'array_blocks' is missing"):
        jasper.open_store(store_copy)


def test_missing_catalogue_is_not_found(store_copy: Path) -> None:
    (store_copy / CATALOGUE_NAME).unlink()
    with pytest.raises(DatasetNotFoundError):
        jasper.open_store(store_copy, backend="memmap-sqlite")


def test_foreign_key_violation_is_reported(store_copy: Path) -> None:
    conn = sqlite3.connect(store_copy / CATALOGUE_NAME)  # foreign keys off: SQLite's default
    conn.execute("INSERT INTO array_blocks (array, block, checksum) VALUES ('ghost', 0, 'x')")
    conn.commit()
    conn.close()
    problems = jasper.get_backend("memmap-sqlite").deep_check(store_copy)
    assert any("foreign_key_check" in p and "array_blocks" in p for p in problems), problems


def test_header_that_disagrees_with_catalogue(store_copy: Path) -> None:
    f = store_copy / "pair_relevance.npy"
    a = np.load(f)
    np.save(f, a[:-1])
    with pytest.raises(ShapeError, match="pair_relevance.npy"):
        jasper.open_store(store_copy)


def test_bad_align_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(jasper.errors.WriteOptionError):
        write_synthetic(tmp_path / "x", SynthConfig(n_pairs=50, embedding_dim=8, n_neg=2,
                                                    n_clusters=2), backend="memmap-sqlite",
                        align=100)
    assert not (tmp_path / "x").exists()
