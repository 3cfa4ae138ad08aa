"""An object store inside a Chroma database: what core's generation commit runs on for a
dataset on a Chroma server (see :mod:`jasper.location` for the protocol, and
:mod:`jasper_chroma.layout` for the names).

One collection per dataset, ``jasper.NAME.objects``, holds the objects. Chroma has no bytes
type and indexes documents for full-text search (measured: a 4 MiB base64 document took 7.5 s to
add, 0.24 s as a metadata value), so an object is base64 in record metadata: a header record
(id ``o:KEY``: size, part count, the put's nonce) and, for objects over :data:`PART_BYTES`,
part records ``p:KEY:NONCE:I``. Parts are written before the header, so a reader sees an
object whole or not at all; a single-record upsert is atomic, which is what the pointer needs.
Records carry a 1-dimensional zero embedding (Chroma requires one).

A generation's table collections (``jasper.NAME.GENERATION-TABLE``) are listed as the keys
``generations/GENERATION/collections/TABLE`` and deleting such a key drops the collection, so
core's protocol removes them with their generation; no other collection is ever touched.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from jasper_chroma.client import SERVER_FAILED, ChromaStoreError, chroma_errors, get_client
from jasper_chroma.layout import ServerDataset

#: Raw bytes per part record (1.4 MB of base64 per HTTP request: well under Chroma's limits).
PART_BYTES = 1 << 20
#: Records per ``get``/``delete`` page.
_PAGE = 1000
_COLLECTIONS = "collections"


def collection_key(generation: str, table: str) -> str:
    """The object-store key under which a generation's table collection is listed."""
    return f"generations/{generation}/{_COLLECTIONS}/{table}"


def _parse_collection_key(key: str) -> tuple[str, str] | None:
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "generations" and parts[2] == _COLLECTIONS:
        return parts[1], parts[3]
    return None


class ChromaObjects:
    """:class:`jasper.location.ObjectStore` over the object collection of one dataset."""

    def __init__(self, dataset: ServerDataset) -> None:
        self.dataset = dataset
        self._col: Any = None

    @property
    def where(self) -> str:
        return self.dataset.url

    def client(self) -> Any:
        return get_client(self.dataset.server)

    def _calling(self, what: str) -> contextlib.AbstractContextManager[None]:
        """:func:`chroma_errors` for a call on the object collection."""
        return chroma_errors(self.where, f"{what} in collection "
                             f"{self.dataset.objects_collection!r} failed", SERVER_FAILED)

    def collection(self, create: bool = False) -> Any:
        """The object collection (created by a writer; None for a reader when absent)."""
        if self._col is not None:
            return self._col
        client = self.client()
        name = self.dataset.objects_collection
        with chroma_errors(self.where, f"cannot open collection {name!r}", SERVER_FAILED):
            if create:
                self._col = client.get_or_create_collection(
                    name, embedding_function=None, metadata={"jasper": "objects"})
            else:
                names = {c.name if hasattr(c, "name") else str(c)
                         for c in client.list_collections()}
                if name not in names:
                    return None
                self._col = client.get_collection(name, embedding_function=None)
        return self._col

    # --- ObjectStore ---------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        col = self.collection()
        if col is None:
            raise FileNotFoundError(key)
        with self._calling(f"reading object {key!r}"):
            got = col.get(ids=[f"o:{key}"], include=["metadatas"])
        if not got["ids"]:
            raise FileNotFoundError(key)
        head = got["metadatas"][0] or {}
        parts, nonce, size = int(head.get("parts", 0)), str(head.get("nonce", "")), head["size"]
        if parts == 0:
            data = base64.b64decode(head.get("b", ""))
        else:
            ids = [f"p:{key}:{nonce}:{i}" for i in range(parts)]
            chunks: dict[str, bytes] = {}
            for start in range(0, len(ids), _PAGE):
                with self._calling(f"reading object {key!r}"):
                    page = col.get(ids=ids[start:start + _PAGE], include=["metadatas"])
                for i, m in zip(page["ids"], page["metadatas"]):
                    chunks[i] = base64.b64decode((m or {}).get("b", ""))
            missing = [i for i in ids if i not in chunks]
            if missing:
                raise ChromaStoreError(f"{self.where}: object {key!r} in collection "
                                       f"{self.dataset.objects_collection!r} has no part id "
                                       f"{missing[0]!r} ({len(missing)} of {parts} missing)")
            data = b"".join(chunks[i] for i in ids)
        if len(data) != int(size):
            raise ChromaStoreError(f"{self.where}: object {key!r} in collection "
                                   f"{self.dataset.objects_collection!r} is {len(data)} bytes, "
                                   f"its header records {size}")
        return data

    def put(self, key: str, data: bytes) -> None:
        col = self.collection(create=True)
        old = self._header(key)
        nonce = uuid.uuid4().hex[:12]
        head: dict[str, Any] = {"size": len(data)}
        with self._calling(f"writing object {key!r}"):
            if len(data) <= PART_BYTES:
                head.update(parts=0, b=base64.b64encode(data).decode("ascii"))
            else:
                n = -(-len(data) // PART_BYTES)
                for start in range(0, n, 4):
                    idx = range(start, min(n, start + 4))
                    col.add(ids=[f"p:{key}:{nonce}:{i}" for i in idx],
                            embeddings=[[0.0]] * len(idx),
                            metadatas=[{"key": key, "b": base64.b64encode(
                                data[i * PART_BYTES:(i + 1) * PART_BYTES]).decode("ascii")}
                                for i in idx])
                head.update(parts=n, nonce=nonce)
            col.upsert(ids=[f"o:{key}"], embeddings=[[0.0]], metadatas=[head])
        if old is not None and int(old.get("parts", 0)):
            self._delete_parts(key, old)

    def list(self, prefix: str = "") -> Iterator[str]:
        col = self.collection()
        keys: set[str] = set()
        if col is not None:
            offset = 0
            while True:
                with self._calling("listing objects"):
                    ids = col.get(include=[], limit=_PAGE, offset=offset)["ids"]
                for i in ids:
                    # a part without its header (a put cut short) is listed too, so that the
                    # generation it belongs to is found and deleted whole
                    keys.add(i[2:] if i.startswith("o:") else i[2:].rsplit(":", 2)[0])
                if len(ids) < _PAGE:
                    break
                offset += _PAGE
        for generation, table in self.table_collections():
            keys.add(collection_key(generation, table))
        yield from sorted(k for k in keys if k.startswith(prefix))

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        tables = [k for k in keys if _parse_collection_key(k)]
        objects = [k for k in keys if k not in tables]
        for key in tables:
            generation, table = _parse_collection_key(key)  # type: ignore[misc]
            self.drop_collection(self.dataset.table_collection(generation, table))
        col = self.collection()
        if col is None or not objects:
            return
        for start in range(0, len(objects), _PAGE):
            batch = objects[start:start + _PAGE]
            with self._calling(f"deleting objects {batch[0]!r}.."):
                # headers first: each object is gone at once; then every part of it
                col.delete(ids=[f"o:{k}" for k in batch])
                col.delete(where={"key": {"$in": batch}})
        self._drop_if_empty(col)

    def _drop_if_empty(self, col: Any) -> None:
        # a first write that failed leaves no empty object collection behind (nothing at the
        # target). A writer that created it concurrently gets a typed error on its next put.
        with self._calling("counting objects"):
            empty = int(col.count()) == 0
        if empty:
            self.drop_collection(self.dataset.objects_collection)
            self._col = None

    # --- sizes (``jasper info``) ------------------------------------------------------------
    def total_size(self, prefix: str = "") -> int:
        """Bytes of the objects below ``prefix`` plus 4 bytes per stored float of its tables."""
        total = 0
        for key in self.list(prefix):
            ck = _parse_collection_key(key)
            if ck is None:
                head = self._header(key)
                total += int(head["size"]) if head else 0
                continue
            name = self.dataset.table_collection(*ck)
            client = self.client()
            with chroma_errors(self.where, f"sizing collection {name!r} failed", SERVER_FAILED):
                col = client.get_collection(name, embedding_function=None)
                n = int(col.count())
                first = col.get(limit=1, include=["embeddings"])["embeddings"] if n else []
                total += n * (len(first[0]) if len(first) else 0) * 4
        return total

    # --- helpers ----------------------------------------------------------------------------
    def table_collections(self) -> builtins.list[tuple[str, str]]:
        """``(generation, table)`` of every table collection of this dataset on the server."""
        client = self.client()
        with chroma_errors(self.where, "listing collections failed", SERVER_FAILED):
            listed = client.list_collections()
        out = []
        for c in listed:
            parsed = self.dataset.parse_table_collection(c.name if hasattr(c, "name") else str(c))
            if parsed is not None:
                out.append(parsed)
        return out

    def drop_collection(self, name: str) -> None:
        client = self.client()
        with chroma_errors(self.where, f"deleting collection {name!r} failed", SERVER_FAILED):
            try:
                client.delete_collection(name)
            except Exception as exc:
                if "does not exist" in str(exc).lower() or "not found" in str(exc).lower():
                    return
                raise

    def _header(self, key: str) -> dict[str, Any] | None:
        col = self.collection()
        if col is None:
            return None
        with self._calling(f"reading object {key!r}"):
            got = col.get(ids=[f"o:{key}"], include=["metadatas"])
        return dict(got["metadatas"][0] or {}) if got["ids"] else None

    def _delete_parts(self, key: str, head: dict[str, Any]) -> None:
        ids = [f"p:{key}:{head.get('nonce', '')}:{i}" for i in range(int(head["parts"]))]
        col = self.collection()
        for start in range(0, len(ids), _PAGE):
            with self._calling(f"deleting parts of object {key!r}"):
                col.delete(ids=ids[start:start + _PAGE])
