"""The corrupt-file corpus: every damage a dataset on disk can suffer, as named, deterministic
mutations of a pristine copy, crossed with every operation (:data:`reliability.ops.MODES`).

File-level mutations apply to whatever files a backend writes (so a backend installed later gets
them too): truncations, bit flips in the header and the payload, zeroed ranges, deleted files,
files replaced by a directory or a symlink to themselves, and same-size files swapped.
Format-aware ones add flips in every HDF5 object and dataset extent and swaps of same-shape
HDF5 datasets. Hostile manifests forge ``config.json``: huge sizes, wrong types, deep nesting,
removed checksums (alone and with corrupted data behind them).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability.reference import Reference
from reliability.regions import regions

Mutation = tuple[str, Callable[[Path], None]]


# --- primitive damage ---------------------------------------------------------------------------
def flip(path: Path, pos: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        if not b:
            return
        fh.seek(pos)
        fh.write(bytes([b[0] ^ mask]))


def zero(path: Path, start: int, n: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(b"\0" * max(0, min(n, path.stat().st_size - start)))


def truncate(path: Path, n: int) -> None:
    os.truncate(path, max(0, n))


def replace_with_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inner").write_bytes(b"x")


def self_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)


def swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


def _payload_pos(path: Path) -> int:
    regs = [r for r in regions(path) if r[0].startswith(("data", "member:data/"))]
    if regs:
        _name, start, stop = regs[-1]
        return (start + stop) // 2
    return path.stat().st_size * 3 // 4


def _header_pos(path: Path) -> int:
    regs = regions(path)
    if regs:
        _, start, stop = regs[0]
        return min(start + 4, stop - 1)
    return 0


# --- per-file mutations -------------------------------------------------------------------------
def file_mutations(ds: Path) -> list[Mutation]:
    """Damage to each stored file of the pristine dataset ``ds`` (names are relative paths, so
    a mutation applies to any copy)."""
    files = sorted(p.relative_to(ds).as_posix() for p in ds.rglob("*")
                   if p.is_file() and p.name != "config.json")
    out: list[Mutation] = []
    for rel in files:
        size = (ds / rel).stat().st_size
        hp, dp = _header_pos(ds / rel), _payload_pos(ds / rel)
        out += [
            (f"truncate-0:{rel}", lambda d, r=rel: truncate(d / r, 0)),
            (f"truncate-half:{rel}", lambda d, r=rel, s=size: truncate(d / r, s // 2)),
            (f"truncate-1:{rel}", lambda d, r=rel, s=size: truncate(d / r, s - 1)),
            (f"flip-header:{rel}", lambda d, r=rel, p=hp: flip(d / r, p)),
            (f"flip-data:{rel}", lambda d, r=rel, p=dp: flip(d / r, p, 0x40)),
            (f"zero-range:{rel}", lambda d, r=rel, s=size: zero(d / r, s // 4, max(1, s // 4))),
            (f"delete:{rel}", lambda d, r=rel: (d / r).unlink()),
            (f"replace-by-dir:{rel}", lambda d, r=rel: replace_with_dir(d / r)),
            (f"self-symlink:{rel}", lambda d, r=rel: self_symlink(d / r)),
        ]
    # same-size files swapped (same shape and dtype: only checksums can tell)
    by_size: dict[int, list[str]] = {}
    for rel in files:
        by_size.setdefault((ds / rel).stat().st_size, []).append(rel)
    for group in by_size.values():
        for a, b in zip(group[::2], group[1::2]):
            out.append((f"swap:{a}<->{b}", lambda d, a=a, b=b: swap(d / a, d / b)))
    # few files (one container per dataset): seeded flips and truncations at many places
    if len(out) < 60:
        rng = random.Random(f"{ds.parent.name}")
        for rel in files:
            size = (ds / rel).stat().st_size
            for frac in (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 0.99):
                out.append((f"truncate-{frac}:{rel}",
                            lambda d, r=rel, n=int(size * frac): truncate(d / r, n)))
            for i in range(20):
                pos, bit = rng.randrange(size), 1 << rng.randrange(8)
                out.append((f"flip-random-{i}@{pos}:{rel}",
                            lambda d, r=rel, p=pos, m=bit: flip(d / r, p, m)))
    return out


def hdf5_mutations(ds: Path) -> list[Mutation]:
    """Flips in every HDF5 region (superblock, object headers and heaps, each dataset's data),
    zeroed dataset extents, and same-shape datasets swapped by renaming inside the file."""
    out: list[Mutation] = []
    for h5 in sorted(ds.glob("*.h5")):
        rel = h5.name
        for name, start, stop in regions(h5):
            mid = (start + stop) // 2
            out.append((f"h5-flip:{name}", lambda d, r=rel, p=mid: flip(d / r, p, 0x10)))
            if name.startswith("data:"):
                out.append((f"h5-zero:{name}",
                            lambda d, r=rel, a=start, b=stop: zero(d / r, a, b - a)))
        groups: dict[tuple[Any, ...], list[str]] = {}
        for info in h5_datasets(h5):
            groups.setdefault((info["shape"], info["dtype"]), []).append(info["name"])
        for names in groups.values():
            for a, b in zip(names[::2], names[1::2]):
                out.append((f"h5-swap:{a}<->{b}", lambda d, r=rel, a=a, b=b: _h5_swap(d / r, a, b)))
    return out


def h5_datasets(path: Path) -> list[dict[str, Any]]:
    """Every dataset of an HDF5 file: name, shape, dtype, jasper_name, byte offset and size."""
    import h5py

    def _text(value: object) -> object:  # fixed-length attributes read back as bytes
        return value.decode("ascii", "replace") if isinstance(value, bytes) else value

    out: list[dict[str, Any]] = []
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out.append({"name": name, "shape": obj.shape, "dtype": str(obj.dtype),
                            "jasper_name": _text(obj.attrs.get("jasper_name")),
                            "offset": obj.id.get_offset(), "size": obj.id.get_storage_size()})
        f.visititems(visit)
    return out


def _h5_swap(path: Path, a: str, b: str) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        f.move(a, a + "_swap")
        f.move(b, a)
        f.move(a + "_swap", b)


# --- hostile manifests --------------------------------------------------------------------------
def _edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        m = json.loads((d / "config.json").read_text())
        out = fn(m)
        text = out if isinstance(out, str) else json.dumps(m)
        (d / "config.json").write_text(text)
    return apply


def _raw(text: str | bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (d / "config.json").write_bytes(data)
    return apply


def _first_array(m: dict[str, Any]) -> str:
    return sorted(m["arrays"])[0]


def _set_shape(name: str, shape: Any) -> Callable[[dict[str, Any]], None]:
    def fn(m: dict[str, Any]) -> None:
        m["arrays"][name]["shape"] = shape
    return fn


def _drop_checksum_and_flip(array: str) -> Callable[[Path], None]:
    """Item 11: remove an array's checksum from the manifest and corrupt the array behind it."""
    def apply(d: Path) -> None:
        _edit(lambda m: m["arrays"][array].pop("checksum", None))(d)
        _flip_array_payload(d, array)
    return apply


def _flip_array_payload(d: Path, array: str) -> None:
    files = [p for p in d.iterdir() if p.stem == array and p.is_file()]
    if files:
        flip(files[0], _payload_pos(files[0]), 0x40)
        return
    for h5 in d.glob("*.h5"):  # one container: flip inside the array's own extent
        hits = [i for i in h5_datasets(h5) if i["jasper_name"] == array and i["offset"] is not None]
        if hits:
            flip(h5, hits[0]["offset"] + hits[0]["size"] // 2, 0x40)


def manifest_mutations(ds: Path) -> list[Mutation]:
    """Forged ``config.json`` variants."""
    m = json.loads((ds / "config.json").read_text())
    first = _first_array(m)
    table = "question_embs" if "question_embs" in m.get("arrays", {}) else first
    out: list[Mutation] = [
        ("manifest:empty", _raw("")),
        ("manifest:not-json", _raw("{\"embedding_dim\": 16,")),
        ("manifest:binary", _raw(bytes(range(256)) * 4)),
        ("manifest:bom", _raw(b"\xef\xbb\xbf" + (ds / "config.json").read_bytes())),
        ("manifest:json-array", _raw("[1, 2, 3]")),
        ("manifest:deep-nesting", _raw("[" * 100_000 + "]" * 100_000)),
        ("manifest:deep-nesting-object", _raw('{"a":' * 50_000 + "1" + "}" * 50_000)),
        ("manifest:huge-whitespace", _raw(" " * (8 << 20) + json.dumps(m))),
        ("manifest:embedding_dim-huge", _edit(lambda m: m.update(embedding_dim=10**15))),
        ("manifest:n_neg-huge", _edit(lambda m: m.update(n_neg=10**15))),
        ("manifest:embedding_dim-wrong", _edit(lambda m: m.update(embedding_dim=m["embedding_dim"] + 1))),
        ("manifest:embedding_dim-string", _edit(lambda m: m.update(embedding_dim="16"))),
        ("manifest:embedding_dim-float", _edit(lambda m: m.update(embedding_dim=16.0))),
        ("manifest:embedding_dim-null", _edit(lambda m: m.update(embedding_dim=None))),
        ("manifest:embedding_dim-bool", _edit(lambda m: m.update(embedding_dim=True))),
        ("manifest:n_clusters-negative", _edit(lambda m: m.update(n_clusters=-1))),
        ("manifest:random_seed-string", _edit(lambda m: m.update(random_seed="abc"))),
        ("manifest:random_seed-1e999",
         _edit(lambda m: json.dumps({**m, "random_seed": 0}).replace('"random_seed": 0', '"random_seed": 1e999'))),
        ("manifest:schema_version-negative", _edit(lambda m: m.update(schema_version=-1))),
        ("manifest:schema_version-string", _edit(lambda m: m.update(schema_version="x"))),
        ("manifest:schema_version-future", _edit(lambda m: m.update(schema_version=10**6))),
        ("manifest:writer-string", _edit(lambda m: m.update(writer="pt"))),
        ("manifest:writer-backend-int", _edit(lambda m: m.update(writer={"backend": 5}))),
        ("manifest:writer-backend-unknown", _edit(lambda m: m.update(writer={"backend": "nope"}))),
        ("manifest:arrays-list", _edit(lambda m: m.update(arrays=[]))),
        ("manifest:arrays-string", _edit(lambda m: m.update(arrays="x"))),
        ("manifest:arrays-removed", _edit(lambda m: m.pop("arrays"))),
        ("manifest:array-shape-missing", _edit(lambda m: m["arrays"][first].pop("shape"))),
        ("manifest:array-shape-huge", _edit(_set_shape(table, [10**15, m["embedding_dim"]]))),
        ("manifest:array-shape-negative", _edit(_set_shape(table, [-1, m["embedding_dim"]]))),
        ("manifest:array-shape-strings", _edit(_set_shape(table, ["a", "b"]))),
        ("manifest:array-shape-nested", _edit(_set_shape(table, [[1], [2]]))),
        ("manifest:array-dtype-complex", _edit(lambda m: m["arrays"][table].update(dtype="complex128"))),
        ("manifest:array-dtype-int", _edit(lambda m: m["arrays"][table].update(dtype=123))),
        ("manifest:checksum-wrong", _edit(lambda m: m["arrays"][table].update(
            checksum=m["arrays"][table].get("checksum", "xxh3_64:0")[:-4] + "0000"))),
        ("manifest:checksum-removed-one", _edit(lambda m: m["arrays"][table].pop("checksum", None))),
        ("manifest:checksums-removed-all", _edit(lambda m: [a.pop("checksum", None) for a in m["arrays"].values()])),
        ("manifest:checksum-removed+corrupt", _drop_checksum_and_flip(table)),
        ("manifest:array-record-removed+corrupt", _drop_record_and_flip(table)),
        ("manifest:split_sizes-garbage", _edit(lambda m: m.update(split_sizes={"train": "many"}))),
        ("manifest:steering_schedule-garbage", _edit(lambda m: m.update(steering_schedule=[{"start_epoch": "a"}]))),
        ("manifest:steering_probabilities-negative", _edit(lambda m: m.update(
            steering_probabilities={"zero": -1, "centroid": 2, "keyword": 0, "residual": 0}))),
        ("manifest:curriculum-garbage", _edit(lambda m: m.update(curriculum=[[[]]]))),
        ("manifest:n_tiers-huge", _edit(lambda m: m.update(n_tiers=10**15))),
        ("manifest:deleted", lambda d: (d / "config.json").unlink()),
        ("manifest:replaced-by-dir", lambda d: replace_with_dir(d / "config.json")),
        ("manifest:self-symlink", lambda d: self_symlink(d / "config.json")),
    ]
    return out


def _drop_record_and_flip(array: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        _edit(lambda m: m["arrays"].pop(array, None))(d)
        _flip_array_payload(d, array)
    return apply


def catalogue_mutations(ds: Path) -> list[Mutation]:
    """Forged rows of a SQLite catalogue (memmap-sqlite): item 13's ``..`` file names,
    ``rows_per_block=0``, ``format_version='x'``, huge shapes, wrong dtypes."""
    db = ds / "catalogue.db"
    if not db.exists():
        return []

    def sql(statement: str) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            import sqlite3

            conn = sqlite3.connect(d / "catalogue.db")
            try:
                conn.execute("PRAGMA ignore_check_constraints = ON")
                conn.executescript(statement)
                conn.commit()
            finally:
                conn.close()
        return apply

    return [
        ("catalogue:file-dotdot", sql("UPDATE arrays SET file='../question_embs.npy' WHERE name='question_embs'")),
        ("catalogue:file-dotdot-only", sql("UPDATE arrays SET file='..' WHERE name='question_embs'")),
        ("catalogue:file-absolute", sql("UPDATE arrays SET file='/etc/passwd' WHERE name='question_embs'")),
        ("catalogue:files-swapped", sql(
            "UPDATE arrays SET file='swap.tmp' WHERE name='question_embs';"
            "UPDATE arrays SET file='question_embs.npy' WHERE name='source_embs';"
            "UPDATE arrays SET file='source_embs.npy' WHERE name='question_embs';")),
        ("catalogue:rows_per_block-0", sql("UPDATE arrays SET rows_per_block=0 WHERE name='question_embs'")),
        ("catalogue:format_version-x", sql("UPDATE jasper_meta SET value='x' WHERE key='format_version'")),
        ("catalogue:shape-huge", sql("UPDATE arrays SET shape='[1000000000000000, 16]' WHERE name='question_embs'")),
        ("catalogue:shape-garbage", sql("UPDATE arrays SET shape='{\"a\": 1}' WHERE name='question_embs'")),
        ("catalogue:dtype-x", sql("UPDATE arrays SET dtype='x', storage_dtype='x' WHERE name='question_embs'")),
        ("catalogue:offset-huge", sql("UPDATE arrays SET data_offset=1000000000000 WHERE name='question_embs'")),
        ("catalogue:nbytes-huge", sql("UPDATE arrays SET nbytes=1000000000000000 WHERE name='question_embs'")),
        ("catalogue:block-checksums-removed", sql("DELETE FROM array_blocks")),
        ("catalogue:arrays-table-dropped", sql("DROP TABLE arrays")),
    ]


def hdf5_attr_mutations(ds: Path) -> list[Mutation]:
    """Forged HDF5 attributes (item 13's layout version ``'abc'``) and a dataset of 10^15
    unallocated rows (item 12)."""
    if not list(ds.glob("*.h5")):
        return []

    def attrs(fn: Callable[[Any], None]) -> Callable[[Path], None]:
        def apply(d: Path) -> None:
            import h5py

            with h5py.File(next(d.glob("*.h5")), "r+") as f:
                fn(f)
        return apply

    def huge(f: Any) -> None:
        name = "splits/train"
        a = dict(f[name].attrs)
        del f[name]
        big = f.create_dataset(name, shape=(10**15,), dtype="<i8", chunks=(1 << 16,),
                               maxshape=(None,))
        for k, v in a.items():
            big.attrs[k] = v

    return [
        ("h5attr:layout-version-abc", attrs(lambda f: f.attrs.__setitem__("jasper_layout_version", "abc"))),
        ("h5attr:layout-version-future", attrs(lambda f: f.attrs.__setitem__("jasper_layout_version", 99))),
        ("h5attr:format-other", attrs(lambda f: f.attrs.__setitem__("jasper_format", "other"))),
        ("h5attr:jasper-name-dotdot", attrs(lambda f: f["splits/train"].attrs.__setitem__("jasper_name", "../x"))),
        ("h5attr:jasper-dtype-x", attrs(lambda f: f["splits/train"].attrs.__setitem__("jasper_dtype", "x"))),
        ("h5:unallocated-10^15-rows", attrs(huge)),
    ]


def _json_file_edit(rel: str, fn: Callable[[Any], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        doc = json.loads((d / rel).read_text())
        fn(doc)
        (d / rel).write_text(json.dumps(doc))
    return apply


def version_mutations(ds: Path) -> list[Mutation]:
    """Hostile layout versions of the backends that keep one in a JSON file (zarr's group
    attributes, chroma.json), and a ``format_version`` forged into the manifest."""
    out: list[Mutation] = [
        ("manifest:format_version-x", _json_file_edit("config.json", lambda m: m.update(
            format_version="x"))),
        ("manifest:writer-format_version-x", _json_file_edit("config.json", lambda m: m[
            "writer"].update(format_version="x") if isinstance(m.get("writer"), dict) else None)),
    ]
    if (ds / "zarr.json").exists():
        for label, value in (("x", "x"), ("float", 1.5), ("future", 10**6)):
            out.append((f"zarr-attr:layout-version-{label}", _json_file_edit(
                "zarr.json", lambda z, v=value: z["attributes"].__setitem__(
                    "jasper_layout_version", v))))
    if (ds / "chroma.json").exists():
        for label, value in (("x", "x"), ("future", 10**6)):
            out.append((f"chroma-json:layout-version-{label}", _json_file_edit(
                "chroma.json", lambda c, v=value: c.__setitem__("layout_version", v))))
        out.append(("chroma-json:list", lambda d: (d / "chroma.json").write_text("[1, 2]")))
    return out


def mutations(ref: Reference) -> list[Mutation]:
    """The whole corpus of one backend."""
    return (file_mutations(ref.ds) + hdf5_mutations(ref.ds) + hdf5_attr_mutations(ref.ds)
            + catalogue_mutations(ref.ds) + manifest_mutations(ref.ds)
            + version_mutations(ref.ds))


def apply(ref: Reference, mutation: Mutation, dest: Path) -> Path:
    """A fresh copy of ``ref``'s pristine dataset at ``dest`` with ``mutation`` applied."""
    if dest.exists():
        shutil.rmtree(dest)
    ref.copy_to(dest)
    mutation[1](dest)
    return dest
