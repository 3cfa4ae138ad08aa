"""Dataset-level conformance: both dataset kinds open on a backend, serve batches equal to a
reference computed from the arrays that went in, and survive forked and spawned DataLoader
workers. :class:`~jasper.testing.conformance.BackendConformance` includes these tests; they use
its hooks (``write_dataset``, ``caps``, ``require_write``, ``write``).
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from jasper import records
from jasper.backend import BackendEntrypoint
from jasper.manifest import Manifest
from jasper.schema import CLUSTER_ARRAYS, CLUSTER_LABEL_TYPES, CLUSTER_RECORDS, SAMPLE_TYPES
from jasper.testing.hooks import KitHooks


@dataclass
class KitClusterDataset:
    """A cluster-labeled dataset the kit wrote: where (a directory, or a URL for a remote
    store), its arrays and its metadata columns."""

    path: Path | str
    arrays: dict[str, torch.Tensor]
    meta: dict[str, list[Any]]


def make_cluster(n_samples: int = 40, n_rows: int = 30, dim: int = 8, n_clusters: int = 5,
                 seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, list[Any]], Manifest]:
    """A small cluster-labeled dataset in memory: every array of the kind (records encoded),
    the metadata columns as Python values, and its manifest. Embedding rows are shared by
    several samples and visited out of order; texts hold non-ASCII, chroma ids and suggestions
    hold ``None``."""
    from jasper.cluster_kind import cluster_arrays, cluster_manifest

    g = torch.Generator().manual_seed(seed)
    labels = {t: torch.softmax(torch.randn(n_samples, n_clusters, generator=g), dim=1)
              for t in CLUSTER_LABEL_TYPES}
    meta: dict[str, list[Any]] = {
        "sample_type": [SAMPLE_TYPES[i % 2] for i in range(n_samples)],
        "text": [f"sample {i} \u00e9t\u00e9 \u2603 " + "x" * (i % 7) for i in range(n_samples)],
        "chroma_id": [None if i % 5 == 0 else f"chroma-{i}" for i in range(n_samples)],
        "suggestions": [None if i % 3 == 0 else {"kw": [f"k{i}", i], "w": i / 8}
                        for i in range(n_samples)],
        "steering_mode": [None if i % 4 == 0 else "suggestion" for i in range(n_samples)],
    }
    sources = cluster_arrays(
        base_embeddings=torch.randn(n_rows, dim, generator=g),
        steering_embeddings=torch.randn(n_rows, dim, generator=g),
        source_labels=labels["source"], steering_labels=labels["steering"],
        combined_labels=labels["combined"],
        sample_ids=torch.arange(n_samples, dtype=torch.int64) * 3 + 7,
        embedding_idx=torch.randint(0, n_rows, (n_samples,), generator=g), **meta)
    arrays = {n: s.materialize().clone() for n, s in sources.items()}
    return arrays, meta, cluster_manifest(dim, n_clusters, {"dataset_name": "kit-cluster"})


class DatasetConformance(KitHooks):
    """The dataset-level tests of the conformance kit (mixed into ``BackendConformance``)."""

    cluster_samples: ClassVar[int] = 40

    # provided by BackendConformance
    worker_timeout: ClassVar[float]

    def write(self, backend: BackendEntrypoint, path: Path, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    @pytest.fixture
    def cluster_dataset(self, backend: BackendEntrypoint, tmp_path: Path) -> KitClusterDataset:
        """A fresh cluster-labeled dataset written with the backend under test."""
        self.require_write(backend)
        arrays, meta, manifest = make_cluster(self.cluster_samples)
        out = self.write_dataset(backend, tmp_path / "kit-cluster", arrays, manifest)
        return KitClusterDataset(Path(out), arrays, meta)

    @staticmethod
    def cluster_reference(data: KitClusterDataset, rows: list[int], label_type: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """What items ``rows`` must be, computed from the arrays that went in."""
        a = data.arrays
        idx = torch.tensor(rows, dtype=torch.int64)
        emb = a["embedding_idx"][idx]
        meta: dict[str, Any] = {"sample_id": a["sample_ids"][idx].tolist()}
        meta.update({k: [v[r] for r in rows] for k, v in data.meta.items()})
        for t in CLUSTER_LABEL_TYPES:
            meta[f"{t}_label"] = a[f"{t}_labels"][idx]
        return (a["base_embeddings"][emb], a["steering_embeddings"][emb],
                a[f"{label_type}_labels"][idx], meta)

    # === the cluster-labeled kind ===========================================================
    def test_cluster_kind_round_trips(self, backend: BackendEntrypoint,
                                      cluster_dataset: KitClusterDataset) -> None:
        """A cluster-labeled dataset (records included) reads back bit-exact and its records
        decode to what went in.

        Fix: store every array of :data:`jasper.schema.ALL_ARRAYS` by name (uint8 record bytes
        and int64 offsets are ordinary arrays); never filter names through the steering
        catalogue (``jasper.schema.ARRAYS``) alone.
        """
        import jasper
        from jasper.testing.conformance import assert_bit_equal

        with jasper.open_store(cluster_dataset.path, backend.name) as reader:
            assert reader.manifest.dataset_kind == "cluster-labeled"
            missing = [n for n in CLUSTER_ARRAYS if not reader.has(n)]
            assert not missing, f"array_names() lacks {missing}"
            for name, expected in cluster_dataset.arrays.items():
                assert_bit_equal(reader.read(name), expected, f"read({name!r})")
            rows = np.arange(self.cluster_samples)[::-1].copy()
            for name, spec in CLUSTER_RECORDS.items():
                got = records.decode(reader.read(spec.offsets_array),
                                     reader.read(spec.bytes_array), rows, spec)
                assert got == [cluster_dataset.meta[name][r] for r in rows], name
        jasper.validate(cluster_dataset.path, deep=True, backend=backend.name)

    @pytest.mark.parametrize("mmap_mode", ["r", None])
    @pytest.mark.parametrize("label_type", ["combined", "source"])
    def test_cluster_dataset_serves_the_reference(self, backend: BackendEntrypoint,
                                                  cluster_dataset: KitClusterDataset,
                                                  mmap_mode: str | None,
                                                  label_type: str) -> None:
        """``ClusterLabeledDataset`` on this backend serves items and batches (metadata
        included) equal to the reference, in any order with repeats, mapped or preloaded.

        Fix: the dataset reads only through ``StoreReader`` (``map`` when the backend maps,
        ``read_rows`` with ``row_access``, else ``read``); check those for the kind's arrays.
        """
        import jasper
        from jasper.testing.conformance import assert_bit_equal

        rows = [5, 0, 17, 5, self.cluster_samples - 1, 3]
        ref = self.cluster_reference(cluster_dataset, rows, label_type)
        with jasper.ClusterLabeledDataset(cluster_dataset.path, label_type=label_type,
                                          return_metadata=True, mmap_mode=mmap_mode,
                                          backend=backend.name, cache_size=4) as ds:
            assert len(ds) == self.cluster_samples
            base, steering, label, meta = ds.__getitems__(rows)
            assert_bit_equal(base, ref[0], "base embeddings")
            assert_bit_equal(steering, ref[1], "steering embeddings")
            assert_bit_equal(label, ref[2], f"{label_type} labels")
            for key, want in ref[3].items():
                if isinstance(want, torch.Tensor):
                    assert_bit_equal(meta[key], want, key)
                else:
                    assert meta[key] == want, key
            item = ds[17]
            assert_bit_equal(item[0], ref[0][2], "item 17 base")
            assert item[3]["text"] == cluster_dataset.meta["text"][17]
            sid = int(cluster_dataset.arrays["sample_ids"][9])
            row = ds.get_sample_by_id(sid)
            assert row is not None and row["suggestions"] == cluster_dataset.meta["suggestions"][9]
            assert ds.get_sample_by_id(-1) is None

    def test_cluster_label_updates_or_names_who_can(self, backend: BackendEntrypoint,
                                                    cluster_dataset: KitClusterDataset) -> None:
        """With ``write_rows``, ``update_labels`` changes every label type it is given at once,
        persists, and keeps deep validation passing; without it, a ``CapabilityError``.

        Fix: implement ``StoreReader.write_rows`` as one crash-safe change that keeps the
        manifest's checksums true, and ``reading_rows`` so readers never see half of one; or
        leave the capability off.
        """
        import jasper
        from jasper.errors import CapabilityError

        sid = int(cluster_dataset.arrays["sample_ids"][6])
        new = torch.linspace(0.0, 1.0, cluster_dataset.arrays["combined_labels"].shape[1])
        with jasper.ClusterLabeledDataset(cluster_dataset.path, backend=backend.name,
                                          return_metadata=True) as ds:
            if not self.caps(backend).write_rows:
                with pytest.raises(CapabilityError):
                    ds.update_labels(sid, combined_label=new)
                return
            ds.update_labels(sid, source_label=new, combined_label=new)
            meta = ds[6][3]
            assert torch.equal(meta["source_label"], new) and torch.equal(meta["combined_label"], new)
            assert torch.equal(meta["steering_label"],
                               cluster_dataset.arrays["steering_labels"][6])
        with jasper.ClusterLabeledDataset(cluster_dataset.path, backend=backend.name) as again:
            assert torch.equal(again[6][2], new)
        jasper.validate(cluster_dataset.path, deep=True, backend=backend.name)

    # === both kinds with DataLoader workers =================================================
    @pytest.mark.parametrize("context", ["fork", "spawn"])
    def test_cluster_dataset_in_workers(self, backend: BackendEntrypoint,
                                        cluster_dataset: KitClusterDataset, context: str) -> None:
        """Two forked and two spawned workers serve every item once, equal to the reference,
        and the cache statistics the main process reports include the workers' lookups.

        Fix: readers must pickle as paths and reopen lazily in the worker (``worker_safe``).
        """
        import jasper

        self._require_workers(backend, context)
        ds = jasper.ClusterLabeledDataset(cluster_dataset.path, backend=backend.name,
                                          return_metadata=True)
        loader = ds.loader(batch_size=8, num_workers=2, multiprocessing_context=context,
                           timeout=self.worker_timeout)
        seen: list[int] = []
        for base, steering, label, meta in loader:
            first = len(seen)
            rows = list(range(first, first + base.shape[0]))
            ref = self.cluster_reference(cluster_dataset, rows, "combined")
            assert torch.equal(base, ref[0]) and torch.equal(steering, ref[1])
            assert torch.equal(label, ref[2]) and meta["text"] == ref[3]["text"]
            seen.extend(rows)
        assert seen == list(range(self.cluster_samples))
        stats = ds.get_cache_stats()
        assert stats["cache_misses"] == self.cluster_samples and stats["processes"] == 2, stats
        ds.close()

    @pytest.mark.parametrize("context", ["fork", "spawn"])
    def test_steering_dataset_in_workers(self, backend: BackendEntrypoint, tmp_path: Path,
                                         context: str) -> None:
        """``JASPERSteeringDataset`` on this backend serves, in two forked and two spawned
        workers, batches equal to the reference computed from the arrays that went in.

        Fix: as for the cluster kind: pickle as paths, reopen lazily per process.
        """
        from torch.utils.data import DataLoader

        import jasper

        self._require_workers(backend, context)
        self.require_write(backend)
        kit = self.write(backend, tmp_path / "kit-steering", special_values=False)
        a = kit.arrays
        ds = jasper.JASPERSteeringDataset(kit.path, "train", storage_format=backend.name)
        ds.force_steering("residual")
        split = a["train_idx"]
        loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context,
                            timeout=self.worker_timeout)
        start = 0
        for batch in loader:
            pairs = split[start : start + batch["question_emb"].shape[0]]
            start += len(pairs)
            q, s = a["pair_index"][pairs, 0], a["pair_index"][pairs, 1]
            assert torch.equal(batch["question_emb"], a["question_embs"][q])
            assert torch.equal(batch["target_source_emb"], a["source_embs"][s])
            assert torch.equal(batch["steering"], a["steering_residual"][pairs])
            assert torch.equal(batch["negative_embs"], a["source_embs"][a["hard_negatives"][pairs]])
        assert start == len(split) > 0
        ds.close()

    def _require_workers(self, backend: BackendEntrypoint, context: str) -> None:
        if not self.caps(backend).worker_safe:
            pytest.skip("the backend does not claim worker_safe")
        if context not in multiprocessing.get_all_start_methods():
            pytest.skip(f"start method {context!r} is not available here")


__all__ = ["DatasetConformance", "KitClusterDataset", "make_cluster"]
