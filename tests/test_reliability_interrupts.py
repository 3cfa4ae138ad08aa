"""Ctrl-C during a write always stops it (issue 9 item 5), even when the ``KeyboardInterrupt``
lands in library code that discards it.

The campaign found the cause of the swallowed interrupts (``pt`` and ``hdf5`` ``synth`` exiting
0 in a few runs of fifty): Python raises the interrupt wherever bytecode runs next, and a write
runs C extensions that ignore what Python code they call raises (numpy.random's Cython module
initialisation, imported on first use by ``synth``, calls ``collections.abc``'s ``register``
and ignores its errors; h5py's callbacks and destructors print "Exception ignored"). These tests
send a real SIGINT to the process from inside such a swallowing frame and require the write to
stop at jasper's next checkpoint, with nothing committed and nothing left behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from jasper.backend import ArraySource, TensorSource
from jasper.interrupts import InterruptGate, checkpoint, deferred_interrupts
from jasper.synth import SynthConfig, synthesize


@pytest.fixture(autouse=True)
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, as a user's process has it (restored afterwards)."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_swallowed() -> None:
    """Press Ctrl-C while code that discards every exception runs (as a C extension does)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # let the handler run here, inside the swallowing frame
            time.sleep(0.001)
    except BaseException:
        pass


class _SwallowingSource(ArraySource):
    """A source whose second chunk is produced by code that swallows a Ctrl-C."""

    def __init__(self, inner: ArraySource) -> None:
        self.inner = inner
        self.shape = inner.shape
        self.dtype = inner.dtype

    def iter_chunks(self, rows_per_chunk: int) -> Iterator[torch.Tensor]:
        for i, chunk in enumerate(self.inner.iter_chunks(max(1, min(rows_per_chunk, 8)))):
            if i == 1:
                _ctrl_c_swallowed()
            yield chunk


def test_a_swallowed_ctrl_c_is_raised_at_the_next_checkpoint() -> None:
    with deferred_interrupts():
        _ctrl_c_swallowed()
        with pytest.raises(KeyboardInterrupt):
            checkpoint()
        checkpoint()  # raised once


def test_a_pending_ctrl_c_is_raised_on_leaving_the_gate() -> None:
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        _ctrl_c_swallowed()


def test_gates_nest_and_a_second_ctrl_c_raises_at_once() -> None:
    with deferred_interrupts() as outer, deferred_interrupts() as inner:
        assert inner is outer
        _ctrl_c_swallowed()
        with pytest.raises(KeyboardInterrupt):  # pressed again while one is pending
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0.001)
        assert outer.pending  # the first press is still held for the next checkpoint
        outer.pending = False
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_users_own_is_left_alone() -> None:
    seen: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: seen.append(signum))
    with deferred_interrupts() as gate:
        assert isinstance(gate, InterruptGate)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):
            time.sleep(0.001)
        checkpoint()
    assert seen == [signal.SIGINT]


@pytest.mark.parametrize("backend", ["pt", "hdf5", "memmap-sqlite"])
def test_write_store_stops_on_a_swallowed_ctrl_c(tmp_path: Path, backend: str) -> None:
    from jasper.registry import list_backends
    from jasper.store import write_store

    if backend not in list_backends():
        pytest.skip(f"backend {backend} is not installed")
    cfg = SynthConfig(n_pairs=64, embedding_dim=8, n_neg=2, n_clusters=4, seed=0)
    arrays, manifest = synthesize(cfg, workdir=tmp_path / "scratch", progress=False)
    sources: dict[str, ArraySource] = {
        n: TensorSource(a) if isinstance(a, torch.Tensor) else a for n, a in arrays.items()}
    sources["question_embs"] = _SwallowingSource(sources["question_embs"])
    target = tmp_path / "out" / "ds"
    with pytest.raises(KeyboardInterrupt):
        write_store(target, sources, manifest, backend=backend, progress=False)
    assert not target.exists(), "an interrupted write committed a dataset"
    left = sorted(p.name for p in target.parent.iterdir()) if target.parent.exists() else []
    assert left == [], f"an interrupted write left {left}"
