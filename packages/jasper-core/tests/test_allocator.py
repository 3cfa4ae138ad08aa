"""Host allocator tuning: freed batch memory is reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import ctypes, json, torch
from jasper.allocator import tune_host_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = tune_host_allocator()
assert tune_host_allocator() == applied  # idempotent
before = libc.mallinfo2().hblkhd
t = torch.empty(12 << 20)  # 48 MiB: a large batch's negatives
t.fill_(1.0)
# bytes served by a private mmap (fresh zeroed pages, returned to the kernel on free)
mapped = libc.mallinfo2().hblkhd - before
print(json.dumps({"applied": applied, "mapped": mapped}))
"""


def probe(env_value: str | None) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("JASPER_TUNE_MALLOC", None)
    if env_value is not None:
        env["JASPER_TUNE_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the tuning applies to glibc only")
def test_tuned_allocator_reuses_freed_batch_memory() -> None:
    tuned = probe(None)
    untuned = probe("0")
    assert tuned["applied"] is True and untuned["applied"] is False
    # untuned, glibc maps every large batch tensor afresh; tuned, it comes from the heap, whose
    # freed memory the next batch reuses
    assert int(untuned["mapped"]) >= 48 << 20
    assert int(tuned["mapped"]) == 0


RELEASE_PROBE = """
import json, torch
from jasper.allocator import release_free_memory, tune_host_allocator

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10

assert tune_host_allocator()
batches = [torch.ones(12 << 20) for _ in range(8)]  # 8 x 48 MiB from the tuned heap
del batches
kept = anon()
released = release_free_memory()
print(json.dumps({"released": released, "kept": kept, "after": anon()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the tuning applies to glibc only")
def test_release_hands_the_tuned_heaps_free_memory_back() -> None:
    env = dict(os.environ)
    env.pop("JASPER_TUNE_MALLOC", None)
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["released"] is True
    # the tuned heap kept the freed batches (that is the tuning); the release returns them
    assert got["kept"] - got["after"] >= 300 << 20, got


HUGE_PROBE = """
import json, torch
from jasper.allocator import huge_empty

def huge():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) << 10

before = huge()
plain = torch.empty(64 << 18)  # 64 MiB of float32, not advised
plain.fill_(1.0)
mid = huge()
t = huge_empty((64 << 18,), torch.float32)
t.fill_(1.0)
print(json.dumps({"plain": mid - before, "advised": huge() - mid}))
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "missing"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(platform.system() != "Linux" or _thp_mode() not in ("madvise", "always"),
                    reason="transparent huge pages are off on this machine")
def test_huge_empty_lands_on_huge_pages() -> None:
    """Preloaded arrays gather random rows: on 4 KiB pages each row is a TLB miss."""
    out = subprocess.run([sys.executable, "-c", HUGE_PROBE], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["advised"] >= 32 << 20, got  # most of its 64 MiB (the 2 MiB-aligned inside)
    if _thp_mode() == "madvise":
        assert got["plain"] == 0, got  # torch alone does not ask
