"""Conformance for derived steering (:mod:`jasper.steering`): a dataset that stores no steering
arrays (one that keeps stored exceptions, and one that keeps some variants stored) written
through the backend serves batches bit-identical to the same dataset with stored steering, in
every mode the backend offers.
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

#: Steering rows the kit alters before deriving (variant 1-3, pair id): they must come back
#: as stored exceptions.
ALTERED: tuple[tuple[int, int], ...] = ((1, 3), (2, 0), (2, 17), (3, 5), (3, 39))


class DerivedSteeringConformance(KitHooks):
    """Mixin of the derived-steering tests (see the module docstring)."""

    derived_pairs: ClassVar[int] = 64

    def _synth(self, derived: bool, keep: tuple[str, ...] = ()
               ) -> tuple[dict[str, torch.Tensor], Manifest]:
        return self.synth_twin(self.derived_pairs, 11, derived_steering=derived,
                               keep_steering=keep)

    def _modes(self, backend: BackendEntrypoint) -> list[bool]:
        caps = self.caps(backend)
        return [False, True] if (caps.mmap or caps.row_access) else [False]

    def test_derived_steering_serves_the_stored_values(self, backend: BackendEntrypoint,
                                                       tmp_path: Path) -> None:
        """A dataset written with derived steering (no steering arrays handed to the writer,
        plus two empty exception arrays) validates deeply and serves, preloaded and mapped or
        by rows, batches bit-identical to the same dataset with stored steering.

        Fix: store every array of :data:`jasper.schema.ALL_ARRAYS` by name, including the
        exception arrays ``steering_exception_rows`` (int64 ``[E, 2]``) and
        ``steering_exception_values`` (``[E, D]``), also when ``E`` is 0; never require the
        three steering arrays to be present.
        """
        import jasper
        from jasper.steering import STEERING, stored_names

        self.require_write(backend)
        stored, m_stored = self._synth(False)
        derived, m_derived = self._synth(True)
        assert not set(STEERING) & set(derived)
        a = self.write_dataset(backend, tmp_path / "stored", stored, m_stored)
        b = self.write_dataset(backend, tmp_path / "derived", derived, m_derived)
        report = jasper.validate(b, deep=True, backend=backend.name)
        assert report.checksums_verified == len(stored_names(Manifest.load(b)))
        assert report.derived_rows_checked == 3 * self.derived_pairs
        self._assert_same_batches(backend, a, b)

    def test_partially_derived_steering_serves_the_stored_values(
            self, backend: BackendEntrypoint, tmp_path: Path) -> None:
        """A derived dataset that keeps some steering variants stored (``derived_steering.
        stored_variants``; here each one alone, and keyword with residual) validates deeply
        and serves batches bit-identical to the stored dataset, preloaded and mapped or by
        rows; the kept array's bytes are the stored dataset's.

        Fix: store a kept steering array like any stored steering array (its name is in
        :func:`jasper.steering.stored_names`), next to the two exception arrays.
        """
        import jasper
        from jasper.steering import STEERING, derived_spec, stored_names

        self.require_write(backend)
        stored, m_stored = self._synth(False)
        a = self.write_dataset(backend, tmp_path / "stored", stored, m_stored)
        for keep in (("centroid",), ("keyword",), ("residual",), ("keyword", "residual")):
            partial, m_partial = self._synth(True, keep)
            spec = derived_spec(m_partial)
            assert spec is not None and spec.stored_variants == keep
            assert set(STEERING) & set(partial) == set(spec.stored_arrays)
            b = self.write_dataset(backend, tmp_path / "-".join(keep), partial, m_partial)
            report = jasper.validate(b, deep=True, backend=backend.name)
            assert report.checksums_verified == len(stored_names(Manifest.load(b)))
            assert report.derived_rows_checked == (3 - len(keep)) * self.derived_pairs
            for name in spec.stored_arrays:
                assert Manifest.load(b).arrays[name].checksum == \
                    Manifest.load(a).arrays[name].checksum, name
            self._assert_same_batches(backend, a, b)

    def test_derived_steering_keeps_altered_rows_as_exceptions(
            self, backend: BackendEntrypoint, tmp_path: Path) -> None:
        """Rows of stored steering that the formula does not reproduce (here: deliberately
        altered) are kept as stored exceptions when the dataset is derived, so the derived
        dataset serves exactly the altered values; a conversion to and from this backend keeps
        them.

        Fix: as above; ``steering_exception_values`` must round-trip bit-exactly.
        """
        import jasper
        from jasper.steering import derive_arrays

        self.require_write(backend)
        stored, manifest = self._synth(False)
        g = torch.Generator().manual_seed(5)
        names = ("steering_centroid", "steering_keyword_weighted", "steering_residual")
        for v, p in ALTERED:
            stored[names[v - 1]][p] = torch.randn(stored[names[v - 1]].shape[1], generator=g)
        out, m, report = derive_arrays(stored, manifest)
        assert report.total == len(ALTERED), str(report)
        assert [tuple(r) for r in out["steering_exception_rows"].tolist()] == sorted(ALTERED)
        a = self.write_dataset(backend, tmp_path / "stored", stored, manifest)
        b = self.write_dataset(backend, tmp_path / "derived", out, m)
        assert jasper.validate(b, deep=True, backend=backend.name).ok
        self._assert_same_batches(backend, a, b)
        copy = jasper.convert(b, tmp_path / "copy", to=backend.name, src_backend=backend.name,
                              progress=False, **self.write_options)
        self._assert_same_batches(backend, a, Path(str(copy.dst)))

    def _assert_same_batches(self, backend: BackendEntrypoint, a: Path, b: Path) -> None:
        import jasper
        from jasper.testing.conformance import assert_bit_equal

        for mmap in self._modes(backend):
            for split in ("train", "val", "test"):
                with jasper.JASPERSteeringDataset(a, split, storage_format=backend.name,
                                                  use_mmap=mmap) as s, \
                        jasper.JASPERSteeringDataset(b, split, storage_format=backend.name,
                                                     use_mmap=mmap) as d:
                    n = len(s)
                    if n == 0:
                        continue
                    idx = [n - 1, 0, *range(0, n, 2), 0, n - 1]
                    for variant in (None, "zero", "centroid", "keyword", "residual"):
                        s.force_steering(variant)
                        d.force_steering(variant)
                        s.set_epoch(35)
                        d.set_epoch(35)
                        want, got = s.__getitems__(idx), d.__getitems__(idx)
                        assert list(got) == list(want)
                        for key in want:
                            assert_bit_equal(got[key], want[key],
                                             f"{split} {key} (variant {variant}, "
                                             f"use_mmap={mmap}, mode {d.mode})")


__all__ = ["ALTERED", "DerivedSteeringConformance"]
