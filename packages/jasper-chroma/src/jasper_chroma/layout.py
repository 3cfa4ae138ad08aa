"""Where a Chroma-backed dataset keeps what: the one description reader and writer share.

Two locations:

**A local directory** (jasper's contract: core writes ``config.json`` last and renames the
directory into place):

- ``chroma.json``: this layout's record: each table's collection name, rows and columns;
- ``chroma/``: the PersistentClient directory holding the table collections;
- ``arrays/NAME.npy``: every array that is not an embedding table, in its storage dtype.

**A Chroma server**, ``chroma://HOST:PORT/TENANT/DATABASE/NAME`` (or ``chroma://HOST:PORT/NAME``
for the default tenant and database): everything is on the server, nothing on local disk.
Core's generation commit (:mod:`jasper.location`) runs over :class:`ChromaObjects`, an object
store kept in one collection per dataset, ``jasper.NAME.objects``: the pointer, each
generation's writer record, ``config.json``, ``chroma.json`` and ``arrays/NAME.npy`` (as base64
chunks in record metadata). A generation's tables are the collections
``jasper.NAME.GENERATION.TABLE``; they appear in the object store as the keys
``generations/GENERATION/collections/TABLE``, so the protocol deletes them with the generation
(an aborted write, a superseded version, a dead writer's leftovers). Collections jasper did not
name this way are never listed, read or deleted.

The four embedding tables (questions, sources, keywords, centroids) are collections whose ids
are the row numbers as decimal strings (``"0"``, ``"1"``, ...), so row ``i`` is always id
``str(i)``. Collections use the ``l2`` space: Chroma's ``cosine`` space stores normalised
vectors (measured: 1-2 ulp changes on 40% of the values), which would break bit-exact reads.

Why the steering vectors (``[N_p, D]`` floats, three of them) are ``.npy`` beside the
collections and not collections: they are never searched by similarity, only read whole at
preload; as collections they would triple the rows Chroma indexes (writes run at about
1-9k rows/s) and every read would pay float64 transport. On a server they are objects of the
dataset's object collection, like every other non-table array.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jasper.dtypes import LOGICAL_DTYPES
from jasper.errors import FormatError
from jasper.schema import Role, dataset_kind

LAYOUT_FILE = "chroma.json"
CHROMA_DIR = "chroma"
ARRAYS_DIR = "arrays"
LAYOUT_VERSION = 1

#: HNSW settings for jasper's bulk loads: small graphs build faster (tables are read by id,
#: never searched by jasper), batch and sync thresholds at Chroma's maximum batch size.
BULK_HNSW: dict[str, Any] = {"space": "l2", "ef_construction": 32, "max_neighbors": 8,
                             "batch_size": 5461, "sync_threshold": 20000}

def regular_file(path: Path, what: str) -> None:
    """Raise :class:`FormatError` naming ``path`` unless it is a regular file inside the dataset
    (a symlink, directory or loop in its place is refused, never followed)."""
    import os
    import stat

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FormatError(path, f"missing: {what}") from None
    except OSError as exc:
        raise FormatError(path, f"cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise FormatError(path, f"is {kind}; a dataset reads only regular files inside its "
                          "own directory")


def table_names(kind: str | None) -> list[str]:
    """The embedding tables of a dataset kind (questions, sources, keywords and centroids of
    the steering kind; base and steering embeddings of the cluster-labeled kind)."""
    return [n for n, s in dataset_kind(kind).arrays.items() if s.role is Role.TABLE]


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")


def collection_name(prefix: str, table: str) -> str:
    """The collection holding ``table`` (3-512 characters, as Chroma requires)."""
    name = f"{prefix}-{table}"
    if not _NAME_OK.match(name):
        raise ValueError(f"invalid Chroma collection name {name!r}")
    return name


@dataclass(frozen=True)
class ServerLocation:
    """A Chroma server: ``chroma://host:port[/tenant/database]`` or ``http://host:port``."""

    host: str
    port: int
    tenant: str = "default_tenant"
    database: str = "default_database"

    @classmethod
    def parse(cls, text: str) -> ServerLocation:
        parts = urlsplit(text if "://" in text else f"chroma://{text}")
        if parts.scheme not in {"chroma", "http"} or not parts.hostname or not parts.port:
            raise FormatError(text, "a Chroma server location is chroma://HOST:PORT"
                              "[/TENANT/DATABASE]")
        path = [p for p in parts.path.split("/") if p]
        tenant = path[0] if len(path) > 0 else "default_tenant"
        database = path[1] if len(path) > 1 else "default_database"
        return cls(parts.hostname, parts.port, tenant, database)

    def url(self) -> str:
        return f"chroma://{self.host}:{self.port}/{self.tenant}/{self.database}"


#: URL scheme of a dataset on a Chroma server.
SCHEME = "chroma"
#: A dataset name on a server: it becomes part of collection names (``jasper.NAME.*``).
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: Core's generation names (``20261202T023500Z-1234-0123456789ab``), as collection-name parts.
_GENERATION = r"[0-9]{8}T[0-9]{6}Z-[0-9]+-[0-9a-f]{12}"
OBJECTS_SUFFIX = "objects"


@dataclass(frozen=True)
class ServerDataset:
    """A dataset on a Chroma server, parsed from its :class:`jasper.location.Location`
    (``chroma://HOST:PORT/TENANT/DATABASE/NAME``, or ``chroma://HOST:PORT/NAME`` for the default
    tenant and database) or from one of its generations' locations
    (``.../NAME/generations/GENERATION``, what core hands the writer and the reader)."""

    server: ServerLocation
    name: str
    generation: str | None = None

    @classmethod
    def parse(cls, location: Any) -> ServerDataset:
        text = str(location)
        path = getattr(location, "path", None)
        if path is None or getattr(location, "scheme", None) != SCHEME:
            raise FormatError(text, "a dataset on a Chroma server is "
                              "chroma://HOST:PORT/TENANT/DATABASE/NAME")
        parts = path.split("/")
        generation = None
        if len(parts) >= 3 and parts[-2] == "generations":
            generation, parts = parts[-1], parts[:-2]
            if not re.fullmatch(_GENERATION, generation):
                raise FormatError(text, f"{generation!r} is not a jasper generation")
        if len(parts) == 2:
            parts = [parts[0], "default_tenant", "default_database", parts[1]]
        if len(parts) != 4:
            raise FormatError(text, "a dataset on a Chroma server is "
                              "chroma://HOST:PORT/TENANT/DATABASE/NAME (or "
                              "chroma://HOST:PORT/NAME for the default tenant and database)")
        host, _, port = parts[0].rpartition(":")
        if not host or not port.isdigit():
            raise FormatError(text, "the server is HOST:PORT (chroma://127.0.0.1:8000/...)")
        name = parts[3]
        if not _DATASET_NAME.match(name):
            raise FormatError(text, f"dataset name {name!r}: 1-64 characters from "
                              "[A-Za-z0-9_-], starting with a letter or digit (it becomes part "
                              "of Chroma collection names)")
        return cls(ServerLocation(host, int(port), parts[1], parts[2]), name, generation)

    @property
    def url(self) -> str:
        return f"{self.server.url()}/{self.name}"

    @property
    def objects_collection(self) -> str:
        """The collection holding the dataset's objects (pointer, manifests, arrays)."""
        return f"jasper.{self.name}.{OBJECTS_SUFFIX}"

    def table_collection(self, generation: str, table: str) -> str:
        """The collection of ``table`` in ``generation``."""
        return collection_name(f"jasper.{self.name}.{generation}", table)

    def parse_table_collection(self, collection: str) -> tuple[str, str] | None:
        """``(generation, table)`` of a table collection of this dataset; None for any other
        collection (of another dataset, or not jasper's)."""
        m = re.fullmatch(rf"jasper\.{re.escape(self.name)}\.({_GENERATION})-([a-z_]+)",
                         collection)
        return (m.group(1), m.group(2)) if m else None


def is_server(location: str | Path) -> bool:
    """Whether ``location`` names a server rather than a directory."""
    text = str(location)
    return text.startswith(("chroma://", "http://"))


@dataclass
class TableRecord:
    collection: str
    rows: int
    cols: int
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"collection": self.collection, "rows": self.rows, "cols": self.cols,
                "dtype": self.dtype}


@dataclass
class Layout:
    """The parsed ``chroma.json``."""

    where: str  # "local" or "server"
    server: ServerLocation | None
    tables: dict[str, TableRecord]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layout_version": LAYOUT_VERSION, "where": self.where,
                             "tables": {k: v.to_dict() for k, v in self.tables.items()}}
        if self.server is not None:
            d["server"] = {"host": self.server.host, "port": self.server.port,
                           "tenant": self.server.tenant, "database": self.server.database}
        return d

    def dump(self, directory: Path) -> None:
        (directory / LAYOUT_FILE).write_bytes(self.to_bytes())

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    @classmethod
    def load(cls, directory: Path, kind: str | None = None) -> Layout:
        path = directory / LAYOUT_FILE
        regular_file(path, "a Chroma-backed dataset has chroma.json")
        return cls.parse(path.read_bytes(), path, kind)

    @classmethod
    def parse(cls, data: bytes, path: Any, kind: str | None = None) -> Layout:
        """The layout in ``data`` (the bytes of ``chroma.json``; ``path`` names it in errors)."""
        try:
            d = json.loads(data)
            version = d.get("layout_version", LAYOUT_VERSION)
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise FormatError(path, f"chroma.json layout_version is {version!r}, not a "
                                  "positive integer")
            if version > LAYOUT_VERSION:
                raise FormatError(path, f"chroma.json layout_version {version} is newer than "
                                  f"this jasper-chroma reads ({LAYOUT_VERSION}); upgrade "
                                  "jasper-chroma")
            server = ServerLocation(**d["server"]) if d.get("server") else None
            tables = {k: TableRecord(v["collection"], int(v["rows"]), int(v["cols"]),
                                     str(v["dtype"])) for k, v in d["tables"].items()}
            where = str(d["where"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as exc:
            raise FormatError(path, f"not a valid chroma.json: {exc}") from None
        for name, t in tables.items():
            # the reader makes tensors of these: a damaged record is this file's error, not a
            # TypeError or an allocation of a negative size later
            if t.dtype not in LOGICAL_DTYPES:
                raise FormatError(path, f"chroma.json table {name!r} has dtype {t.dtype!r}; "
                                  f"known: {', '.join(sorted(LOGICAL_DTYPES))}", array=name)
            if t.rows < 0 or t.cols < 0:
                raise FormatError(path, f"chroma.json table {name!r} has shape "
                                  f"({t.rows}, {t.cols}), not a shape", array=name)
        missing = [t for t in table_names(kind) if t not in tables]
        if missing:
            raise FormatError(path, f"chroma.json lists no collection for {', '.join(missing)}")
        if where not in {"local", "server"} or (where == "server") != (server is not None):
            raise FormatError(path, f"chroma.json 'where' is {where!r}")
        return cls(where, server, tables)
