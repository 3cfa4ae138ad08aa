"""Code shared by jasper-hdf5's tests (a module, not conftest, so tests can import it)."""

from __future__ import annotations

import torch

from jasper.manifest import Manifest
from jasper.synth import SynthConfig, synthesize

SMALL = SynthConfig(n_pairs=600, embedding_dim=24, n_neg=4, n_clusters=6, seed=3)


def synth_tensors(cfg: SynthConfig = SMALL) -> tuple[dict[str, torch.Tensor], Manifest]:
    """A synthetic dataset as in-memory tensors and its manifest."""
    sources, manifest = synthesize(cfg)
    return {n: s.materialize().clone() for n, s in sources.items()}, manifest


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits of ``t`` (so the comparison is bit-exact: -0.0 != 0.0, NaN == NaN)."""
    t = t.contiguous()
    if t.dtype.is_floating_point:
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype, f"{what}: {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(bits(actual), bits(expected)), f"{what}: values differ"


class RowsDataset(torch.utils.data.Dataset):
    """Serves whole batches of pair rows through a reader's ``read_rows`` (lazy mode).

    Each batch also reports the process that read it and whether that process holds its own
    open HDF5 handle, so tests can prove workers reopen the file instead of using the parent's.
    """

    NAMES = ("pair_index", "hard_negatives", "steering_residual", "pair_relevance")

    def __init__(self, reader: object, n: int) -> None:
        self.reader = reader
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> dict[str, object]:
        import os

        rows = torch.tensor(indices, dtype=torch.int64)
        out: dict[str, object] = {n: self.reader.read_rows(n, rows) for n in self.NAMES}
        out["rows"] = rows
        out["pid"] = os.getpid()
        out["own_handle"] = self.reader._handle.is_open  # opened by this process
        return out

    # with batch_size=None the DataLoader hands each sampled batch of indices to __getitem__
    __getitem__ = __getitems__


def keep_batch(batch: object) -> object:
    """A ``collate_fn`` for datasets whose ``__getitems__`` already returns the batch."""
    return batch
