"""Report sections for what the suite measured after its first six questions: the serving and
derived-steering targets of the performance issue, derived against stored steering, and zarr on
local disk and on an S3-compatible server. Every ratio divides two measurements of one run."""

from __future__ import annotations

import math
from typing import Any

from benchlib.report import (
    Results,
    ceiling_rate,
    f_mb,
    f_rate,
    f_ratio,
    f_s,
    headline_batch,
    measured,
    rate,
    secs,
    table,
    target_verdict,
)

#: the performance issue's targets (reported, never asserted)
TARGET_LOADER = 0.9  # DataLoader path at B=1024 / raw gather, every backend
TARGET_DERIVED = 0.8  # derived / stored steering serving
TARGET_ZARR_PRELOAD = 0.5  # zarr preload / raw read (local) or raw concurrent GET (S3)
HEADLINE_BATCH = 1024


def later_targets(r: Results) -> str:
    """One line per target of the later issues, each "met" or "missed"."""
    rows: list[list[str]] = []
    for grid, label in r.grids():
        sizes = sorted({e["extra_info"]["batch_size"] for e in r.find(grid=grid, kind="cpu_raw_gather")})
        b = headline_batch(sizes) if sizes else HEADLINE_BATCH
        ceiling = r.one(grid=grid, kind="cpu_raw_gather", batch_size=b)
        for e in sorted(r.find(grid=grid, kind="jasper_loader", batch_size=b, workers=0),
                        key=lambda e: (e["extra_info"]["backend"], bool(e["extra_info"].get("mapped")))):
            i = e["extra_info"]
            frac = rate(e) / ceiling_rate(r, e, grid) if ceiling else math.nan
            path = "mmap" if i.get("mapped") else "preload"
            rows.append([label, f"{i['backend']} {path}: DataLoader, 0 workers, B={b}",
                         f"{f_rate(rate(e))}/s", f"{f_ratio(frac)} of raw gather "
                         f"({target_verdict(frac, TARGET_LOADER)}, target >= {TARGET_LOADER})"])
        for e in r.find(grid=grid, kind="derived_serving"):
            i = e["extra_info"]
            rows.append([label, f"{i['layout']} steering, {_variant(i['variant'])}",
                         f"{f_rate(i['derived_samples_s'])}/s",
                         f"{f_ratio(i['ratio'])} of stored ({target_verdict(i['ratio'], TARGET_DERIVED)}, "
                         f"target >= {TARGET_DERIVED})"])
        for kind, what in (("zarr_local_preload", "zarr preload, local, preset {preset}"),
                           ("s3_preload", "zarr preload from the S3 server")):
            for e in r.find(grid=grid, kind=kind):
                i = e["extra_info"]
                rows.append([label, what.format(preset=i.get("preset")),
                             f"{i['preload_mb_s']:,.0f} MB/s",
                             f"{f_ratio(i['ratio'])} of the raw "
                             f"{'read' if kind == 'zarr_local_preload' else 'concurrent GET'} "
                             f"({target_verdict(i['ratio'], TARGET_ZARR_PRELOAD)}, "
                             f"target >= {TARGET_ZARR_PRELOAD})"])
    if not rows:
        return "_no measurements (see Skipped)_\n"
    text = " ".join(row[3] for row in rows)
    met, missed = text.count("(met,"), text.count("(missed,")
    return f"{met} met, {missed} missed.\n\n" + table(["grid", "what", "absolute", "vs baseline / target"], rows)


def _variant(v: str) -> str:
    return "the curriculum's epoch-40 mix" if v == "mix" else f"{v} variant only"


def derived(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        entries = r.find(grid=grid, kind="derived_serving")
        if not entries:
            continue
        rows = []
        sizes: dict[str, tuple[float, float]] = {}
        for e in entries:
            i = e["extra_info"]
            sizes[i["layout"]] = (i["stored_pair_bytes"], i["pair_bytes"])
            rows.append([i["layout"], _variant(i["variant"]), f"{f_rate(i['stored_samples_s'])}/s",
                         f"{f_rate(i['derived_samples_s'])}/s", f_ratio(i["ratio"])])
        size_rows = [[layout, f"{stored:,.0f}", f"{mine:,.0f}", f_ratio(mine / stored)]
                     for layout, (stored, mine) in sizes.items()]
        parts.append(
            f"**{label}, preloaded, `__getitems__` at B={HEADLINE_BATCH}**\n\n"
            + table(["steering", "batches", "stored", "derived", "derived / stored"], rows)
            + "\nPair-level bytes per pair (every array but the embedding tables, from the "
              "manifests):\n\n"
            + table(["steering", "stored B/pair", "this layout B/pair", "ratio"], size_rows))
    if not parts:
        return "_no measurements (see Skipped)_\n"
    return ("The stored dataset converted with `jasper convert --derive-steering` (and, where "
            "listed, keeping the keyword variant stored); both serve the same batches bit for bit "
            "(checked before timing) and are timed in alternating rounds.\n\n" + "\n".join(parts))


def zarr(r: Results) -> str:
    parts = []
    for grid, label in r.grids():
        rows = []
        for e in r.find(grid=grid, kind="zarr_local_preload"):
            i = e["extra_info"]
            pipe = r.one(grid=grid, kind="zarr_pipeline_preload", preset=i.get("preset"))
            pipe_mb = (pipe["extra_info"]["data_bytes"] / secs(pipe) / 1e6) if pipe else math.nan
            rows.append([f"local, {i['preset']}", f_mb(i["file_bytes"]),
                         f"{i['raw_mb_s']:,.0f} MB/s", f"{i['preload_mb_s']:,.0f} MB/s",
                         f_ratio(i["ratio"]),
                         f"{pipe_mb:,.0f} MB/s" if measured(pipe_mb) else "n/a"])
        for e in r.find(grid=grid, kind="s3_preload"):
            i = e["extra_info"]
            rows.append([f"S3 server ({i.get('server')})", f_mb(i["file_bytes"]),
                         f"{i['raw_mb_s']:,.0f} MB/s (concurrent GET)",
                         f"{i['preload_mb_s']:,.0f} MB/s", f_ratio(i["ratio"]), "-"])
        if rows:
            parts.append(f"**{label}: preload (warm)**\n\n" + table(
                ["where", "file MB", "raw read", "jasper-zarr preload", "preload / raw",
                 "through zarr's codec pipeline"], rows))
        gets = [[e["extra_info"]["client"], f_s(secs(e)),
                 f"{e['extra_info']['file_bytes'] / secs(e) / 1e6:,.0f} MB/s"]
                for e in r.find(grid=grid, kind="s3_raw_get")]
        if gets:
            parts.append("**Raw concurrent GET of every object, by client layer**\n\n"
                         + table(["client", "time", "throughput"], gets))
        lazy = {e["extra_info"]["order"]: e for e in r.find(grid=grid, kind="s3_lazy_rows")}
        pre = lazy.get("preloaded")
        lazy_rows = [[order, f"{f_rate(rate(e))}/s",
                      f_ratio(rate(e) / rate(pre)) if pre else "n/a"]
                     for order, e in lazy.items()]
        for e in r.find(grid=grid, kind="s3_cache_epochs"):
            i = e["extra_info"]
            lazy_rows.append(["random, on-disk chunk cache: epoch 1 / epoch 2",
                              f"{f_rate(i['first_epoch_samples_s'])}/s / "
                              f"{f_rate(i['second_epoch_samples_s'])}/s",
                              f"epoch 2 = {f_ratio(i['speedup'])} epoch 1"])
        if lazy_rows:
            parts.append("**Lazy rows from the S3 server, B=1024 `__getitems__`**\n\n"
                         + table(["batches", "samples/s", "vs preloaded"], lazy_rows))
    return "\n".join(parts) if parts else "_no measurements (see Skipped)_\n"


def sections(r: Results) -> list[str]:
    """The sections, as markdown, in report order."""
    return ["## The performance issue's targets\n", later_targets(r),
            "## 7. Derived steering against stored\n", derived(r),
            "## 8. zarr, local and on an S3-compatible server\n", zarr(r)]



def chart_targets(r: Results, plt: Any, cfg: dict[str, Any]) -> Any:
    """Every ratio of the performance issue's targets as a bar, its target as a tick."""
    bars: list[tuple[str, float, float]] = []
    grid = r.grids()[0][0] if r.grids() else None
    for e in r.find(grid=grid, kind="derived_serving"):
        i = e["extra_info"]
        bars.append((f"{i['layout']}: {i['variant']}", i["ratio"], TARGET_DERIVED))
    for e in r.find(grid=grid, kind="zarr_local_preload"):
        bars.append((f"zarr preload, local {e['extra_info']['preset']}", e["extra_info"]["ratio"],
                     TARGET_ZARR_PRELOAD))
    for e in r.find(grid=grid, kind="s3_preload"):
        bars.append(("zarr preload, S3 server", e["extra_info"]["ratio"], TARGET_ZARR_PRELOAD))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.5))
    for y, (_, value, goal) in enumerate(bars):
        ax.barh(y, value, color="#1f77b4" if value >= goal else "#d62728")
        ax.plot([goal, goal], [y - 0.45, y + 0.45], color="black", linewidth=2)
        ax.text(value, y, f" {value:.2f}x (target {goal})", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.3)
    ax.set_xlabel("ratio to the baseline of the same run (derived / stored; preload / raw)")
    ax.set_title(f"Derived steering and zarr preload ({r.grids()[0][1]}); black: target, red: missed")
    return fig
