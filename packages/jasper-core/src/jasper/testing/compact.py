"""Conformance for compact index arrays (:mod:`jasper.index_dtypes`): a dataset whose index
arrays are int32 (and tiers int8) round-trips through the backend with those dtypes, validates,
converts without widening, and serves batches (int64 ids and tiers) bit-identical to the same
dataset stored with int64 indices, in every mode the backend offers.
:class:`~jasper.testing.conformance.BackendConformance` includes these tests; they use its
hooks (``write_dataset``, ``caps``, ``require_write``, ``write_options``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from jasper.backend import BackendEntrypoint
from jasper.manifest import Manifest
from jasper.testing.hooks import KitHooks

#: The dtype a compact build stores each index array in, at the kit's sizes.
COMPACT: dict[str, torch.dtype] = {
    "pair_index": torch.int32,
    "pair_cluster_id": torch.int32,
    "pair_keyword_offsets": torch.int32,
    "pair_keyword_ids": torch.int32,
    "hard_negatives": torch.int32,
    "negative_tiers": torch.int8,
    "train_idx": torch.int32,
    "val_idx": torch.int32,
    "test_idx": torch.int32,
}


class CompactIndicesConformance(KitHooks):
    """Mixin of the compact-index tests (see the module docstring)."""

    compact_pairs: ClassVar[int] = 48

    def _synth_indices(self, compact: bool) -> tuple[dict[str, torch.Tensor], Manifest]:
        return self.synth_twin(self.compact_pairs, 13, compact_indices=compact)

    def test_compact_indices_round_trip_and_serve_int64(self, backend: BackendEntrypoint,
                                                        tmp_path: Path) -> None:
        """int32 index arrays and int8 tiers come back with their dtype and bits (``info``,
        ``read``, ``read_rows``), the manifest records the narrow dtypes, a deep validation
        passes, and every split serves batches whose ids and tiers are int64 and bit-identical
        to those of the int64-stored twin, preloaded and mapped or by rows.

        Fix: store the array's own integer dtype (never widen or narrow on write or read);
        h5py/zarr/numpy all hold int32 and int8 natively.
        """
        import jasper
        from jasper.testing.conformance import assert_bit_equal

        self.require_write(backend)
        narrow, m_narrow = self._synth_indices(True)
        wide, m_wide = self._synth_indices(False)
        for name, dtype in COMPACT.items():
            assert narrow[name].dtype == dtype, f"the compact build wrote {name} as " \
                f"{narrow[name].dtype}, expected {dtype}"
            assert wide[name].dtype == torch.int64, name
        a = self.write_dataset(backend, tmp_path / "wide", wide, m_wide)
        b = self.write_dataset(backend, tmp_path / "narrow", narrow, m_narrow)
        recorded = Manifest.load(b).arrays
        with jasper.open_store(b, backend.name) as reader:
            for name, dtype in COMPACT.items():
                assert recorded[name].dtype == str(dtype).removeprefix("torch."), name
                assert reader.info(name).dtype == dtype, f"info({name!r}).dtype"
                assert_bit_equal(reader.read(name), narrow[name], f"read({name!r})")
                n = narrow[name].shape[0]
                rows = torch.tensor([n - 1, 0, n // 2, 0], dtype=torch.int64)
                assert_bit_equal(reader.read_rows(name, rows), narrow[name][rows],
                                 f"read_rows({name!r})")
        assert jasper.validate(b, deep=True, backend=backend.name).ok
        self._assert_int64_batches(backend, a, b)

    def test_convert_keeps_compact_dtypes(self, backend: BackendEntrypoint,
                                          tmp_path: Path) -> None:
        """``jasper convert`` keeps each index array's stored dtype: a compact dataset stays
        compact to this backend and through another one and back, an int64 one stays int64.

        Fix: ``iter_chunks`` must yield the stored dtype; ``write_arrays`` must write what it
        is given.
        """
        import jasper

        self.require_write(backend)
        for compact in (True, False):
            arrays, manifest = self._synth_indices(compact)
            src = self.write_dataset(backend, tmp_path / f"src{compact}", arrays, manifest)
            hops = [jasper.convert(src, tmp_path / f"same{compact}", to=backend.name,
                                   src_backend=backend.name, progress=False,
                                   **self.write_options).dst]
            others = [n for n in jasper.list_backends()
                      if n != backend.name and jasper.get_backend(n).capabilities.write]
            if others:
                via = "pt" if "pt" in others else others[0]
                there = jasper.convert(src, tmp_path / f"via{compact}", to=via,
                                       src_backend=backend.name, progress=False).dst
                hops.append(there)
                hops.append(jasper.convert(there, tmp_path / f"back{compact}", to=backend.name,
                                           src_backend=via, progress=False,
                                           **self.write_options).dst)
            for path in hops:
                with jasper.open_store(path) as reader:
                    for name in COMPACT:
                        assert reader.info(name).dtype == arrays[name].dtype, (
                            f"{path}: {name} is {reader.info(name).dtype} after convert, "
                            f"the source stores {arrays[name].dtype}")

    def _assert_int64_batches(self, backend: BackendEntrypoint, wide: Path,
                              narrow: Path) -> None:
        import jasper
        from jasper.testing.conformance import assert_bit_equal

        caps = self.caps(backend)
        for mmap in [False, True] if (caps.mmap or caps.row_access) else [False]:
            for split in ("train", "val", "test"):
                with jasper.JASPERSteeringDataset(wide, split, storage_format=backend.name,
                                                  use_mmap=mmap) as w, \
                        jasper.JASPERSteeringDataset(narrow, split, storage_format=backend.name,
                                                     use_mmap=mmap) as c:
                    n = len(w)
                    if n == 0:
                        continue
                    idx = [n - 1, 0, *range(0, n, 3), 0, n - 1]
                    for epoch in (0, 35):
                        w.set_epoch(epoch)
                        c.set_epoch(epoch)
                        want, got = w.__getitems__(idx), c.__getitems__(idx)
                        assert list(got) == list(want)
                        for key in ("cluster_id", "steering_variant", "negative_tiers"):
                            assert got[key].dtype == torch.int64, f"{key} is {got[key].dtype}"
                        for key in want:
                            assert_bit_equal(got[key], want[key],
                                             f"{split} {key} (epoch {epoch}, use_mmap={mmap}, "
                                             f"mode {c.mode})")
                    sub_w = w.subset_by_cluster([1, 2])
                    sub_c = c.subset_by_cluster([1, 2])
                    assert torch.equal(sub_w.positions, sub_c.positions)


__all__ = ["COMPACT", "CompactIndicesConformance"]
