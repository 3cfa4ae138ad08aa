"""Turn a run's raw results into ``report.md`` and PNG charts.

Inputs in the run directory: ``benchmark.json`` (pytest-benchmark's JSON, or the stand-in's),
``machine.json``, ``run.json`` and ``outcomes.json``. Every figure in the report comes from a
measurement of the same run; ratios divide by baselines of the same run and grid point.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MB = 1e6
GB = 1e9

# Issue 3's performance targets (reported, never asserted).
TARGET_CEILING = 0.5
TARGET_REFERENCE = 20.0
TARGET_GPU = 0.6
TARGET_PSS = 1.10


class Results:
    """The benchmark entries of one run, searchable by their ``extra_info``."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = [e for e in entries if e.get("extra_info", {}).get("kind")]

    def find(self, **where: Any) -> list[dict[str, Any]]:
        out = []
        for e in self.entries:
            info = e["extra_info"]
            if all(info.get(k) == v for k, v in where.items()):
                out.append(e)
        return out

    def one(self, **where: Any) -> dict[str, Any] | None:
        got = self.find(**where)
        return got[0] if got else None

    def grids(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for e in self.entries:
            seen.setdefault(e["extra_info"]["grid"], e["extra_info"]["grid_label"])
        return list(seen.items())


#: Which statistic of the timed rounds the report uses (``min`` or ``median``); write_report sets
#: it from the run's configuration.
STAT = "min"


def secs(e: dict[str, Any] | None) -> float:
    """Seconds of an entry's round: the best (``min``) or the ``median`` round."""
    return float(e["stats"][STAT]) if e else math.nan


def rate(e: dict[str, Any] | None) -> float:
    """Samples per second of a serving entry."""
    if not e:
        return math.nan
    return e["extra_info"]["samples"] / secs(e)


def ceiling_rate(r: Results, e: dict[str, Any], grid: str) -> float:
    """Samples per second of the raw-gather ceiling to divide ``e``'s rate by: the ceiling timed
    in alternating rounds with ``e`` where the run has it (``paired_ceiling_s``, same statistic
    as the rounds), else the ceiling measured once for the batch size."""
    paired = e["extra_info"].get("paired_ceiling_s")
    if paired:
        s = min(paired) if STAT == "min" else float(statistics.median(paired))
        return e["extra_info"]["samples"] / s
    return rate(r.one(grid=grid, kind="cpu_raw_gather", batch_size=e["extra_info"]["batch_size"]))


def gbps(e: dict[str, Any] | None) -> float:
    if not e:
        return math.nan
    return rate(e) * e["extra_info"]["bytes_per_sample"] / GB


# --- formatting ------------------------------------------------------------------------------
def measured(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def f_rate(x: float) -> str:
    if not measured(x):
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def f_num(x: float | None, digits: int = 2, suffix: str = "") -> str:
    if not measured(x):
        return "n/a"
    return f"{x:.{digits}f}{suffix}"


def f_ratio(x: float | None) -> str:
    if not measured(x):
        return "n/a"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def f_s(x: float | None) -> str:
    if not measured(x):
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def f_mb(x: float | None) -> str:
    return "n/a" if not measured(x) else f"{x / MB:,.1f}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    if not rows:
        return "_no measurements (see Skipped)_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def target_verdict(value: float, goal: float, higher: bool = True) -> str:
    if not measured(value):
        return "not measured"
    met = value >= goal if higher else value <= goal
    return "met" if met else "missed"


# --- the report ------------------------------------------------------------------------------
def _machine_md(m: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    ram = m.get("ram_bytes")
    lines = [
        f"- CPU: {m.get('cpu')} ({m.get('usable_cores')} usable cores of "
        f"{m.get('logical_cores')} logical, {m.get('physical_cores') or '?'} physical; "
        f"torch uses {m.get('torch_threads')} threads)",
        f"- RAM: {ram / 2**30:.1f} GiB" if ram else "- RAM: unknown",
        f"- OS: {m.get('os')}, Python {m.get('python')}, torch {m.get('torch')}",
    ]
    gpu = m.get("gpu")
    device = (run or {}).get("device")
    if device and not str(device).startswith("cuda"):
        lines.append(f"- The GPU benchmarks ran on `{device}` (JASPER_BENCH_DEVICE): a check of "
                     "their code, not GPU figures")
    if gpu:
        lines.append(f"- GPU: {gpu['name']} x{gpu.get('count', 1)}, "
                     f"{gpu['memory_bytes'] / 2**30:.1f} GiB, driver {gpu.get('driver') or '?'}, "
                     f"CUDA {gpu.get('cuda')}")
    else:
        lines.append("- GPU: none (no CUDA device was available: the GPU rows are skipped)")
    vers = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    lines.append(f"- Versions: {vers}")
    return "\n".join(lines) + "\n"


def _jasper_label(info: dict[str, Any]) -> str:
    path = "mmap" if info.get("mapped") else "preload"
    if info["kind"] == "jasper_getitems":
        return f"jasper __getitems__ ({path})"
    if info["kind"] == "gpu_loader":
        if info.get("staged"):
            return "jasper GPULoader (staged)"
        return f"jasper GPULoader (resident, {'CUDA graph' if info.get('cuda_graph') else 'eager'})"
    if info["kind"] == "jasper_inprocess":
        return f"jasper GPULoader on CPU ({path})"
    workers = info.get("workers", 0)
    kind = {"thread": " threads", "process": " processes"}.get(info.get("worker_type", ""), "")
    return f"jasper DataLoader w{workers}{kind if workers else ''} ({path})"


def _best(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    entries = [e for e in entries if measured(rate(e))]
    return max(entries, key=rate) if entries else None


NOT_APPLICABLE = "not applicable on this machine"


def _gpu_not_applicable(machine: dict[str, Any], run: dict[str, Any]) -> str | None:
    """Why the GPU target cannot be judged here, or ``None`` when it can."""
    device = str(run.get("device") or "cuda")
    if not machine.get("gpu"):
        return f"{NOT_APPLICABLE}: no CUDA device"
    if not device.startswith("cuda"):
        return (f"{NOT_APPLICABLE}: the GPU benchmarks ran on `{device}` "
                "(JASPER_BENCH_DEVICE), a check of their code")
    return None


def _headline(r: Results, machine: dict[str, Any] | None = None,
              run: dict[str, Any] | None = None) -> str:
    """Issue 3's targets, each "met", "missed" or not applicable on this machine (a GPU target
    without a GPU), with a count of each first."""
    machine, run = machine or {}, run or {}
    rows = []
    gpu_na = _gpu_not_applicable(machine, run)
    for grid, label in r.grids():
        sizes = sorted({e["extra_info"]["batch_size"] for e in r.find(grid=grid, kind="cpu_raw_gather")})
        if not sizes:
            sizes = sorted({e["extra_info"]["batch_size"]
                            for e in r.find(grid=grid, kind="gpu_index_select")})
        if not sizes:
            continue
        b = headline_batch(sizes)
        ref = r.one(grid=grid, kind="peer", peer="reference", batch_size=b)
        for e in sorted(r.find(grid=grid, kind="jasper_loader", batch_size=b, mapped=False),
                        key=lambda e: (e["extra_info"]["backend"], e["extra_info"]["workers"],
                                       e["extra_info"].get("worker_type", ""))):
            info = e["extra_info"]
            frac = rate(e) / ceiling_rate(r, e, grid)
            vs_ref = rate(e) / rate(ref)
            rows.append([label, f"{info['backend']} {_jasper_label(info)} B={b}",
                         f"{f_rate(rate(e))}/s", f"{f_ratio(frac)} of raw gather "
                         f"({target_verdict(frac, TARGET_CEILING)}, target >= {TARGET_CEILING})",
                         f"{f_ratio(vs_ref)} the per-item reference "
                         f"({target_verdict(vs_ref, TARGET_REFERENCE)}, target >= {TARGET_REFERENCE:.0f}x)"])
        gpu_ceiling = r.one(grid=grid, kind="gpu_index_select", batch_size=b)
        gpu_rows = r.find(grid=grid, kind="gpu_loader", batch_size=b)
        for e in gpu_rows:
            frac = rate(e) / rate(gpu_ceiling)
            i = e["extra_info"]
            verdict = gpu_na or target_verdict(frac, TARGET_GPU)
            rows.append([label, f"{i['backend']} {_jasper_label(i)} B={b}", f"{f_rate(rate(e))}/s",
                         f"{f_ratio(frac)} of the on-device index_select loop "
                         f"({verdict}, target >= {TARGET_GPU})", ""])
        if not gpu_rows and gpu_na:
            rows.append([label, f"jasper GPULoader (resident) B={b}", "",
                         f"GPU loader / on-device index_select loop ({gpu_na}, "
                         f"target >= {TARGET_GPU})", ""])
        for backend, mapped, kind, ratio in _pss_ratios(r, grid):
            rows.append([label, f"{backend} ({'mmap' if mapped else 'preload'}) PSS 2 worker "
                                f"{kind} / 0 workers",
                         "", f"{f_ratio(ratio)} ({target_verdict(ratio, TARGET_PSS, higher=False)}, "
                         f"target <= {TARGET_PSS})", ""])
    text = " ".join(c for row in rows for c in row[3:])
    counts = {k: len(re.findall(rf"\({k}[,:]", text)) for k in ("met", "missed", NOT_APPLICABLE)}
    summary = (f"{counts['met']} met, {counts['missed']} missed, {counts[NOT_APPLICABLE]} "
               f"{NOT_APPLICABLE} (a GPU target needs a CUDA device).\n\n" if rows else "")
    return summary + table(["grid", "what", "absolute", "vs ceiling / target",
                            "vs reference / target"], rows)


def _pss(info: dict[str, Any]) -> dict[str, float]:
    """Summed PSS by loader: ``"0"``, ``"2 processes"``, ``"2 threads"``..."""
    return {str(k): float(v) for k, v in (info.get("pss") or {}).items()}


def _pss_ratio(info: dict[str, Any], kind: str = "processes") -> float:
    """PSS of the most workers of ``kind`` over PSS without workers."""
    w = _pss(info)
    many = [k for k in w if k.endswith(kind)]
    if "0" not in w or not many:
        return math.nan
    top = max(many, key=lambda k: int(k.split()[0]))
    return w[top] / w["0"]


def _pss_ratios(r: Results, grid: str) -> list[tuple[str, bool, str, float]]:
    out = []
    for e in r.find(grid=grid, kind="memory"):
        i = e["extra_info"]
        for kind in ("processes", "threads"):
            ratio = _pss_ratio(i, kind)
            if measured(ratio):
                out.append((i["backend"], bool(i.get("mapped")), kind, ratio))
    return sorted(out)


def _q1(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        keys = sorted({(e["extra_info"]["backend"], e["extra_info"]["preset"])
                       for e in r.find(grid=grid, kind="raw_read")})
        for temp in ("cold", "warm"):
            rows = []
            for backend, preset in keys:
                raw = r.one(grid=grid, kind="raw_read", backend=backend, preset=preset, temp=temp)
                st = r.one(grid=grid, kind="store_preload", backend=backend, preset=preset,
                           temp=temp)
                dsp = r.one(grid=grid, kind="dataset_open", backend=backend, preset=preset,
                            temp=temp, mapped=False)
                dsm = r.one(grid=grid, kind="dataset_open", backend=backend, preset=preset,
                            temp=temp, mapped=True)
                data = (raw or st or {}).get("extra_info", {}).get("data_bytes", math.nan)
                files = raw["extra_info"]["file_bytes"] if raw else math.nan

                def cell(e: dict[str, Any] | None, data: float = data,
                         raw: dict[str, Any] | None = raw) -> str:
                    if not e:
                        return "n/a"
                    s = secs(e)
                    return (f"{f_s(s)} ({data / s / MB:,.0f} MB/s, "
                            f"{f_ratio(secs(raw) / s)} of raw)")

                resident = (raw or {}).get("extra_info", {}).get("resident_before")
                rows.append([
                    backend, preset, f_mb(data), f_mb(files),
                    f"{f_s(secs(raw))} ({files / secs(raw) / MB:,.0f} MB/s)" if raw else "n/a",
                    cell(st), cell(dsp), f_s(secs(dsm)) if dsm else "n/a",
                    f_num(resident * 100 if measured(resident) else None, 0, "%") if temp == "cold" else "-",
                ])
            parts.append(f"**{label}, {temp}**\n\n" + table(
                ["backend", "preset", "data MB", "file MB", "raw read of the files (ceiling)",
                 "store preload (open_store + read_into)", "JASPERSteeringDataset preload",
                 "JASPERSteeringDataset mmap open", "cached before"], rows))
        gpu_rows = []
        for e in r.find(grid=grid, kind="gpu_raw_preload"):
            i = e["extra_info"]
            for temp in ("cold", "warm"):
                d = r.one(grid=grid, kind="gpu_dataset_preload", backend=i["backend"],
                          preset=i["preset"], temp=temp)
                gpu_rows.append([
                    i["backend"], i["preset"], temp, f_mb(i["data_bytes"]),
                    f"{f_s(secs(e))} ({i['file_bytes'] / secs(e) / MB:,.0f} MB/s)",
                    f"{f_s(secs(d))} ({f_ratio(secs(e) / secs(d))} of ceiling)"
                    if d else "n/a",
                ])
        if gpu_rows:
            parts.append(f"**{label}, onto the GPU**\n\n" + table(
                ["backend", "preset", "page cache", "data MB",
                 "raw read + pinned H2D copy (ceiling, warm)", "JASPERSteeringDataset(device='cuda')"],
                gpu_rows))
    return "\n".join(parts)


def _q2(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        rows = []
        for e in sorted(r.find(grid=grid, kind="memory"),
                        key=lambda e: (e["extra_info"]["backend"], bool(e["extra_info"]["mapped"]))):
            i = e["extra_info"]
            w = _pss(i)
            procs = {str(k): v for k, v in (i.get("procs") or {}).items()}
            cells = [f"{k}: {f_mb(v)} ({procs.get(k, '?')} procs)" for k, v in w.items()]
            # the peak is sampled during the epoch (runs before it was recorded have none)
            peaks = {str(k): float(v) for k, v in (i.get("pss_peak") or {}).items()}
            rows.append([
                i["backend"], "mmap" if i.get("mapped") else "preload", f_mb(i["data_bytes"]),
                f"{f_mb(i['rss_delta'])} ({f_ratio(i['rss_delta'] / i['data_bytes'])})",
                "; ".join(cells),
                "; ".join(f"{k}: {f_mb(v)}" for k, v in peaks.items()) or "not recorded",
                *[f"{f_ratio(x)} ({target_verdict(x, TARGET_PSS, higher=False)})"
                  for x in (_pss_ratio(i, "processes"), _pss_ratio(i, "threads"))],
            ])
        parts.append(f"**{label}**\n\n" + table(
            ["backend", "path", "data MB", "RSS growth on open MB (/ data)",
             "summed PSS MB after one epoch, by workers",
             "peak summed PSS MB during the epoch (batches in flight)",
             f"worker processes / 0 (target <= {TARGET_PSS})", "worker threads / 0"], rows))
        rows = []
        for e in r.find(grid=grid, kind="gpu_dataset_preload", temp="warm"):
            i = e["extra_info"]
            rows.append([i["backend"], f_mb(i["data_bytes"]), f_mb(i["gpu_bytes"]),
                         f_ratio(i["gpu_bytes"] / i["data_bytes"])])
        if rows:
            parts.append(f"**{label}: GPU memory after preload**\n\n" + table(
                ["backend", "data MB", "GPU memory allocated MB", "GPU / data"], rows))
    return "\n".join(parts)


def _q3(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        rows = []
        jasper = [e for k in (*JASPER_CPU, "gpu_loader") for e in r.find(grid=grid, kind=k)]
        jasper.sort(key=lambda e: (e["extra_info"]["batch_size"], e["extra_info"]["kind"] == "gpu_loader",
                                   e["extra_info"]["backend"], _jasper_label(e["extra_info"])))
        for e in jasper:
            i = e["extra_info"]
            if i["kind"] == "gpu_loader":
                top = rate(r.one(grid=grid, kind="gpu_index_select", batch_size=i["batch_size"]))
            else:
                top = ceiling_rate(r, e, grid)
            rows.append([_jasper_label(i), i["backend"], str(i["batch_size"]),
                         f"{f_rate(rate(e))}/s", f_num(gbps(e)),
                         f_ratio(rate(e) / top), f_s(i["ttfb_s"]),
                         f_num(i["p50_ms"], 2), f_num(i["p99_ms"], 2)])
        parts.append(f"**{label}**\n\n" + table(
            ["path", "backend", "batch", "samples/s", "GB/s", "of its ceiling", "first batch",
             "p50 ms", "p99 ms"], rows))
    return "\n".join(parts)


def _q4(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        sizes = sorted({e["extra_info"]["batch_size"] for e in r.entries
                        if e["extra_info"]["grid"] == grid and "batch_size" in e["extra_info"]})
        rows = []
        for b in sizes:
            cpu = r.one(grid=grid, kind="cpu_raw_gather", batch_size=b)
            h2d = r.one(grid=grid, kind="gpu_pinned_h2d", batch_size=b)
            gsel = r.one(grid=grid, kind="gpu_index_select", batch_size=b)
            best_cpu = _best([e for k in JASPER_CPU
                              for e in r.find(grid=grid, kind=k, batch_size=b)])
            gl = _best(r.find(grid=grid, kind="gpu_loader", batch_size=b))
            rows.append([
                str(b),
                f"{f_rate(rate(cpu))}/s ({f_num(gbps(cpu))} GB/s)" if cpu else "n/a",
                (f"{f_ratio(rate(best_cpu) / rate(cpu))} ({_jasper_label(best_cpu['extra_info'])},"
                 f" {best_cpu['extra_info']['backend']})") if best_cpu and cpu else "n/a",
                f"{f_num(gbps(h2d))} GB/s ({f_rate(rate(h2d))}/s)" if h2d else "n/a",
                f"{f_rate(rate(gsel))}/s ({f_num(gbps(gsel))} GB/s)" if gsel else "n/a",
                f_ratio(rate(gl) / rate(gsel)) if gl and gsel else "n/a",
            ])
        parts.append(f"**{label}**\n\n" + table(
            ["batch", "CPU raw gather (ceiling)", "best jasper CPU path / ceiling",
             "pinned H2D copy (ceiling)", "GPU index_select loop (ceiling)",
             "GPULoader / index_select"], rows))
    return "\n".join(parts)


JASPER_CPU = ("jasper_loader", "jasper_getitems", "jasper_inprocess")
PEER_NAMES = {"reference": "per-item reference + default_collate",
              "tensordict": "tensordict memmap", "hf_datasets": "HF datasets (torch format)",
              "numpy_memmap": "numpy memmap + __getitems__",
              "safetensors": "safetensors load_file + indexing",
              "lance": "Lance take",
              "mosaic": "Mosaic streaming LocalDataset + default_collate"}
#: The data path of each peer for runs whose entries do not record it (runs before peers did).
PEER_PATHS = {"reference": "preload", "tensordict": "mmap", "hf_datasets": "mmap",
              "numpy_memmap": "mmap", "safetensors": "preload", "lance": "lazy",
              "mosaic": "lazy"}
#: Why each peer is where it is, for the report's "where a peer wins" notes.
PEER_WHY = {
    "reference": "one Python dict per item, then default_collate stacks them",
    "tensordict": "one indexing of the memory-mapped TensorDict per batch (vectorised), each "
                  "field gathered into a freshly allocated tensor",
    "hf_datasets": "Arrow rows turned into tensors by the torch formatter, per column and batch",
    "numpy_memmap": "numpy fancy indexing on the maps: vectorised, single-threaded copies into "
                    "new arrays",
    "safetensors": "after a load, plain tensor indexing: the same gathers as jasper, with a fresh "
                   "allocation per field",
    "lance": "a take per table per batch through Lance's reader: decoding and Arrow conversion "
             "on top of the bytes",
    "mosaic": "random access is one sample at a time (LocalDataset opens the sample's shard file, "
              "reads its offsets and bytes, decodes each column), then default_collate stacks "
              "the per-sample dicts: the per-item pattern of the reference, from files",
}


def _q5(r: Results) -> str:
    """Question 5 per data path: each peer against jasper's best path of the same kind and the
    raw gather ceiling, then where a peer comes within reach of jasper or wins, and why."""
    parts = []
    for grid, label in r.grids():
        peers = r.find(grid=grid, kind="peer")
        sizes = sorted({e["extra_info"]["batch_size"] for e in peers})
        jasper = [e for k in JASPER_CPU for e in r.find(grid=grid, kind=k)]
        rows, wins = [], []
        for b in sizes:
            ceiling = r.one(grid=grid, kind="cpu_raw_gather", batch_size=b)
            for path in PATH_NAMES:
                here = sorted([e for e in peers if e["extra_info"]["batch_size"] == b
                               and _peer_path(e["extra_info"]) == path], key=lambda e: -rate(e))
                best = _best([e for e in jasper if e["extra_info"]["batch_size"] == b
                              and _jasper_path(e["extra_info"]) == path])
                if not here:
                    continue
                if best is None:  # jasper has no such path (lazy): compare with its best mapped
                    best = _best([e for e in jasper if e["extra_info"]["batch_size"] == b
                                  and _jasper_path(e["extra_info"]) == "mmap"])
                jname = (f"{f_rate(rate(best))}/s ({_jasper_label(best['extra_info'])}, "
                         f"{best['extra_info']['backend']})") if best else "n/a"
                for e in here:
                    ratio = rate(best) / rate(e) if best else math.nan
                    rows.append([str(b), PATH_NAMES[path], _peer_label(e["extra_info"]),
                                 f"{f_rate(rate(e))}/s",
                                 f_ratio(rate(e) / rate(ceiling)) if ceiling else "n/a",
                                 jname, f_ratio(ratio)])
                    if measured(ratio) and ratio < 1.1:
                        wins.append((b, path, e, best, ratio))
        parts.append(f"**{label}**\n\n" + table(
            ["batch", "path", "peer", "samples/s", "of raw gather ceiling",
             "jasper's best path of that kind (mapped, for lazy peers)", "jasper / peer"], rows))
        if wins:
            lines = []
            for b, path, e, best, ratio in wins:
                i = e["extra_info"]
                verdict = "wins" if ratio < 1 else "comes within 10% of jasper"
                lines.append(f"- batch {b}, {PATH_NAMES[path]}: {_peer_label(i)} {verdict} "
                             f"({f_rate(rate(e))}/s vs {f_rate(rate(best))}/s): "
                             f"{PEER_WHY.get(i.get('peer', ''), '')}.")
            parts.append("Where a peer wins or comes within 10%:\n\n" + "\n".join(lines) + "\n")
        else:
            parts.append("No peer came within 10% of jasper's best path of the same kind at any "
                         "batch size.\n")
        notes = "\n".join(f"- {PEER_NAMES[p]}: {PEER_WHY[p]}." for p in PEER_NAMES
                          if any(e["extra_info"].get("peer") == p for e in peers))
        parts.append("Why each peer is where it is:\n\n" + notes + "\n")
    return "\n".join(parts)


def _q6(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        rows = []
        firsts: dict[str, float] = {}
        entries = r.find(grid=grid, kind="size")
        for e in entries:
            i = e["extra_info"]
            firsts.setdefault(i["backend"], i["size_bytes"])
        for e in entries:
            i = e["extra_info"]
            opts = ", ".join(f"{k}={v}" for k, v in (i.get("options") or {}).items()) or "-"
            rows.append([i["backend"], i["preset"], opts, f_mb(i["size_bytes"]),
                         f_ratio(i["size_bytes"] / i["data_bytes"]),
                         f_ratio(i["size_bytes"] / firsts[i["backend"]]),
                         f_s(i.get("write_s"))])
        parts.append(f"**{label}**\n\n" + table(
            ["backend", "preset", "options", "MB on disk", "disk / data bytes",
             "vs the backend's first preset", "write time"], rows))
    return "\n".join(parts)


def _skipped(outcomes: list[dict[str, Any]]) -> str:
    by: dict[str, list[str]] = defaultdict(list)
    failed = []
    for o in outcomes:
        if o["outcome"] == "skipped":
            by[o["reason"]].append(o["id"].split("::")[-1])
        elif o["outcome"] == "failed":
            failed.append(o)
    lines = []
    for reason, ids in sorted(by.items()):
        lines.append(f"- {len(ids)} skipped: {reason} (e.g. `{ids[0]}`)")
    for o in failed:
        lines.append(f"- FAILED `{o['id']}`: {o['reason'].splitlines()[-1] if o['reason'] else ''}")
    return "\n".join(lines) + "\n" if lines else "Nothing was skipped.\n"


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` (and the charts, when matplotlib is installed) into ``run_dir``."""
    from benchlib import report_sections  # it imports this module's helpers
    run_dir = Path(run_dir)
    text = (run_dir / "benchmark.json").read_text()
    # pytest-benchmark leaves the file empty when nothing ran (e.g. --gpu-only without CUDA)
    raw = json.loads(text) if text.strip() else {}
    machine = _load(run_dir / "machine.json") or raw.get("machine_info", {}).get("jasper", {})
    run = _load(run_dir / "run.json") or {}
    outcomes = _load(run_dir / "outcomes.json") or []
    r = Results(raw.get("benchmarks", []))
    cfg = run.get("config", {})
    global STAT
    STAT = cfg.get("stat", "min")
    charts = write_charts(r, run_dir, run)
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    notes = "".join(f"\n> {n}\n" for n in cfg.get("notes", []))
    wall = run.get("wall_s")
    md = [
        "# jasper benchmark report\n",
        f"Run {run.get('started_utc', '?')} (commit {run.get('commit') or '?'}), mode "
        f"`{run.get('mode', '?')}`{' (GPU part only)' if run.get('gpu_only') else ''}, "
        f"{f'{wall:.0f} s' if wall else '?'} wall time; batch sizes {cfg.get('batch_sizes')}, "
        f"{cfg.get('rounds')} timed rounds per measurement, of which the report shows the "
        f"{'best (the round least disturbed by other processes)' if STAT == 'min' else 'median'}; "
        "steering pinned to the centroid "
        "variant so every sample moves the same bytes. All ratios divide by baselines measured in "
        "this run on the same bytes; performance targets are reported, never asserted.\n" + notes,
        "## Machine\n", _machine_md(machine, run),
        "## Issue 3's targets\n", _headline(r, machine, run),
        "## 1. Open and preload\n",
        "Seconds and MB/s of data bytes; the ceiling is a raw read of the same files into "
        "one preallocated buffer. Cold rounds drop the files' pages first (posix_fadvise "
        "DONTNEED); \"cached before\" is the fraction still in the page cache (mincore).\n",
        _q1(r),
        "## 2. Memory\n", _q2(r),
        "## 3. Serving\n",
        "samples/s and GB/s of finished batches; \"of its ceiling\" divides by the "
        "raw gather (CPU paths) or the on-device index_select loop (GPU loader) at the same batch "
        "size" + ("; for the in-process CPU paths (no workers, threads, `__getitems__`) that "
                  "raw gather was timed in alternating rounds with the path itself"
                  if any(e["extra_info"].get("paired_ceiling_s") for e in r.entries) else "") +
        "; first batch = from `iter()` on a fresh loader (workers start-up included); "
        "p50/p99 = gap between consecutive batches.\n",
        _q3(r),
        "## 4. Ceilings\n", _q4(r),
        "## 5. Peers (same data, same index stream)\n", _q5(r),
        "## 6. Size on disk\n", _q6(r),
        *report_sections.sections(r),
        "## Skipped and failed\n", _skipped(outcomes),
    ]
    if charts:
        md.append("## Charts\n")
        md += [f"![{c.stem}]({c.name})\n" for c in charts]
    elif not have_mpl:
        md.append("_Charts were not drawn: matplotlib is not installed._\n")
    else:
        md.append("_No charts: nothing was measured._\n")
    out = run_dir / "report.md"
    out.write_text("\n".join(md))
    return out


def _load(p: Path) -> Any:
    return json.loads(p.read_text()) if p.is_file() else None


# --- charts ----------------------------------------------------------------------------------
#: Colours: the ceiling, jasper, and the peers.
C_CEILING, C_JASPER, C_PEER = "#444444", "#1f77b4", "#ff7f0e"
PATH_NAMES = {"preload": "preloaded", "mmap": "mapped", "lazy": "lazy (read per batch)"}


def chart_figures(r: Results, run: dict[str, Any] | None = None) -> Iterator[tuple[str, Any]]:
    """``(name, matplotlib figure)`` for each question that has data; nothing without matplotlib.
    Figures of a smoke run say so on the image. The caller closes them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    run = run or {}
    cfg = run.get("config", {})
    from benchlib.report_sections import chart_targets

    for name, draw in (("serving", _chart_serving), ("peers", _chart_peers),
                       ("open_preload", _chart_open), ("memory", _chart_memory),
                       ("size_on_disk", _chart_size), ("derived_and_zarr", chart_targets)):
        fig = draw(r, plt, cfg)
        if fig is None:
            continue
        if run.get("mode") == "smoke":
            _mark_smoke(fig)
        yield name, fig


def write_charts(r: Results, run_dir: Path, run: dict[str, Any] | None = None) -> list[Path]:
    """One PNG per question that has data (see :func:`chart_figures`); none without matplotlib."""
    out = []
    for name, fig in chart_figures(r, run):
        import matplotlib.pyplot as plt

        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def _mark_smoke(fig: Any) -> None:
    """A smoke run's numbers mean nothing: say it across the image and in its corner."""
    fig.text(0.5, 0.5, "SMOKE RUN", transform=fig.transFigure, fontsize=60, color="red",
             alpha=0.15, ha="center", va="center", rotation=25, weight="bold", zorder=100)
    fig.text(0.01, 0.995, "smoke run: tiny dataset, one round; the numbers mean nothing",
             transform=fig.transFigure, fontsize=9, color="red", ha="left", va="top")


def headline_batch(sizes: list[int]) -> int:
    return 1024 if 1024 in sizes else sizes[len(sizes) // 2]


def _loader_name(i: dict[str, Any]) -> str:
    """A jasper CPU path without its backend and path (they are the group's)."""
    if i["kind"] == "jasper_getitems":
        return "__getitems__ (no DataLoader)"
    if i["kind"] == "jasper_inprocess":
        return "GPULoader code on the CPU"
    workers = i.get("workers", 0)
    if not workers:
        return "DataLoader, 0 workers"
    kind = {"thread": "threads", "process": "processes"}.get(i.get("worker_type", ""), "processes")
    return f"DataLoader, {workers} worker {kind}"


def _grouped_bars(ax: Any, groups: list[tuple[str, list[tuple[str, float, str]]]],
                  ceiling: float | None, *, log: bool = False, ratio_to: str = "ceiling") -> None:
    """Horizontal bars in labelled groups (each sorted fastest first, as given), a dashed line at
    ``ceiling`` and each bar labelled with its value and its fraction of the ceiling."""
    y, ticks, labels = 0.0, [], []
    for title, bars in groups:
        ax.text(0.005, y - 0.1, title, transform=ax.get_yaxis_transform(), ha="left",
                va="bottom", fontsize=9, weight="bold")
        y += 0.6
        for label, value, color in bars:
            ax.barh(y, value, color=color, height=0.8)
            frac = f", {value / ceiling:.2f}x of {ratio_to}" if ceiling and value > 0 else ""
            ax.text(value, y, f" {f_rate(value)}/s{frac}", va="center", fontsize=7)
            ticks.append(y)
            labels.append(label)
            y += 1
        y += 0.8
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_ylim(y - 0.5, -0.8)
    if ceiling:
        ax.axvline(ceiling, color=C_CEILING, linestyle="--", linewidth=1)
        ax.text(ceiling, 1.0, f"raw gather ceiling\n{f_rate(ceiling)}/s", color=C_CEILING,
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.35 if not log else 0.6)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f_rate(v)))


def _chart_serving(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    """Question 3: how fast each of jasper's CPU paths serves, per backend and data path, against
    the raw gather ceiling; one panel per batch size, bars sorted within each group."""
    grids = r.grids()
    if not grids:
        return None
    grid, label = grids[0]
    entries = [e for k in JASPER_CPU for e in r.find(grid=grid, kind=k) if measured(rate(e))]
    if not entries:
        return None
    sizes = sorted({e["extra_info"]["batch_size"] for e in entries})
    head = headline_batch(sizes)
    keys = sorted({(e["extra_info"]["backend"], "mmap" if e["extra_info"].get("mapped")
                    else "preload") for e in entries})

    def bars_of(backend: str, path: str, b: int) -> dict[str, float]:
        return {_loader_name(e["extra_info"]): rate(e) for e in entries
                if e["extra_info"]["backend"] == backend and e["extra_info"]["batch_size"] == b
                and bool(e["extra_info"].get("mapped")) == (path == "mmap")}

    # one order per group for every panel: fastest first at the headline batch size
    order = {k: sorted(bars_of(*k, head), key=lambda n, k=k: -bars_of(*k, head)[n]) for k in keys}
    n_bars = sum(len(v) for v in order.values())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.0 * len(sizes) + 2.5,
                                                     0.24 * n_bars + 0.5 * len(keys) + 1.8),
                             sharey=True, squeeze=False)
    for ax, b in zip(axes[0], sizes):
        ceiling = rate(r.one(grid=grid, kind="cpu_raw_gather", batch_size=b))
        groups = []
        for backend, path in keys:
            got = bars_of(backend, path, b)
            groups.append((f"{backend}, {PATH_NAMES[path]}",
                           [(n, got.get(n, 0.0), C_JASPER) for n in order[(backend, path)]]))
        _grouped_bars(ax, groups, ceiling if measured(ceiling) else None)
        ax.set_title(f"batch {b}", pad=28)
        ax.set_xlabel("samples/s (linear)")
    fig.suptitle(f"Question 3, serving: jasper's CPU paths by backend and data path, against the "
                 f"raw gather ceiling (dashed)\n{label}; within each group fastest first at "
                 f"batch {head}", fontsize=11)
    fig.tight_layout()
    return fig


def _chart_peers(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    """Question 5: jasper's best path against each peer, grouped by data path (preloaded /
    mapped / lazy), sorted, on the same bytes and index stream; log axis (two orders of
    magnitude apart), every bar labelled with its fraction of the ceiling."""
    grids = r.grids()
    if not grids:
        return None
    grid, label = grids[0]
    peers = [e for e in r.find(grid=grid, kind="peer") if measured(rate(e))]
    if not peers:
        return None
    sizes = sorted({e["extra_info"]["batch_size"] for e in peers})
    jasper = [e for k in JASPER_CPU for e in r.find(grid=grid, kind=k) if measured(rate(e))]
    paths = [p for p in PATH_NAMES if any(_peer_path(e["extra_info"]) == p for e in peers)
             or any(_jasper_path(e["extra_info"]) == p for e in jasper)]
    per_panel = len(peers) / len(sizes) + 2 * len(paths)
    fig, axes = plt.subplots(len(sizes), 1, figsize=(11, (0.32 * per_panel + 1.3) * len(sizes)
                                                     + 0.8), squeeze=False)
    for ax, b in zip(axes[:, 0], sizes):
        ceiling = rate(r.one(grid=grid, kind="cpu_raw_gather", batch_size=b))
        groups = []
        for path in paths:
            bars = []
            best = _best([e for e in jasper if e["extra_info"]["batch_size"] == b
                          and _jasper_path(e["extra_info"]) == path])
            if best:
                bars.append((f"jasper: {_loader_name(best['extra_info'])} "
                             f"[{best['extra_info']['backend']}]", rate(best), C_JASPER))
            for e in peers:
                if e["extra_info"]["batch_size"] == b and _peer_path(e["extra_info"]) == path:
                    bars.append((_peer_label(e["extra_info"]), rate(e), C_PEER))
            if bars:
                groups.append((PATH_NAMES[path], sorted(bars, key=lambda t: -t[1])))
        _grouped_bars(ax, groups, ceiling if measured(ceiling) else None, log=True)
        ax.set_title(f"batch {b}", pad=28)
        ax.set_xlabel("samples/s (log scale)")
    fig.suptitle(f"Question 5, peers: same bytes, same index stream ({label})\n"
                 "blue = jasper's best path of that kind, orange = peers; dashed = raw gather "
                 "ceiling", fontsize=11)
    fig.tight_layout()
    return fig


def _jasper_path(i: dict[str, Any]) -> str:
    return "mmap" if i.get("mapped") else "preload"


def _peer_path(i: dict[str, Any]) -> str:
    return str(i.get("path") or PEER_PATHS.get(i.get("peer", ""), "preload"))


def _peer_label(i: dict[str, Any]) -> str:
    return str(PEER_NAMES.get(i.get("peer", ""), i.get("contender") or i.get("peer")))


def _chart_open(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    raws = r.find(grid=grid, kind="raw_read")
    if not raws:
        return None
    keys = sorted({(e["extra_info"]["backend"], e["extra_info"]["preset"]) for e in raws})
    series: list[tuple[str, str, Callable[..., dict | None]]] = [
        ("raw read (ceiling)", "raw_read", lambda **k: r.one(kind="raw_read", **k)),
        ("store preload", "store_preload", lambda **k: r.one(kind="store_preload", **k)),
        ("dataset preload", "dataset_open",
         lambda **k: r.one(kind="dataset_open", mapped=False, **k)),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(keys) + 2), sharey=True)
    width = 0.8 / len(series)
    colors = (C_CEILING, "#9ecae1", C_JASPER)
    for ax, temp in zip(axes, ("cold", "warm")):
        for s, (name, _kind, get) in enumerate(series):
            vals = []
            for backend, preset in keys:
                e = get(grid=grid, backend=backend, preset=preset, temp=temp)
                vals.append(e["extra_info"]["data_bytes"] / secs(e) / MB if e else 0.0)
            ax.barh([y + s * width for y in range(len(keys))], vals, height=width, label=name,
                    color=colors[s % len(colors)])
        ax.set_title(f"{temp} page cache")
        ax.set_xlabel("MB/s of data (higher is better)")
    axes[0].set_yticks([y + width for y in range(len(keys))], [f"{b} {p}" for b, p in keys])
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Question 1, open + preload speed ({r.grids()[0][1]})")
    return fig


def _chart_memory(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    mem = sorted(r.find(grid=grid, kind="memory"),
                 key=lambda e: (e["extra_info"]["backend"], bool(e["extra_info"]["mapped"])))
    if not mem:
        return None
    workers = list(dict.fromkeys(w for e in mem for w in _pss(e["extra_info"])))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(mem) * len(workers) + 1.8))
    width = 0.8 / len(workers)
    for s, w in enumerate(workers):
        vals = [_pss(e["extra_info"]).get(w, 0.0) / MB for e in mem]
        ax.barh([y + s * width for y in range(len(mem))], vals, height=width,
                label="no workers" if w == "0" else f"{w.split()[0]} worker {w.split()[1]}")
    ax.axvline(mem[0]["extra_info"]["data_bytes"] / MB, color="black", linestyle="--",
               label="data bytes")
    ax.set_yticks([y + width * (len(workers) - 1) / 2 for y in range(len(mem))],
                  [f"{e['extra_info']['backend']} ({PATH_NAMES[_jasper_path(e['extra_info'])]})"
                   for e in mem])
    ax.invert_yaxis()
    ax.set_xlabel("summed PSS of main process + workers after one epoch, MB")
    ax.legend(fontsize=8)
    title = f"Question 2, memory with DataLoader workers ({r.grids()[0][1]})"
    probed = sorted({e["extra_info"]["backend"] for e in mem})
    if cfg.get("memory_all_backends") is False:
        title += (f"\nmeasured for {', '.join(probed)} only: this mode probes the base "
                  "backend alone to stay short")
    ax.set_title(title, fontsize=10)
    return fig


def _size_unit(max_bytes: float) -> tuple[float, str]:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if max_bytes >= div:
            return div, unit
    return 1.0, "bytes"


def _chart_size(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    sizes = r.find(grid=grid, kind="size")
    if not sizes:
        return None
    sizes = sorted(sizes, key=lambda e: (e["extra_info"]["backend"], e["extra_info"]["size_bytes"]))
    data_bytes = sizes[0]["extra_info"]["data_bytes"]
    div, unit = _size_unit(max([data_bytes, *(e["extra_info"]["size_bytes"] for e in sizes)]))
    labels = [f"{e['extra_info']['backend']} {e['extra_info']['preset']}" for e in sizes]
    vals = [e["extra_info"]["size_bytes"] / div for e in sizes]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(sizes) + 1.5))
    ax.barh(range(len(sizes)), vals, color="#2ca02c")
    ax.axvline(data_bytes / div, color="black", linestyle="--", label="data bytes")
    for y, (v, e) in enumerate(zip(vals, sizes)):
        ax.text(v, y, f" {v:,.3g} {unit} ({e['extra_info']['size_bytes'] / data_bytes:.2f}x)",
                va="center", fontsize=8)
    ax.set_yticks(range(len(sizes)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} on disk (label: size and size / data bytes)")
    ax.margins(x=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"Question 6, size on disk ({r.grids()[0][1]})")
    return fig
