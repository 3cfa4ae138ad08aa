"""What the serving benchmarks time: jasper's paths, the ceilings and the peers.

Every contender serves the same batches: item ``i`` of the train split is pair
``p = train_idx[i]``; a batch holds the question, target, steering, ``n_neg`` negatives, their
tiers, cluster id, relevance, centroid distance and variant id (docs/loading.md#what-a-batch-holds). Steering
is pinned to the ``centroid`` variant everywhere (``force_steering("centroid")`` for jasper and the
reference), so every sample moves exactly ``jasper.schema.bytes_per_sample`` bytes and no
contender profits from the zero variant's empty rows.

Peers are used the way their documentation recommends for speed, and each is labelled with the
data path it takes (``preload``: the arrays in RAM; ``mmap``: memory-mapped files; ``lazy``: rows
read from storage per batch), so the report compares like with like:

- tensordict (``mmap``): a memory-mapped ``TensorDict`` (``memmap_`` once,
  ``TensorDict.load_memmap`` after) indexed with whole batches of indices;
- Hugging Face ``datasets`` (``mmap``): saved with ``save_to_disk``, reopened memory-mapped with
  ``load_from_disk``, ``with_format("torch")`` and indexed with a list of indices per batch;
- numpy memmap (``mmap``): what users hand-write, one ``.npy`` per array opened with
  ``np.load(mmap_mode="r")`` and a ``Dataset.__getitems__`` that fancy-indexes them, through a
  ``DataLoader``;
- safetensors (``preload``): one ``.safetensors`` file, ``safetensors.torch.load_file`` (which
  maps the file and copies each tensor out: safetensors has no zero-copy tensor API), then
  tensor indexing per batch;
- Lance (``lazy``): three Lance datasets (pairs, questions, sources) written with
  ``lance.write_dataset``; a batch is a random ``take`` of its pair rows, then of its question,
  target and negative rows (sorted and de-duplicated, as Lance's own guidance for random access
  advises, and un-permuted);

- Mosaic streaming (``lazy``): an MDS dataset (``MDSWriter``, uncompressed, local shards) of
  denormalised samples, read by ``LocalDataset`` (its random-access map dataset) through a
  ``DataLoader`` with ``default_collate``. It runs in an environment of its own (its pins conflict
  with the other peers'), driven over a pipe (``benchmarks/mosaic_peer.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[torch.Tensor], Any]

#: Arrays a served batch touches (with the centroid variant).
SERVED_ARRAYS: tuple[str, ...] = (
    "question_embs", "source_embs", "pair_index", "hard_negatives", "negative_tiers",
    "pair_cluster_id", "pair_relevance", "centroid_distances", "steering_centroid", "train_idx",
)
STEERING = "centroid"
STEERING_ARRAY = "steering_centroid"


class Unavailable(Exception):
    """A contender cannot run here (module missing, no CUDA...); the message says why."""


def optional_import(module: str, why: str) -> Any:
    """Import ``module`` or raise :class:`Unavailable` naming it and what it is for."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"{module} is not importable ({exc}); {why}") from None


# --- the index stream -------------------------------------------------------------------------
def index_stream(n_items: int, batch_size: int, n_batches: int, seed: int = 0) -> torch.Tensor:
    """``[n_batches, batch_size]`` item indices: shuffled epochs of ``range(n_items)`` laid end to
    end (the order a shuffling sampler produces). Every contender gets exactly this stream."""
    g = torch.Generator().manual_seed(seed)
    need = n_batches * batch_size
    parts, have = [], 0
    while have < need:
        parts.append(torch.randperm(n_items, generator=g))
        have += n_items
    return torch.cat(parts)[:need].view(n_batches, batch_size)


# --- preloaded arrays (ceilings and peers read the same bytes) -------------------------------
def load_arrays(path: Path, names: tuple[str, ...] = SERVED_ARRAYS) -> dict[str, torch.Tensor]:
    """The arrays a batch touches, preloaded into RAM through jasper's store API, on huge pages
    where jasper's datasets put theirs (``jasper.allocator.huge_empty``): the ceiling and the
    peers gather from memory as good as jasper's own."""
    from jasper.store import open_store

    try:
        from jasper.allocator import huge_empty
    except ImportError:  # a revision before huge pages (compare_revisions)
        def huge_empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(tuple(shape), dtype=dtype)

    with open_store(path) as reader:
        out = {}
        for n in names:
            info = reader.info(n)
            out[n] = reader.read_into(n, huge_empty(info.shape, info.dtype))
        return out


# --- ceiling: raw gather into one preallocated buffer ----------------------------------------
class RawGather:
    """The ceiling of any batched loader: ``index_select`` of every field of a batch straight into
    views of one preallocated buffer (no allocation, no Python per sample). On a CUDA device this
    is the "bare on-device index_select loop" of issue 3."""

    def __init__(self, arrays: Mapping[str, torch.Tensor], batch_size: int,
                 device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        self.t = {n: arrays[n].to(dev) for n in SERVED_ARRAYS}
        b = batch_size
        d = self.t["question_embs"].shape[1]
        k = self.t["hard_negatives"].shape[1]
        fdt = self.t["question_embs"].dtype
        layout: list[tuple[str, tuple[int, ...], torch.dtype]] = [
            ("question_emb", (b, d), fdt),
            ("target_source_emb", (b, d), fdt),
            ("steering", (b, d), fdt),
            ("negative_embs", (b, k, d), fdt),
            ("negative_tiers", (b, k), torch.int64),
            ("cluster_id", (b,), torch.int64),
            ("steering_variant", (b,), torch.int64),
            ("relevance", (b,), torch.float32),
            ("centroid_distance", (b,), torch.float32),
        ]
        sizes = [int(np.prod(s)) * dt.itemsize for _, s, dt in layout]
        offsets = np.concatenate([[0], np.cumsum([(x + 63) // 64 * 64 for x in sizes])])
        self.buffer = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=dev)
        self.out: Batch = {
            name: self.buffer[int(o) : int(o) + n].view(dt).view(shape)
            for (name, shape, dt), o, n in zip(layout, offsets, sizes)
        }
        self.out["steering_variant"].fill_(1)
        self.batch_bytes = sum(sizes)
        self.device = dev

    def __call__(self, items: torch.Tensor) -> Batch:
        t, o = self.t, self.out
        p = t["train_idx"].index_select(0, items)
        qs = t["pair_index"].index_select(0, p)
        torch.index_select(t["question_embs"], 0, qs[:, 0], out=o["question_emb"])
        torch.index_select(t["source_embs"], 0, qs[:, 1], out=o["target_source_emb"])
        torch.index_select(t[STEERING_ARRAY], 0, p, out=o["steering"])
        neg = t["hard_negatives"].index_select(0, p).view(-1)
        d = o["negative_embs"].shape[-1]
        torch.index_select(t["source_embs"], 0, neg, out=o["negative_embs"].view(-1, d))
        _select_into(t["negative_tiers"], p, o["negative_tiers"])
        _select_into(t["pair_cluster_id"], p, o["cluster_id"])
        _select_into(t["pair_relevance"], p, o["relevance"])
        _select_into(t["centroid_distances"], p, o["centroid_distance"])
        return o


def _select_into(src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
    if src.dtype == out.dtype:
        torch.index_select(src, 0, rows, out=out)
    else:  # int8 tiers on disk, int64 in the batch
        out.copy_(src.index_select(0, rows))


# --- jasper ------------------------------------------------------------------------------------
def jasper_dataset(path: Path, *, use_mmap: bool, device: str | None = None) -> Any:
    """``JASPERSteeringDataset`` on the train split, steering pinned to the centroid variant."""
    mod = optional_import("jasper.dataset", "jasper's dataset module has not landed yet")
    kwargs: dict[str, Any] = {"use_mmap": use_mmap}
    if device is not None:
        kwargs["device"] = device
    ds = mod.JASPERSteeringDataset(str(path), "train", **kwargs)
    ds.force_steering(STEERING)
    return ds


def _identity(batch: Any) -> Any:
    return batch


def dataloader(dataset: Any, stream: torch.Tensor, workers: int, *,
               collate: Callable[[Any], Any] | None = _identity,
               worker_type: str = "process", jasper_loader: bool = False
               ) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` that serves exactly ``stream`` (one batch per row).

    With ``collate=_identity`` and a dataset with ``__getitems__`` (jasper's), each batch is one
    ``__getitems__`` call; with ``collate=None`` the DataLoader's ``default_collate`` stacks
    per-item dicts (what the original system did). ``worker_type="process"``: forked, persistent
    workers (timed rounds see steady-state serving, the warm-up round pays the fork);
    ``"thread"``: jasper's ``ThreadedLoader``, which ``create_loader`` uses for datasets held in
    memory or mapped. ``jasper_loader=True``: no workers and worker processes run in jasper's
    ``JasperLoader`` too (what ``create_loader`` returns), e.g. to compare memory between
    epochs loader against loader.
    """
    from torch.utils.data import DataLoader

    kwargs: dict[str, Any] = {}
    cls: Any = DataLoader
    if collate is not None:
        kwargs["collate_fn"] = collate
    if workers > 0 and worker_type == "thread":
        # what create_loader gives datasets held in memory or mapped: threads in this process
        cls = optional_import("jasper.loader", "jasper's loader module is missing").__dict__.get(
            "ThreadedLoader")
        if cls is None:
            raise Unavailable("jasper.loader has no ThreadedLoader (thread workers)")
        kwargs["prefetch"] = 2 * workers
    elif workers > 0:
        kwargs.update(persistent_workers=True, multiprocessing_context="fork")
    if jasper_loader and cls is DataLoader:
        cls = optional_import("jasper.loader", "jasper's loader module is missing").JasperLoader
    return cls(dataset, batch_size=stream.shape[1], sampler=stream.reshape(-1).tolist(),
               drop_last=True, num_workers=workers, pin_memory=False, **kwargs)


# --- peers -------------------------------------------------------------------------------------
def reference_dataset(path: Path) -> Any:
    """The per-item reference (what the original system did), steering pinned to centroid."""
    mod = optional_import("jasper.testing.reference",
                          "the per-item reference dataset has not landed yet")
    return mod.ReferenceSteeringDataset(str(path), "train", forced=STEERING)


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a peer's on-disk copy into a temporary directory and rename it into place, so that
    an interrupted build is never mistaken for a complete one."""
    if (target / ".complete").is_file():
        return target
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text(json.dumps({"ok": True}))
    tmp.rename(target)
    return target


class TensorDictPeer:
    """tensordict's memory-mapped TensorDict: pair arrays in one TensorDict with batch size
    ``[N_p]``, tables in their own; a batch is one indexing of the pair TensorDict with the batch's
    pair ids, then one indexing of each table."""

    name = "tensordict memmap"
    path = "mmap"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        td_mod = optional_import("tensordict", "install it to compare with tensordict")
        TensorDict = td_mod.TensorDict

        def build(tmp: Path) -> None:
            n_p = arrays["pair_index"].shape[0]
            td = TensorDict({
                "pairs": TensorDict({
                    n: arrays[n] for n in ("pair_index", "hard_negatives", "negative_tiers",
                                           "pair_cluster_id", "pair_relevance",
                                           "centroid_distances", STEERING_ARRAY)
                }, batch_size=[n_p]),
                "questions": TensorDict({"emb": arrays["question_embs"]},
                                        batch_size=[arrays["question_embs"].shape[0]]),
                "sources": TensorDict({"emb": arrays["source_embs"]},
                                      batch_size=[arrays["source_embs"].shape[0]]),
            }, batch_size=[])
            td.memmap_(str(tmp / "td"))

        root = _atomic_build(cache, build)
        self.td = TensorDict.load_memmap(str(root / "td"))
        self.pairs = self.td["pairs"]
        self.questions = self.td["questions", "emb"]
        self.sources = self.td["sources", "emb"]
        self.train_idx = arrays["train_idx"]

    def __call__(self, items: torch.Tensor) -> Batch:
        p = self.train_idx[items]
        rows = self.pairs[p]
        qs = rows["pair_index"]
        neg = rows["hard_negatives"]
        return {
            "question_emb": self.questions[qs[:, 0]],
            "target_source_emb": self.sources[qs[:, 1]],
            "steering": rows[STEERING_ARRAY],
            "negative_embs": self.sources[neg.reshape(-1)].view(*neg.shape, -1),
            "negative_tiers": rows["negative_tiers"].long(),
            "cluster_id": rows["pair_cluster_id"],
            "relevance": rows["pair_relevance"],
            "centroid_distance": rows["centroid_distances"],
            "steering_variant": torch.ones(p.shape[0], dtype=torch.int64),
        }


class HFDatasetsPeer:
    """Hugging Face ``datasets``: a pairs table and the two embedding tables as Arrow datasets
    (fixed-size list columns), reopened memory-mapped with ``with_format("torch")``; a batch is
    one list-indexing of the pairs table and one of each embedding table. bfloat16, which Arrow
    lacks, is stored as its 16-bit pattern and viewed back."""

    name = "HF datasets"
    path = "mmap"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        ds_mod = optional_import("datasets", "install it to compare with Hugging Face datasets")
        pa = optional_import("pyarrow", "Hugging Face datasets needs it")
        ds_mod.disable_progress_bars()
        self.bf16 = arrays["question_embs"].dtype == torch.bfloat16

        def column(t: torch.Tensor) -> Any:
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            a = t.contiguous().numpy()
            flat = pa.array(a.reshape(-1))
            return flat if a.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, a.shape[1])

        def save(table: dict[str, torch.Tensor], where: Path) -> None:
            pt = pa.table({k: column(v) for k, v in table.items()})
            ds_mod.Dataset(ds_mod.table.InMemoryTable(pt)).save_to_disk(str(where))

        def build(tmp: Path) -> None:
            save({n: arrays[n] for n in ("pair_index", "hard_negatives", "negative_tiers",
                                          "pair_cluster_id", "pair_relevance",
                                          "centroid_distances", STEERING_ARRAY)}, tmp / "pairs")
            save({"emb": arrays["question_embs"]}, tmp / "questions")
            save({"emb": arrays["source_embs"]}, tmp / "sources")

        root = _atomic_build(cache, build)
        load = ds_mod.load_from_disk
        self.pairs = load(str(root / "pairs")).with_format("torch")
        self.questions = load(str(root / "questions")).with_format("torch")
        self.sources = load(str(root / "sources")).with_format("torch")
        self.train_idx = arrays["train_idx"]

    def _emb(self, t: torch.Tensor) -> torch.Tensor:
        # the torch formatter widens integer columns to int64: narrow back, then reinterpret
        return t.to(torch.int16).view(torch.bfloat16) if self.bf16 else t

    def __call__(self, items: torch.Tensor) -> Batch:
        p = self.train_idx[items].tolist()
        rows = self.pairs[p]
        qs = rows["pair_index"]
        neg = rows["hard_negatives"]
        q = self.questions[qs[:, 0].tolist()]["emb"]
        s = self.sources[qs[:, 1].tolist()]["emb"]
        n = self.sources[neg.reshape(-1).tolist()]["emb"]
        return {
            "question_emb": self._emb(q),
            "target_source_emb": self._emb(s),
            "steering": self._emb(rows[STEERING_ARRAY]),
            "negative_embs": self._emb(n).view(*neg.shape, -1),
            "negative_tiers": rows["negative_tiers"].long(),
            "cluster_id": rows["pair_cluster_id"],
            "relevance": rows["pair_relevance"],
            "centroid_distance": rows["centroid_distances"],
            "steering_variant": torch.ones(len(p), dtype=torch.int64),
        }


_PAIR_FIELDS = ("pair_index", "hard_negatives", "negative_tiers", "pair_cluster_id",
                "pair_relevance", "centroid_distances", STEERING_ARRAY)


def _batch_from(p: torch.Tensor, rows: Mapping[str, torch.Tensor], q: torch.Tensor,
                s: torch.Tensor, n: torch.Tensor) -> Batch:
    """A batch dict from a peer's gathered pair fields and embedding rows."""
    neg = rows["hard_negatives"]
    return {
        "question_emb": q,
        "target_source_emb": s,
        "steering": rows[STEERING_ARRAY],
        "negative_embs": n.reshape(*neg.shape, -1),
        "negative_tiers": rows["negative_tiers"].long(),
        "cluster_id": rows["pair_cluster_id"],
        "relevance": rows["pair_relevance"],
        "centroid_distance": rows["centroid_distances"],
        "steering_variant": torch.ones(p.shape[0], dtype=torch.int64),
    }


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as numpy (bfloat16 as its 16-bit pattern)."""
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _torch(a: np.ndarray, bf16: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if bf16 and t.dtype == torch.int16 else t


class NumpyMemmapDataset(torch.utils.data.Dataset):
    """The hand-written peer: one ``.npy`` per served array opened with ``np.load(mmap_mode="r")``,
    and a ``__getitems__`` that fancy-indexes the maps (numpy copies the rows out) for a whole
    batch. Served through a ``DataLoader`` like jasper's dataset."""

    name = "numpy memmap + __getitems__"
    path = "mmap"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        names = (*_PAIR_FIELDS, "question_embs", "source_embs", "train_idx")

        def build(tmp: Path) -> None:
            for n in names:
                np.save(tmp / f"{n}.npy", _numpy(arrays[n]))

        root = _atomic_build(cache, build)
        self.bf16 = arrays["question_embs"].dtype == torch.bfloat16
        self.m = {n: np.load(root / f"{n}.npy", mmap_mode="r") for n in names}

    def __len__(self) -> int:
        return int(self.m["train_idx"].shape[0])

    def __getitems__(self, items: list[int]) -> Batch:
        m = self.m
        p = m["train_idx"][np.asarray(items)]
        rows = {n: _torch(m[n][p], self.bf16) for n in _PAIR_FIELDS}
        qs = rows["pair_index"].numpy()
        q = _torch(m["question_embs"][qs[:, 0]], self.bf16)
        s = _torch(m["source_embs"][qs[:, 1]], self.bf16)
        n = _torch(m["source_embs"][rows["hard_negatives"].numpy().reshape(-1)], self.bf16)
        return _batch_from(torch.from_numpy(p), rows, q, s, n)


class SafetensorsPeer:
    """safetensors: every served array in one ``.safetensors`` file, loaded with
    ``safetensors.torch.load_file`` (the file is mapped and each tensor copied out), then plain
    tensor indexing per batch, as a user of ``TensorDataset``-style code would write it."""

    name = "safetensors load_file + tensor indexing"
    path = "preload"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        st = optional_import("safetensors.torch", "install safetensors to compare with it")
        names = (*_PAIR_FIELDS, "question_embs", "source_embs", "train_idx")

        def build(tmp: Path) -> None:
            st.save_file({n: arrays[n].contiguous() for n in names}, str(tmp / "data.safetensors"))

        root = _atomic_build(cache, build)
        self.t = st.load_file(str(root / "data.safetensors"))

    def __call__(self, items: torch.Tensor) -> Batch:
        t = self.t
        p = t["train_idx"][items]
        rows = {n: t[n][p] for n in _PAIR_FIELDS}
        qs = rows["pair_index"]
        return _batch_from(p, rows, t["question_embs"][qs[:, 0]], t["source_embs"][qs[:, 1]],
                           t["source_embs"][rows["hard_negatives"].reshape(-1)])


def _sorted_take(take: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """``take`` of the sorted unique ``rows``, un-permuted back to ``rows``' order."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    return take(uniq)[inverse.reshape(-1)]


class LancePeer:
    """Lance: the pair arrays, question and source embeddings as three Lance datasets (fixed-size
    list columns); a batch is a random ``take`` of its pair rows, then of the question, target and
    negative rows, each with sorted, de-duplicated indices (un-permuted after)."""

    name = "Lance take"
    path = "lazy"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        lance = optional_import("lance", "install pylance to compare with Lance")
        pa = optional_import("pyarrow", "Lance needs it")
        self.bf16 = arrays["question_embs"].dtype == torch.bfloat16

        def column(t: torch.Tensor) -> Any:
            a = _numpy(t)
            flat = pa.array(a.reshape(-1))
            return flat if a.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, a.shape[1])

        def build(tmp: Path) -> None:
            lance.write_dataset(pa.table({n: column(arrays[n]) for n in _PAIR_FIELDS}),
                                str(tmp / "pairs.lance"))
            for table, name in (("questions", "question_embs"), ("sources", "source_embs")):
                lance.write_dataset(pa.table({"emb": column(arrays[name])}),
                                    str(tmp / f"{table}.lance"))

        root = _atomic_build(cache, build)
        self.pairs = lance.dataset(str(root / "pairs.lance"))
        self.questions = lance.dataset(str(root / "questions.lance"))
        self.sources = lance.dataset(str(root / "sources.lance"))
        self.train_idx = arrays["train_idx"]
        self.widths = {n: (arrays[n].shape[1] if arrays[n].dim() == 2 else 0) for n in _PAIR_FIELDS}

    @staticmethod
    def _values(col: Any, width: int) -> np.ndarray:
        arr = col.combine_chunks()
        if width:
            return arr.values.to_numpy(zero_copy_only=False).reshape(-1, width)
        return arr.to_numpy(zero_copy_only=False)

    def _emb(self, ds: Any, rows: np.ndarray) -> torch.Tensor:
        def take(idx: np.ndarray) -> np.ndarray:
            col = ds.take(idx, columns=["emb"]).column("emb")
            return self._values(col, col.type.list_size)

        return _torch(_sorted_take(take, rows), self.bf16)

    def __call__(self, items: torch.Tensor) -> Batch:
        p = self.train_idx[items]
        pn = p.numpy()

        def take_pairs(idx: np.ndarray) -> dict[str, np.ndarray]:
            table = self.pairs.take(idx, columns=list(_PAIR_FIELDS))
            return {n: self._values(table.column(n), self.widths[n]) for n in _PAIR_FIELDS}

        uniq, inverse = np.unique(pn, return_inverse=True)
        got = take_pairs(uniq)
        rows = {n: _torch(v[inverse.reshape(-1)], self.bf16 and n == STEERING_ARRAY)
                for n, v in got.items()}
        qs = rows["pair_index"].numpy()
        return _batch_from(p, rows, self._emb(self.questions, qs[:, 0]),
                           self._emb(self.sources, qs[:, 1]),
                           self._emb(self.sources, rows["hard_negatives"].numpy().reshape(-1)))


class MosaicPeer:
    """Mosaic streaming, run by ``benchmarks/mosaic_peer.py`` in Mosaic's own environment
    (``JASPER_BENCH_MOSAIC_PYTHON``, which ``nox -s benchmark`` builds and sets): MDS shards of
    denormalised samples (Mosaic has no join), ``LocalDataset`` random access per item and
    ``default_collate``. This process times each pass and the gaps between batches as the
    child reports them, one short line per batch over a pipe (microseconds against the
    milliseconds a batch takes)."""

    name = "Mosaic streaming LocalDataset + default_collate"
    path = "lazy"

    def __init__(self, arrays: Mapping[str, torch.Tensor], cache: Path) -> None:
        python = os.environ.get("JASPER_BENCH_MOSAIC_PYTHON")
        if not python:
            raise Unavailable("Mosaic streaming runs in an environment of its own (it pins numpy "
                              "below 2.2 and imports torchvision and transformers); `nox -s "
                              "benchmark` builds it and sets JASPER_BENCH_MOSAIC_PYTHON")
        self.bf16 = arrays["question_embs"].dtype == torch.bfloat16
        self.cache = cache
        mds = cache / "mds"
        inputs = None
        if not (mds / ".complete").is_file():
            names = (*_PAIR_FIELDS, "question_embs", "source_embs", "train_idx")

            def write_inputs(tmp: Path) -> None:
                for n in names:
                    np.save(tmp / f"{n}.npy", _numpy(arrays[n]))

            inputs = _atomic_build(cache / "inputs", write_inputs)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve().parents[1] / "mosaic_peer.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            self.built = self._ask(op="build", inputs=str(inputs or ""), mds=str(mds))
        except BaseException:
            self.close()
            raise
        if inputs is not None:  # the shards hold everything now
            shutil.rmtree(inputs, ignore_errors=True)

    def _send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the Mosaic peer's process ended (exit {self.proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"Mosaic peer: {reply['error']}")
        return reply

    def _ask(self, **cmd: Any) -> dict[str, Any]:
        self._send(**cmd)
        return self._read()

    def use_stream(self, stream: torch.Tensor) -> None:
        """Serve exactly ``stream`` (one batch per row) from now on."""
        where = self.cache / f"stream-{stream.shape[0]}x{stream.shape[1]}.npy"
        np.save(where, stream.numpy())
        try:
            self._ask(op="open", mds=str(self.cache / "mds"), stream=str(where))
        finally:  # the child holds the stream in memory now
            where.unlink()

    def first_batch(self) -> Batch:
        """The stream's first batch as the child collated it (bfloat16 viewed back)."""
        out = self.cache / "first.npz"
        self._ask(op="first", out=str(out))
        with np.load(out) as z:
            batch = {k: _torch(z[k], self.bf16) for k in z.files}
        out.unlink()
        return batch

    def passes(self) -> Iterator[None]:
        """One pass over the stream: yields as each batch is ready in the child."""
        self._send(op="pass")
        while "done" not in self._read():
            yield None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):  # it may have died already
                self._ask(op="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def iterate_direct(fn: BatchFn, stream: torch.Tensor) -> Iterator[Any]:
    """Batches of ``fn`` over ``stream`` (no DataLoader)."""
    for row in stream:
        yield fn(row)
