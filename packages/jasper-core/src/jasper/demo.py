"""``jasper demo``: the main job, end to end, on a fresh machine.

Synthesise a realistic dataset (:mod:`jasper.synth`), write it with every installed backend, open
each one, and train a small JASPER-style predictor for a few epochs through the curriculum: an MLP
predicts the source embedding from the question and the steering vector, trained with an
InfoNCE-style loss over the target and the hard negatives in which harder negative tiers weigh
more. For each backend it prints the time to open, two throughputs that answer different
questions -- **training** samples/s (bound by the model's forward and backward passes) and
**serving** samples/s (the loader alone, what the benchmark suite measures) -- the memory of
jasper's own tensors (not torch's or the model's), the steering mix and the loss of every epoch
(which goes down, and is identical across backends because they serve bit-identical batches).

With no arguments it runs in well under two minutes on two CPU cores; when CUDA is present the
batches come from the GPU-resident loader (:class:`jasper.gpu_loader.GPULoader`).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from jasper.curriculum import VARIANT_NAMES

#: Weight of a hard negative in the loss by tier (1 = hardest, the four-tier scheme).
TIER_WEIGHTS = (1.0, 2.0, 1.5, 1.0, 0.5)  # index = tier; tier 0 (unlabelled) weighs 1


@dataclass
class BackendRun:
    """What the demo measured for one backend."""

    backend: str
    write_seconds: float
    disk_bytes: int
    open_seconds: float
    samples_per_second: float  #: training throughput (model-bound)
    dataset_memory_bytes: int  #: bytes of jasper's tensors in RAM/device memory (maps: 0)
    losses: list[float]
    variant_mix: list[list[float]]
    error: str | None = None
    serving_samples_per_second: float = 0.0  #: the loader alone, no model
    mode: str = ""  #: how the dataset holds its arrays (preload, mmap, rows)

    @property
    def loss_went_down(self) -> bool:
        return len(self.losses) >= 2 and self.losses[-1] < self.losses[0]


@dataclass
class DemoReport:
    """The demo's results, one :class:`BackendRun` per backend."""

    n_pairs: int
    embedding_dim: int
    n_neg: int
    epochs: int
    batch_size: int
    device: str
    loader: str
    runs: list[BackendRun] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.error is None and r.loss_went_down for r in self.runs)

    @property
    def losses_identical(self) -> bool:
        """Whether every backend's run produced the same loss curve, bit for bit."""
        done = [r for r in self.runs if r.error is None]
        return len(done) > 1 and len({tuple(r.losses) for r in done}) == 1

    def __str__(self) -> str:
        mib = 1024 * 1024
        lines = [
            f"jasper demo: {self.n_pairs} pairs, D={self.embedding_dim}, n_neg={self.n_neg}, "
            f"{self.epochs} epochs of batch {self.batch_size} on {self.device} ({self.loader})",
            "",
            f"{'backend':<16}{'write s':>9}{'disk MiB':>10}{'open s':>9}"
            f"{'train samples/s':>17}{'serve samples/s':>17}{'jasper MiB':>12}  loss per epoch",
        ]
        for r in self.runs:
            if r.error is not None:
                lines.append(f"{r.backend:<16}FAILED: {r.error}")
                continue
            losses = " -> ".join(f"{x:.3f}" for x in r.losses)
            memory = f"{r.dataset_memory_bytes / mib:.1f}" if r.mode != "mmap" else "mapped"
            lines.append(
                f"{r.backend:<16}{r.write_seconds:>9.2f}{r.disk_bytes / mib:>10.1f}"
                f"{r.open_seconds:>9.3f}{r.samples_per_second:>17,.0f}"
                f"{r.serving_samples_per_second:>17,.0f}{memory:>12}  {losses}"
                + ("" if r.loss_went_down else "  (did not go down)"))
        if self.runs and self.runs[0].variant_mix:
            lines.append("")
            lines.append("steering mix per epoch (" + " / ".join(VARIANT_NAMES) + "): " + "; ".join(
                "/".join(f"{p:.2f}" for p in mix) for mix in self.runs[0].variant_mix))
        lines += [
            "",
            "train samples/s: the whole training step (the model dominates); serve samples/s: "
            "the loader alone, at this batch size",
            "jasper MiB: the dataset's own tensors (not torch, the model or the demo's arrays)",
        ]
        if self.losses_identical:
            lines.append("the losses are identical across backends because every backend serves "
                         "bit-identical batches: same arrays, and order and steering drawn from "
                         "(seed, epoch) alone")
        elif len([r for r in self.runs if r.error is None]) > 1:
            lines.append("the losses DIFFER across backends although they should serve identical "
                         "batches: please report this with the table above")
        lines.append(f"total {self.seconds:.1f} s")
        lines.append(
            "next: keep the datasets with --out DIR and train from one: "
            "create_loader('DIR/pt', 'train', batch_size=256) (README, 'As a user'); or point "
            "create_loader at the original system's output directory as it is")
        return "\n".join(lines)


class JasperPredictor(nn.Module):
    """A small JASPER-style predictor: (question, steering) -> predicted source embedding."""

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, dim))
        self.skip = nn.Linear(dim, dim, bias=False)

    def forward(self, question: torch.Tensor, steering: torch.Tensor) -> torch.Tensor:
        return self.skip(question) + self.net(torch.cat([question, steering], dim=-1))


def info_nce_loss(pred: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor,
                  tiers: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE over [target, negatives] by cosine similarity; a negative's logit is shifted by
    the log of its tier weight, so harder tiers count more (a weighted partition function)."""
    p = nn.functional.normalize(pred, dim=-1)
    cands = torch.cat([target.unsqueeze(1), negatives], dim=1)
    c = nn.functional.normalize(cands, dim=-1)
    logits = torch.einsum("bd,bkd->bk", p, c) / temperature
    weights = torch.tensor(TIER_WEIGHTS, device=tiers.device)[tiers.clamp(0, len(TIER_WEIGHTS) - 1)]
    logits = torch.cat([logits[:, :1], logits[:, 1:] + weights.log()], dim=1)
    labels = torch.zeros(pred.shape[0], dtype=torch.int64, device=pred.device)
    return nn.functional.cross_entropy(logits, labels)


def run_demo(
    out_dir: str | Path | None = None,
    *,
    n_pairs: int = 20_000,
    epochs: int = 3,
    embedding_dim: int = 128,
    n_neg: int = 8,
    batch_size: int = 256,
    backends: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> DemoReport:
    """Run the demo and return its :class:`DemoReport` (``str(report)`` is the printed table).

    ``out_dir`` keeps the datasets (one sub-directory per backend); by default they go to a
    temporary directory that is removed afterwards. ``backends`` defaults to every installed
    backend that can write. ``device`` defaults to CUDA when available. The curriculum epoch
    advances in steps so that a few training epochs walk through the whole step table.
    """
    from jasper.loader import create_loader, set_epoch
    from jasper.registry import get_backend, list_backends
    from jasper.store import dir_size, write_store
    from jasper.synth import SynthConfig, synthesize

    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    names = list(backends) if backends is not None else [
        n for n in list_backends() if get_backend(n).capabilities.write]
    cfg = SynthConfig(n_pairs=n_pairs, embedding_dim=embedding_dim, n_neg=n_neg,
                      n_clusters=max(4, min(64, n_pairs // 500)), seed=seed)
    root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="jasper-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    report = DemoReport(n_pairs, embedding_dim, n_neg, epochs, batch_size, str(dev),
                        "GPULoader" if dev.type != "cpu" else "DataLoader + __getitems__")
    stride = max(1, math.ceil(40 / max(1, epochs - 1)))  # reach the last step of the table
    try:
        say(f"synthesising {n_pairs} pairs (D={embedding_dim}, n_neg={n_neg})")
        scratch = root / ".synth-scratch"
        arrays, manifest = synthesize(cfg, workdir=scratch, progress=progress)
        _warm_up(dev, embedding_dim, n_neg, batch_size)
        for name in names:
            say(f"[{name}] writing")
            target = root / name
            try:
                t0 = time.perf_counter()
                write_store(target, arrays, manifest, backend=name, overwrite=True,
                            progress=progress)
                write_s = time.perf_counter() - t0
                run = _train(target, name, write_s, dir_size(target), dev, epochs, batch_size,
                             stride, seed, create_loader, set_epoch, say)
            except Exception as exc:  # one broken backend must not hide the others' results
                run = BackendRun(name, 0.0, 0, 0.0, 0.0, 0, [], [],
                                 error=f"{type(exc).__name__}: {exc}")
            report.runs.append(run)
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if out_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.perf_counter() - t_start
    return report


def _warm_up(dev: torch.device, dim: int, n_neg: int, batch_size: int) -> None:
    """A few throwaway steps, so that one-time costs (kernel selection, allocator growth,
    lazy imports) are not charged to whichever backend happens to run first."""
    import jasper.dataset
    import jasper.loader  # noqa: F401

    model = JasperPredictor(dim).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        q = torch.randn(batch_size, dim, device=dev)
        negs = torch.randn(batch_size, n_neg, dim, device=dev)
        tiers = torch.randint(1, 5, (batch_size, n_neg), device=dev)
        loss = info_nce_loss(model(q, q), q, negs, tiers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.bincount(tiers.reshape(-1), minlength=4)


def _train(path: Path, name: str, write_s: float, disk: int, dev: torch.device, epochs: int,
           batch_size: int, stride: int, seed: int, create_loader: Callable[..., object],
           set_epoch: Callable[[object, int], None], say: Callable[[str], None]) -> BackendRun:
    on_cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    loader = create_loader(path, "train", batch_size=batch_size, device=dev, seed=seed,
                           storage_format=name)
    open_s = time.perf_counter() - t0
    ds = loader.dataset_obj  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    model = JasperPredictor(ds.embedding_dim).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses: list[float] = []
    mixes: list[list[float]] = []
    samples = 0
    train_s = 0.0
    for epoch in range(epochs):
        set_epoch(loader, epoch * stride)
        total = torch.zeros((), device=dev)
        counts = torch.zeros(4, dtype=torch.int64, device=dev)
        steps = 0
        t1 = time.perf_counter()
        for batch in loader:  # type: ignore[attr-defined]
            pred = model(batch["question_emb"].to(dev, torch.float32),
                         batch["steering"].to(dev, torch.float32))
            loss = info_nce_loss(pred, batch["target_source_emb"].to(dev, torch.float32),
                                 batch["negative_embs"].to(dev, torch.float32),
                                 batch["negative_tiers"].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            counts += torch.bincount(batch["steering_variant"].to(dev), minlength=4)
            samples += batch["question_emb"].shape[0]
            steps += 1
        if on_cuda:
            torch.cuda.synchronize(dev)
        train_s += time.perf_counter() - t1
        losses.append(float(total) / max(1, steps))
        mixes.append((counts.double() / max(1, int(counts.sum()))).tolist())
        say(f"[{name}] epoch {epoch} (curriculum epoch {epoch * stride}): loss {losses[-1]:.4f}")
    serve_rate = _serving_rate(loader, dev)
    memory = ds.memory_bytes()
    mode = ds.mode
    ds.close()
    return BackendRun(name, write_s, disk, open_s, samples / train_s if train_s else 0.0, memory,
                      losses, mixes, serving_samples_per_second=serve_rate, mode=mode)


def _serving_rate(loader: object, dev: torch.device) -> float:
    """Samples per second of one pass of the loader with no model: serving throughput."""
    served = 0
    t0 = time.perf_counter()
    for batch in loader:  # type: ignore[attr-defined]
        served += batch["question_emb"].shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return served / seconds if seconds > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of the demo (``jasper demo``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="jasper demo",
        description="Synthesise a dataset, write it with every installed backend, and train a "
                    "small JASPER model from each through the curriculum.")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the datasets here (default: a temporary directory)")
    parser.add_argument("--pairs", type=int, default=20_000, help="number of pairs (20000)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (3)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (128)")
    parser.add_argument("--n-neg", type=int, default=8, help="hard negatives per pair (8)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (256)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backend names (default: every installed one)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    args = parser.parse_args(argv)
    if args.pairs < 10 or args.epochs < 1:
        parser.error("--pairs must be at least 10 and --epochs at least 1")
    os.environ.setdefault("JASPER_PROGRESS", "0")
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_demo(
        args.out, n_pairs=args.pairs, epochs=args.epochs, embedding_dim=args.dim,
        n_neg=args.n_neg, batch_size=args.batch_size,
        backends=[b for b in args.backends.split(",") if b] if args.backends else None,
        device=args.device, progress=False, seed=args.seed, log=log)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["BackendRun", "DemoReport", "JasperPredictor", "info_nce_loss", "main", "run_demo"]
