"""pytest configuration of the benchmark suite (``python benchmarks/run.py`` runs it).

The suite needs pytest-benchmark for its ``benchmark`` fixture and JSON; where the plugin is not
installed (the CI test environments run the smoke mode without it) a small stand-in with the same
``pedantic``/``extra_info`` interface times the rounds and writes the same JSON layout to the
file named by ``JASPER_BENCH_JSON``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.config import BenchConfig, load_config
from benchlib.machine import machine_info

ENV_JSON = "JASPER_BENCH_JSON"
#: ``1`` runs the suite with the stand-in even where pytest-benchmark is installed (``run.py``
#: then disables the plugin), to check the path the CI test environments take.
ENV_NO_PLUGIN = "JASPER_BENCH_NO_PLUGIN"

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PLUGIN = os.environ.get(ENV_NO_PLUGIN) != "1"
except ImportError:
    HAVE_PLUGIN = False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")


@pytest.fixture(scope="session")
def bench_cfg() -> BenchConfig:
    return load_config()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["jasper"] = _machine()


_MACHINE: dict[str, Any] | None = None


def _machine() -> dict[str, Any]:
    global _MACHINE
    if _MACHINE is None:
        _MACHINE = machine_info()
    return _MACHINE


# --- stand-in for pytest-benchmark ------------------------------------------------------------
_RECORDS: list[dict[str, Any]] = []


class FallbackBenchmark:
    """The subset of pytest-benchmark's fixture the suite uses."""

    def __init__(self, node: pytest.Item) -> None:
        self.node = node
        self.extra_info: dict[str, Any] = {}
        self.group: str | None = None
        self._times: list[float] = []

    def pedantic(self, target: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                 setup: Callable[[], Any] | None = None, rounds: int = 1, warmup_rounds: int = 0,
                 iterations: int = 1) -> Any:
        kwargs = kwargs or {}
        result = None
        for i in range(warmup_rounds + rounds):
            a, kw = args, kwargs
            if setup is not None:
                got = setup()
                if got is not None:
                    a, kw = got
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*a, **kw)
            if i >= warmup_rounds:
                self._times.append((time.perf_counter() - t0) / iterations)
        return result

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.pedantic(fn, args, kwargs, rounds=3)

    def record(self) -> dict[str, Any] | None:
        if not self._times:
            return None
        t = self._times
        params = getattr(getattr(self.node, "callspec", None), "params", None)
        return {
            "group": self.group,
            "name": self.node.name,
            "fullname": self.node.nodeid,
            "params": {k: str(v) for k, v in (params or {}).items()},
            "extra_info": self.extra_info,
            "stats": {
                "min": min(t), "max": max(t), "mean": statistics.fmean(t),
                "median": statistics.median(t),
                "stddev": statistics.stdev(t) if len(t) > 1 else 0.0,
                "rounds": len(t), "iterations": 1, "data": t,
            },
        }


if not HAVE_PLUGIN:

    @pytest.fixture
    def benchmark(request: pytest.FixtureRequest) -> Iterator[FallbackBenchmark]:
        b = FallbackBenchmark(request.node)
        yield b
        rec = b.record()
        if rec is not None:
            _RECORDS.append(rec)

    def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
        out = os.environ.get(ENV_JSON)
        if not out:
            return
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({
            "machine_info": {"jasper": _machine()},
            "benchmarks": _RECORDS,
            "datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "version": "fallback (pytest-benchmark not installed)",
        }, indent=1, default=str))
