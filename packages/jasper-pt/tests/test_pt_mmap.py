"""Mapped opens of jasper-pt datasets cost almost no memory.

Anonymous resident memory (``RssAnon`` in ``/proc/self/status``) is what a copy costs; pages of
a mapped file count as ``RssFile`` and belong to the page cache, which the kernel can drop.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

import jasper
from jasper.schema import ARRAYS
from jasper.testing import make_arrays

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MIB = 1 << 20
D = 256
N_Q = 65_536  # question_embs: 65,536 x 256 float32 = 64 MiB


def rss() -> dict[str, int]:
    """This process's resident memory by kind, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arrays, manifest = make_arrays(64, D, n_questions=N_Q, seed=1)
    path = jasper.write_store(tmp_path_factory.mktemp("big") / "ds", arrays, manifest,
                              backend="pt", progress=False)
    del arrays
    return path


def test_mapped_open_and_full_scan_cost_no_anonymous_memory(big: Path) -> None:
    size = N_Q * D * 4
    before = rss()
    with jasper.open_store(big, mmap=True) as reader:
        infos = {n: reader.info(n) for n in ARRAYS}
        maps = {n: reader.map(n) for n in ARRAYS}
        opened = rss()
        q = maps["question_embs"]
        assert infos["question_embs"].nbytes == size
        total = float(q.sum(dtype=torch.float64))  # touches every page of the 64 MiB array
        scanned = rss()
        assert total == total  # not NaN: every page was really read
    anon_open = opened["RssAnon"] - before["RssAnon"]
    all_open = anon_open + opened["RssFile"] - before["RssFile"]
    anon_scan = scanned["RssAnon"] - before["RssAnon"]
    file_scan = scanned["RssFile"] - before["RssFile"]
    assert all_open < 4 * MIB, f"opening mapped cost {all_open / MIB:.1f} MiB resident"
    assert anon_scan < 8 * MIB, f"scanning a mapped array cost {anon_scan / MIB:.1f} MiB anonymous"
    # the scan really went through the mapping: its pages are file-backed
    assert file_scan > size // 2, f"only {file_scan / MIB:.1f} MiB of mapped pages became resident"


PRELOAD_PROBE = """
import json, sys
from pathlib import Path
import jasper

def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

with jasper.open_store(sys.argv[1]) as reader:
    before = anon()
    t = reader.read("question_embs")
    print(json.dumps({"grown": anon() - before, "shape": list(t.shape)}))
"""


def test_preload_costs_one_copy(big: Path) -> None:
    """The same probe sees a copy: a preloading read grows anonymous memory by the array.

    It runs in a fresh interpreter: in this one, memory freed by earlier tests may still be held
    by the allocator (jasper raises glibc's trim threshold), and reusing it grows nothing.
    """
    import json
    import subprocess

    size = N_Q * D * 4
    out = subprocess.run([sys.executable, "-c", PRELOAD_PROBE, str(big)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shape"] == [N_Q, D]
    assert result["grown"] > 0.9 * size, (
        f"a preload of {size / MIB:.0f} MiB grew RssAnon by {result['grown'] / MIB:.1f}")


def test_reader_pickles_without_its_data(big: Path) -> None:
    """Spawned DataLoader workers receive the reader by pickle: paths only, never the arrays."""
    with jasper.open_store(big, mmap=True) as reader:
        reader.map("question_embs")
        blob = pickle.dumps(reader)
        assert len(blob) < 64 * 1024, f"the pickled reader holds {len(blob)} bytes"
        clone = pickle.loads(blob)
        rows = torch.tensor([N_Q - 1, 0])
        assert torch.equal(clone.read_rows("question_embs", rows),
                           reader.read_rows("question_embs", rows))
