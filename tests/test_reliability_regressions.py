"""Regression tests for hostile version and dtype fields the reliability campaign found (issue 9
item 13): every backend's own "format version" (the memmap-sqlite catalogue's
``jasper_meta.format_version``, the HDF5 file's and the zarr group's ``jasper_layout_version``,
``chroma.json``'s ``layout_version``) set to ``'x'`` or a non-integer, and a catalogue dtype
``'x'``, must be a typed :class:`jasper.errors.JasperError` naming the file, on open and on deep
validation; a ``format_version`` key forged into the manifest must never escape as a raw error.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import jasper
from jasper.errors import JasperError
from jasper.registry import get_backend, list_backends

Edit = Callable[[Path], None]


def _installed(name: str) -> bool:
    if name not in list_backends():
        return False
    try:
        return bool(get_backend(name).capabilities.write)
    except Exception:  # a plugin that fails to load is not installed for these tests
        return False


def _json_edit(rel: str, fn: Callable[[dict[str, Any]], None]) -> Edit:
    def apply(d: Path) -> None:
        doc = json.loads((d / rel).read_text())
        fn(doc)
        (d / rel).write_text(json.dumps(doc))
    return apply


def _sql(statement: str) -> Edit:
    def apply(d: Path) -> None:
        conn = sqlite3.connect(d / "catalogue.db")
        try:
            conn.execute(statement)
            conn.commit()
        finally:
            conn.close()
    return apply


def _h5_attr(value: Any) -> Edit:
    def apply(d: Path) -> None:
        import h5py

        with h5py.File(d / "dataset.h5", "r+") as f:
            f.attrs["jasper_layout_version"] = value
    return apply


def _zarr_version(value: Any) -> Edit:
    return _json_edit("zarr.json", lambda z: z["attributes"].__setitem__("jasper_layout_version",
                                                                          value))


def _chroma_version(value: Any) -> Edit:
    return _json_edit("chroma.json", lambda c: c.__setitem__("layout_version", value))


#: backend -> (name, edit, True when the edit must be refused; False: anything but a raw error)
HOSTILE: dict[str, list[tuple[str, Edit, bool]]] = {
    "memmap-sqlite": [
        ("catalogue-format_version-x",
         _sql("UPDATE jasper_meta SET value='x' WHERE key='format_version'"), True),
        ("catalogue-dtype-x",
         _sql("UPDATE arrays SET dtype='x', storage_dtype='x' WHERE name='question_embs'"), True),
        ("catalogue-dtype-only-x", _sql("UPDATE arrays SET dtype='x' WHERE name='question_embs'"),
         True),
        ("catalogue-storage_dtype-object",
         _sql("UPDATE arrays SET storage_dtype='|O' WHERE name='question_embs'"), True),
        ("catalogue-storage_dtype-int", _sql("UPDATE arrays SET storage_dtype=7 WHERE "
                                             "name='question_embs'"), True),
    ],
    "hdf5": [("layout_version-x", _h5_attr("x"), True), ("layout_version-abc", _h5_attr("abc"), True)],
    "zarr": [("layout_version-x", _zarr_version("x"), True),
             ("layout_version-float", _zarr_version(1.5), True),
             ("layout_version-list", _zarr_version([1]), True)],
    "chroma": [("layout_version-x", _chroma_version("x"), True),
               ("layout_version-future", _chroma_version(10**6), True),
               ("chroma.json-list", lambda d: (d / "chroma.json").write_text("[1, 2]"), True)],
}
MANIFEST: list[tuple[str, Edit, bool]] = [
    ("manifest-format_version-x", _json_edit("config.json", lambda m: m.update(format_version="x")),
     False),
    ("manifest-writer-format_version-x",
     _json_edit("config.json", lambda m: m["writer"].update(format_version="x")), False),
]


def _cases() -> list[Any]:
    out = []
    for backend in ("pt", "hdf5", "memmap-sqlite", "zarr", "chroma"):
        for name, edit, refused in [*HOSTILE.get(backend, []), *MANIFEST]:
            out.append(pytest.param(backend, edit, refused, id=f"{backend}-{name}"))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from jasper.synth import SynthConfig, write_synthetic

    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if not _installed(backend):
            pytest.skip(f"backend {backend} is not installed")
        if backend not in made:
            made[backend] = write_synthetic(
                tmp_path_factory.mktemp(backend) / "ds",
                SynthConfig(n_pairs=40, embedding_dim=8, n_neg=2, n_clusters=4, seed=0),
                backend=backend, progress=False)
        return made[backend]
    return get


@pytest.mark.parametrize(("backend", "edit", "refused"), _cases())
def test_hostile_version_fields_are_typed(pristine: Callable[[str], Path], tmp_path: Path,
                                          backend: str, edit: Edit, refused: bool) -> None:
    d = tmp_path / "ds"
    shutil.copytree(pristine(backend), d)
    edit(d)
    warnings.simplefilter("ignore")
    for what, op in (("open", lambda: jasper.JASPERSteeringDataset(d, "train").close()),
                     ("validate --deep", lambda: jasper.validate(d, deep=True, progress=False))):
        try:
            op()
        except JasperError as exc:
            assert str(d) in str(exc), f"{what}: the error does not name the dataset: {exc}"
            continue
        # anything but a JasperError propagates and fails the test as a raw error
        assert not refused, f"{what} accepted the hostile field"


def test_chroma_side_array_with_a_damaged_npy_header_is_typed(
        pristine: Callable[[str], Path], tmp_path: Path) -> None:
    """A zeroed range in the header of a Chroma dataset's side array (``arrays/*.npy``) made
    numpy's header literal parser raise ``tokenize.TokenError``, which escaped every reader."""
    d = tmp_path / "ds"
    shutil.copytree(pristine("chroma"), d)
    f = d / "arrays" / "val_idx.npy"
    raw = bytearray(f.read_bytes())
    quarter = len(raw) // 4
    raw[quarter:2 * quarter] = bytes(quarter)  # what the campaign's zero-range damage does
    f.write_bytes(bytes(raw))
    warnings.simplefilter("ignore")
    with pytest.raises(JasperError, match="val_idx"):
        jasper.validate(d, deep=True, progress=False)
    with pytest.raises(JasperError, match="val_idx"):
        jasper.JASPERSteeringDataset(d, "train").close()
