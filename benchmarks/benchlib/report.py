"""Turn a run's raw results into ``report.md`` and PNG charts.

Inputs in the run directory: ``benchmark.json`` (pytest-benchmark's JSON, or the stand-in's),
``machine.json``, ``run.json`` and ``outcomes.json``. Every figure in the report comes from a
measurement of the same run; ratios divide by baselines of the same run and grid point.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
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


def gbps(e: dict[str, Any] | None) -> float:
    if not e:
        return math.nan
    return rate(e) * e["extra_info"]["bytes_per_sample"] / GB


# --- formatting ------------------------------------------------------------------------------
def _ok(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def f_rate(x: float) -> str:
    if not _ok(x):
        return "n/a"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def f_num(x: float | None, digits: int = 2, suffix: str = "") -> str:
    if not _ok(x):
        return "n/a"
    return f"{x:.{digits}f}{suffix}"


def f_ratio(x: float | None) -> str:
    if not _ok(x):
        return "n/a"
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def f_s(x: float | None) -> str:
    if not _ok(x):
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def f_mb(x: float | None) -> str:
    return "n/a" if not _ok(x) else f"{x / MB:,.1f}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    if not rows:
        return "_no measurements (see Skipped)_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _target(value: float, goal: float, higher: bool = True) -> str:
    if not _ok(value):
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
    entries = [e for e in entries if _ok(rate(e))]
    return max(entries, key=rate) if entries else None


def _headline(r: Results) -> str:
    rows = []
    for grid, label in r.grids():
        sizes = sorted({e["extra_info"]["batch_size"] for e in r.find(grid=grid, kind="cpu_raw_gather")})
        if not sizes:
            sizes = sorted({e["extra_info"]["batch_size"]
                            for e in r.find(grid=grid, kind="gpu_index_select")})
        if not sizes:
            continue
        b = 1024 if 1024 in sizes else sizes[len(sizes) // 2]
        ceiling = r.one(grid=grid, kind="cpu_raw_gather", batch_size=b)
        ref = r.one(grid=grid, kind="peer", peer="reference", batch_size=b)
        for e in sorted(r.find(grid=grid, kind="jasper_loader", batch_size=b, mapped=False),
                        key=lambda e: (e["extra_info"]["backend"], e["extra_info"]["workers"],
                                       e["extra_info"].get("worker_type", ""))):
            info = e["extra_info"]
            frac = rate(e) / rate(ceiling)
            vs_ref = rate(e) / rate(ref)
            rows.append([label, f"{info['backend']} {_jasper_label(info)} B={b}",
                         f"{f_rate(rate(e))}/s", f"{f_ratio(frac)} of raw gather "
                         f"({_target(frac, TARGET_CEILING)}, target >= {TARGET_CEILING})",
                         f"{f_ratio(vs_ref)} the per-item reference "
                         f"({_target(vs_ref, TARGET_REFERENCE)}, target >= {TARGET_REFERENCE:.0f}x)"])
        gpu_ceiling = r.one(grid=grid, kind="gpu_index_select", batch_size=b)
        for e in r.find(grid=grid, kind="gpu_loader", batch_size=b):
            frac = rate(e) / rate(gpu_ceiling)
            i = e["extra_info"]
            rows.append([label, f"{i['backend']} {_jasper_label(i)} B={b}", f"{f_rate(rate(e))}/s",
                         f"{f_ratio(frac)} of the on-device index_select loop "
                         f"({_target(frac, TARGET_GPU)}, target >= {TARGET_GPU})", ""])
        for backend, mapped, kind, ratio in _pss_ratios(r, grid):
            rows.append([label, f"{backend} ({'mmap' if mapped else 'preload'}) PSS 2 worker "
                                f"{kind} / 0 workers",
                         "", f"{f_ratio(ratio)} ({_target(ratio, TARGET_PSS, higher=False)}, "
                         f"target <= {TARGET_PSS})", ""])
    return table(["grid", "what", "absolute", "vs ceiling / target", "vs reference / target"], rows)


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
            if _ok(ratio):
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
                    f_num(resident * 100 if _ok(resident) else None, 0, "%") if temp == "cold" else "-",
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
            rows.append([
                i["backend"], "mmap" if i.get("mapped") else "preload", f_mb(i["data_bytes"]),
                f"{f_mb(i['rss_delta'])} ({f_ratio(i['rss_delta'] / i['data_bytes'])})",
                "; ".join(cells),
                *[f"{f_ratio(x)} ({_target(x, TARGET_PSS, higher=False)})"
                  for x in (_pss_ratio(i, "processes"), _pss_ratio(i, "threads"))],
            ])
        parts.append(f"**{label}**\n\n" + table(
            ["backend", "path", "data MB", "RSS growth on open MB (/ data)",
             "summed PSS MB after one epoch, by workers",
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
            ck = "gpu_index_select" if i["kind"] == "gpu_loader" else "cpu_raw_gather"
            ceiling = r.one(grid=grid, kind=ck, batch_size=i["batch_size"])
            rows.append([_jasper_label(i), i["backend"], str(i["batch_size"]),
                         f"{f_rate(rate(e))}/s", f_num(gbps(e)),
                         f_ratio(rate(e) / rate(ceiling)), f_s(i["ttfb_s"]),
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
              "tensordict": "tensordict memmap", "hf_datasets": "HF datasets (torch format)"}


def _q5(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        sizes = sorted({e["extra_info"]["batch_size"] for e in r.find(grid=grid, kind="peer")})
        peers = [p for p in PEER_NAMES if r.find(grid=grid, kind="peer", peer=p)]
        rows = []
        for b in sizes:
            got = {p: r.one(grid=grid, kind="peer", peer=p, batch_size=b) for p in peers}
            best_peer = _best([e for p, e in got.items() if e is not None])
            jl = _best([e for k in JASPER_CPU for e in r.find(grid=grid, kind=k, batch_size=b)])
            ref = got.get("reference")
            rows.append([
                str(b), *[f"{f_rate(rate(got[p]))}/s" for p in peers],
                f"{PEER_NAMES[best_peer['extra_info']['peer']]}" if best_peer else "n/a",
                (f"{f_rate(rate(jl))}/s ({_jasper_label(jl['extra_info'])}, "
                 f"{jl['extra_info']['backend']})") if jl else "n/a",
                f_ratio(rate(jl) / rate(best_peer)) if jl and best_peer else "n/a",
                f_ratio(rate(jl) / rate(ref)) if jl and ref else "n/a",
            ])
        parts.append(f"**{label}**\n\n" + table(
            ["batch", *[PEER_NAMES[p] for p in peers], "best peer", "jasper (best CPU path)",
             "jasper / best peer", "jasper / reference"], rows))
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
    charts = write_charts(r, run_dir)
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
        "## Issue 3's targets\n", _headline(r),
        "## 1. Open and preload\n",
        "Seconds and MB/s of data bytes; the ceiling is a raw read of the same files into "
        "one preallocated buffer. Cold rounds drop the files' pages first (posix_fadvise "
        "DONTNEED); \"cached before\" is the fraction still in the page cache (mincore).\n",
        _q1(r),
        "## 2. Memory\n", _q2(r),
        "## 3. Serving\n",
        "samples/s and GB/s of finished batches; \"of its ceiling\" divides by the "
        "raw gather (CPU paths) or the on-device index_select loop (GPU loader) at the same batch "
        "size; first batch = from `iter()` on a fresh loader (workers start-up included); "
        "p50/p99 = gap between consecutive batches.\n",
        _q3(r),
        "## 4. Ceilings\n", _q4(r),
        "## 5. Peers (same data, same index stream)\n", _q5(r),
        "## 6. Size on disk\n", _q6(r),
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
def write_charts(r: Results, run_dir: Path) -> list[Path]:
    """One PNG per question that has data; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    for name, draw in (("serving", _chart_serving), ("open_preload", _chart_open),
                       ("memory", _chart_memory), ("size_on_disk", _chart_size)):
        fig = draw(r, plt)
        if fig is None:
            continue
        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def _contender(i: dict[str, Any]) -> str:
    k = i["kind"]
    if k in (*JASPER_CPU, "gpu_loader"):
        return f"{_jasper_label(i)} [{i['backend']}]"
    return i.get("contender") or k


def _chart_serving(r: Results, plt: Any) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    kinds = ("cpu_raw_gather", *JASPER_CPU, "peer", "gpu_index_select", "gpu_loader")
    entries = [e for e in r.entries if e["extra_info"]["grid"] == grid
               and e["extra_info"]["kind"] in kinds]
    if not entries:
        return None
    sizes = sorted({e["extra_info"]["batch_size"] for e in entries})
    labels = sorted({_contender(e["extra_info"]) for e in entries},
                    key=lambda s: (not s.startswith("raw"), not s.startswith("on-device"),
                                   not s.startswith("jasper"), s))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 0.38 * len(labels) + 1.6),
                             sharey=True, squeeze=False)
    for ax, b in zip(axes[0], sizes):
        vals = []
        for lab in labels:
            e = next((e for e in entries if e["extra_info"]["batch_size"] == b
                      and _contender(e["extra_info"]) == lab), None)
            vals.append(rate(e) if e else 0.0)
        colors = ["#555555" if "ceiling" in lab else "#1f77b4" if lab.startswith("jasper")
                  else "#ff7f0e" for lab in labels]
        ax.barh(range(len(labels)), vals, color=colors)
        ax.set_xscale("log")
        ax.set_title(f"batch {b}")
        ax.set_xlabel("samples/s (log)")
        for y, v in enumerate(vals):
            if v > 0:
                ax.text(v, y, f" {f_rate(v)}", va="center", fontsize=7)
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"Serving throughput ({r.grids()[0][1]}): grey = ceilings, blue = jasper, "
                 "orange = peers")
    return fig


def _chart_open(r: Results, plt: Any) -> Any:
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
    for ax, temp in zip(axes, ("cold", "warm")):
        for s, (name, _kind, get) in enumerate(series):
            vals = []
            for backend, preset in keys:
                e = get(grid=grid, backend=backend, preset=preset, temp=temp)
                vals.append(e["extra_info"]["data_bytes"] / secs(e) / MB if e else 0.0)
            ax.barh([y + s * width for y in range(len(keys))], vals, height=width, label=name)
        ax.set_title(f"{temp} page cache")
        ax.set_xlabel("MB/s of data (higher is better)")
    axes[0].set_yticks([y + width for y in range(len(keys))], [f"{b} {p}" for b, p in keys])
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Open + preload speed ({r.grids()[0][1]})")
    return fig


def _chart_memory(r: Results, plt: Any) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    mem = sorted(r.find(grid=grid, kind="memory"),
                 key=lambda e: (e["extra_info"]["backend"], bool(e["extra_info"]["mapped"])))
    if not mem:
        return None
    workers = list(dict.fromkeys(w for e in mem for w in _pss(e["extra_info"])))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(mem) * len(workers) + 1.5))
    width = 0.8 / len(workers)
    for s, w in enumerate(workers):
        vals = [_pss(e["extra_info"]).get(w, 0.0) / MB for e in mem]
        ax.barh([y + s * width for y in range(len(mem))], vals, height=width,
                label="no workers" if w == "0" else f"{w.split()[0]} worker {w.split()[1]}")
    ax.axvline(mem[0]["extra_info"]["data_bytes"] / MB, color="black", linestyle="--",
               label="data bytes")
    ax.set_yticks([y + width / 2 for y in range(len(mem))],
                  [f"{e['extra_info']['backend']} ({'mmap' if e['extra_info']['mapped'] else 'preload'})"
                   for e in mem])
    ax.invert_yaxis()
    ax.set_xlabel("summed PSS of main process + workers after one epoch, MB")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory with DataLoader workers ({r.grids()[0][1]})")
    return fig


def _chart_size(r: Results, plt: Any) -> Any:
    grid = r.grids()[0][0] if r.grids() else None
    sizes = r.find(grid=grid, kind="size")
    if not sizes:
        return None
    labels = [f"{e['extra_info']['backend']} {e['extra_info']['preset']}" for e in sizes]
    vals = [e["extra_info"]["size_bytes"] / MB for e in sizes]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(sizes) + 1.5))
    ax.barh(range(len(sizes)), vals, color="#2ca02c")
    ax.axvline(sizes[0]["extra_info"]["data_bytes"] / MB, color="black", linestyle="--",
               label="data bytes")
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    ax.set_yticks(range(len(sizes)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("MB on disk")
    ax.legend(fontsize=8)
    ax.set_title(f"Size on disk ({r.grids()[0][1]})")
    return fig
