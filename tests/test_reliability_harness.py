"""The reliability harness itself: a case is classified by how it really ended (a typed error,
any other exception, a signal, a timeout, the memory cap), served data is judged against the
reference, and every file format's regions are found."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the campaign lives at the repository root, not in a package
    sys.path.insert(0, str(ROOT))

runner = importlib.import_module("reliability.runner")
reference = importlib.import_module("reliability.reference")
regions_mod = importlib.import_module("reliability.regions")
corpus = importlib.import_module("reliability.corpus")
Outcome = runner.Outcome


def _run(body, tmp_path: Path, **kw) -> object:
    case = runner.Case("unit", "none", body.__name__, "call", body, **kw)
    return runner.run_case(case, tmp_path / "case")


def test_typed_error_is_typed(tmp_path: Path) -> None:
    def raises_jasper(_w: Path) -> None:
        from jasper.errors import FormatError

        raise FormatError("x.pt", "bad bytes", array="a")

    res = _run(raises_jasper, tmp_path)
    assert res.outcome is Outcome.TYPED
    assert res.exception == "jasper.errors.FormatError"
    assert "bad bytes" in res.message


def test_other_exception_is_untyped_with_its_frame(tmp_path: Path) -> None:
    def raises_value(_w: Path) -> None:
        int("abc")

    res = _run(raises_value, tmp_path)
    assert res.outcome is Outcome.UNTYPED
    assert res.exception == "builtins.ValueError"


def test_signal_is_crash(tmp_path: Path) -> None:
    def segfaults(_w: Path) -> None:
        os.kill(os.getpid(), signal.SIGSEGV)

    res = _run(segfaults, tmp_path)
    assert res.outcome is Outcome.CRASH
    assert res.exception == "signal SIGSEGV"


def test_exit_without_result_is_crash(tmp_path: Path) -> None:
    def exits(_w: Path) -> None:
        os._exit(7)

    res = _run(exits, tmp_path)
    assert res.outcome is Outcome.CRASH
    assert res.exception == "exit 7"


def test_timeout_is_hang_and_kills_grandchildren(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "load_factor", lambda: 1.0)  # the plain timeout, whatever the load
    marker = tmp_path / "grandchild-alive"

    def sleeps(_w: Path) -> None:
        if os.fork() == 0:  # a grandchild that would outlive the case
            time.sleep(3)
            marker.write_text("still running")
            os._exit(0)
        time.sleep(60)

    res = _run(sleeps, tmp_path, timeout=1.0)
    assert res.outcome is Outcome.HANG
    time.sleep(3.5)
    assert not marker.exists()


def test_timeout_stretches_with_the_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that waits for a CPU on a busy machine is not a hang: at 4x the load per CPU, a
    1 s timeout allows 4 s."""
    assert runner.load_factor() >= 1.0

    def slow(_w: Path) -> None:
        time.sleep(2.0)

    monkeypatch.setattr(runner, "load_factor", lambda: 4.0)
    assert _run(slow, tmp_path / "busy", timeout=1.0).outcome is Outcome.OK
    monkeypatch.setattr(runner, "load_factor", lambda: 1.0)
    res = _run(slow, tmp_path / "idle", timeout=1.0)
    assert res.outcome is Outcome.HANG and "no result within 1 s" in res.message


def test_memory_cap_turns_a_huge_allocation_into_an_error(tmp_path: Path) -> None:
    def allocates(_w: Path) -> None:
        torch.empty(1 << 40, dtype=torch.uint8)  # 1 TiB

    res = _run(allocates, tmp_path, mem_cap=256 << 20)
    assert res.outcome is Outcome.UNTYPED
    assert "memory" in (res.exception + res.message).lower()


def test_verdict_outcome(tmp_path: Path) -> None:
    def wrong(_w: Path) -> None:
        raise runner.Verdict(Outcome.SILENT_WRONG, "served the other array")

    res = _run(wrong, tmp_path)
    assert res.outcome is Outcome.SILENT_WRONG
    assert res.message == "served the other array"


def _ref(tmp_path: Path) -> object:
    a = {"x": torch.arange(6).reshape(3, 2)}
    b = {"x": torch.arange(6).reshape(3, 2) + 1}
    return reference.Reference("none", tmp_path, tmp_path,
                               {n: reference.digest(t) for n, t in a.items()},
                               {n: reference.digest(t) for n, t in b.items()})


def test_judge_same_data_passes(tmp_path: Path) -> None:
    reference.judge({"x": torch.arange(6).reshape(3, 2)}, _ref(tmp_path), checksummed=True,
                    what="t")


def test_judge_foreign_data_is_silent_wrong(tmp_path: Path) -> None:
    with pytest.raises(runner.Verdict) as e:
        reference.judge({"x": torch.arange(6).reshape(3, 2) + 1}, _ref(tmp_path),
                        checksummed=False, what="t")
    assert e.value.outcome is Outcome.SILENT_WRONG
    assert "outside the dataset directory" in e.value.detail


def test_digest_covers_shape_dtype_and_bfloat16() -> None:
    t = torch.ones(4, dtype=torch.bfloat16)
    assert reference.digest(t) != reference.digest(t.reshape(2, 2))
    assert reference.digest(t) != reference.digest(t.float())
    assert reference.digest(t) != reference.digest(torch.ones(4, dtype=torch.bfloat16) * 2)


def test_regions_of_every_format(tmp_path: Path) -> None:
    import numpy as np

    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(100, dtype=np.int64))
    names = [r[0] for r in regions_mod.regions(npy)]
    assert names == ["magic", "version", "header-length", "header-dict", "data"]
    data = regions_mod.regions(npy)[-1]
    assert data[2] - data[1] == 800

    pt = tmp_path / "a.pt"
    torch.save(torch.arange(10), pt)
    names = [r[0] for r in regions_mod.regions(pt)]
    assert "member:data/0" in names and names[-1] == "end-record"

    h5py = pytest.importorskip("h5py")
    h5 = tmp_path / "a.h5"
    with h5py.File(h5, "w") as f:
        f["g/x"] = np.arange(50, dtype=np.float32)
    names = [r[0] for r in regions_mod.regions(h5)]
    assert names[0] == "superblock" and "data:g/x" in names
    assert any(n.startswith("metadata") for n in names)


def test_flip_and_swap_damage_what_they_say(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"\x00\x01\x02")
    corpus.flip(f, 1, 0xFF)
    assert f.read_bytes() == b"\x00\xfe\x02"
    g = tmp_path / "g"
    g.write_bytes(b"g")
    corpus.swap(f, g)
    assert f.read_bytes() == b"g" and g.read_bytes() == b"\x00\xfe\x02"
