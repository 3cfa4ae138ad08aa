"""Serving from maps keeps the data in the page cache, not in the process's anonymous memory.

The dataset (about 300 MB) is written from a chunked source, so not even the writer holds it. The
test then gathers shuffled batches covering most rows through the map and checks that the
process's anonymous memory (``/proc/self/smaps_rollup``) grew by far less than the data size: the
pages belong to the file, which the kernel may drop under pressure, so a dataset larger than RAM
can be served. A backend that copied the arrays into RAM would fail this test.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import jasper
from jasper.backend import ArraySource
from jasper.synth import SynthConfig, synthesize

ROWS, DIM = 200_000, 384  # 307 MB of float32


class _RandomRows(ArraySource):
    """Rows generated chunk by chunk: the whole table never exists in RAM."""

    def __init__(self, rows: int, dim: int) -> None:
        self.shape = (rows, dim)
        self.dtype = torch.float32

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        step = min(rows_per_chunk, 16_384)
        for start in range(0, self.shape[0], step):
            n = min(step, self.shape[0] - start)
            g = torch.Generator().manual_seed(start)
            yield torch.randn((n, self.shape[1]), generator=g)


def _anonymous_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Anonymous: line in /proc/self/smaps_rollup")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arrays, manifest = synthesize(SynthConfig(n_pairs=200, embedding_dim=DIM, n_neg=4,
                                              n_clusters=4, n_sources=ROWS // 1000))
    arrays["source_embs"] = _RandomRows(ROWS, DIM)
    path = tmp_path_factory.mktemp("big") / "big"
    return jasper.write_store(path, arrays, manifest, backend="memmap-sqlite")


@pytest.mark.slow
def test_shuffled_batches_from_maps_stay_out_of_anonymous_memory(big_store: Path) -> None:
    data_bytes = ROWS * DIM * 4
    with jasper.open_store(big_store, mmap=True) as reader:
        table = reader.map("source_embs")
        assert table.shape == (ROWS, DIM)
        gc.collect()
        before = _anonymous_bytes()
        peak = before
        rng = np.random.default_rng(0)
        checksum = 0.0
        for _ in range(300):  # 300 x 1024 random rows touch ~78% of the table's rows
            rows = torch.from_numpy(rng.integers(0, ROWS, 1024))
            batch = reader.read_rows("source_embs", rows)
            assert batch.shape == (1024, DIM)
            checksum += float(batch[:, 0].sum())
            peak = max(peak, _anonymous_bytes())
        growth = peak - before
        assert np.isfinite(checksum)
        # the spot check proves the batches are the stored rows, not zeros
        g = torch.Generator().manual_seed(16_384 * 5)
        assert torch.equal(reader.read_rows("source_embs", torch.tensor([16_384 * 5])),
                           torch.randn((1, DIM), generator=g))
    assert growth < 0.25 * data_bytes, (
        f"anonymous memory grew by {growth / 2**20:.0f} MiB while serving a "
        f"{data_bytes / 2**20:.0f} MiB mapped table")
