"""Records: one string or small JSON value per row, stored as two ordinary arrays.

A record ``x`` (see :class:`jasper.schema.RecordSpec`) is ``x_offsets`` int64 ``[N + 1]`` and
``x_bytes`` uint8: row ``i`` is ``x_bytes[x_offsets[i]:x_offsets[i + 1]]``, the UTF-8 text of a
string or the compact JSON text of a value. Because both parts are plain arrays, every backend
stores, maps, checksums and converts records without a line of its own code.

``None`` is the single byte ``0xFF``: it never occurs in UTF-8, so it cannot be confused with
any string (the empty string is zero bytes).

Encoding and decoding are vectorised: one ``b"".join`` and one ``cumsum`` to encode; to decode
a batch, one gather of the rows' bytes and one ``json.loads`` per batch for JSON records.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jasper.errors import IntegrityError
from jasper.schema import RecordSpec

#: The encoding of ``None``: a byte that valid UTF-8 never contains.
NULL = b"\xff"
_NULL_BYTE = 0xFF


def _encode_one(value: Any, spec: RecordSpec, row: int) -> bytes:
    if value is None:
        if not spec.nullable:
            raise IntegrityError(f"{spec.name}[{row}] is None but {spec.name} is not nullable",
                                 array=spec.name, row=row, rule=f"{spec.name} is set for every "
                                 "row")
        return NULL
    if spec.encoding == "json":
        try:
            return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise IntegrityError(f"{spec.name}[{row}] cannot be stored as JSON: {exc}",
                                 array=spec.name, row=row, rule="JSON value") from None
    if not isinstance(value, str):
        raise IntegrityError(f"{spec.name}[{row}] is a {type(value).__name__}, expected a "
                             "string", array=spec.name, row=row, rule="string value")
    if spec.choices and value not in spec.choices:
        raise IntegrityError(f"{spec.name}[{row}] = {value!r}, expected one of {spec.choices}",
                             array=spec.name, row=row, rule=f"{spec.name} choices")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise IntegrityError(f"{spec.name}[{row}] is not encodable as UTF-8: {exc}",
                             array=spec.name, row=row, rule="UTF-8 text") from None


def encode(values: Sequence[Any], spec: RecordSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (one per row) as ``(offsets int64 [N + 1], bytes uint8)`` tensors."""
    parts = [_encode_one(v, spec, i) for i, v in enumerate(values)]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    if parts:
        np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)),
                  out=offsets[1:])
    data = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
    return torch.from_numpy(offsets), torch.from_numpy(data)


def _as_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def gather(offsets: torch.Tensor | np.ndarray, data: torch.Tensor | np.ndarray,
           rows: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The bytes of ``rows`` (int64, in range) concatenated, and their local offsets
    ``[len(rows) + 1]``: one vectorised gather, however many rows."""
    off = _as_numpy(offsets)
    starts = off[rows]
    lengths = off[rows + 1] - starts
    local = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=local[1:])
    total = int(local[-1])
    if total == 0:
        return b"", local
    # byte k of the output comes from data[starts[row of k] + (k - local[row of k])]
    index = np.repeat(starts - local[:-1], lengths) + np.arange(total, dtype=np.int64)
    buf = data.index_select(0, torch.from_numpy(index)) if isinstance(data, torch.Tensor) \
        else np.asarray(data)[index]
    return _as_numpy(buf).tobytes(), local


def decode(offsets: torch.Tensor | np.ndarray, data: torch.Tensor | np.ndarray,
           rows: np.ndarray, spec: RecordSpec) -> list[Any]:
    """The values of ``rows`` of record ``spec``, in that order (``None`` for null rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    buf, local = gather(offsets, data, rows)
    return split(buf, local, spec)


def split(buf: bytes, local: np.ndarray, spec: RecordSpec) -> list[Any]:
    """Decode concatenated row bytes ``buf`` with row offsets ``local`` (see :func:`gather`)."""
    bounds = local.tolist()
    pieces = [buf[a:b] for a, b in itertools.pairwise(bounds)]
    if spec.encoding == "json":
        try:
            texts = ["null" if p == NULL else p.decode("utf-8") for p in pieces]
            return list(json.loads("[" + ",".join(texts) + "]")) if texts else []
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise IntegrityError(f"{spec.name}: a row is not UTF-8 JSON ({exc}); run `jasper "
                                 "validate --deep` to locate it", array=spec.bytes_array,
                                 rule="JSON record") from None
    try:
        return [None if p == NULL else p.decode("utf-8") for p in pieces]
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{spec.name}: a row is not valid UTF-8 ({exc.reason}); run "
                             "`jasper validate --deep` to locate it", array=spec.bytes_array,
                             rule="records are UTF-8") from None


def check(offsets: torch.Tensor, data: torch.Tensor, spec: RecordSpec, n_rows: int,
          path: str | Path | None = None, *, decode_values: bool = True) -> None:
    """Raise :class:`IntegrityError` naming the row and the rule unless the record is sound:
    ``n_rows + 1`` offsets from 0, never decreasing, ending at the byte count; with
    ``decode_values``, every row valid UTF-8 (JSON for JSON records), non-null unless nullable,
    and one of the choices where the record has them. Decodes in chunks of rows."""
    name = spec.offsets_array
    off = _as_numpy(offsets)
    if off.shape != (n_rows + 1,):
        raise IntegrityError(f"{name} has shape {tuple(off.shape)}, expected ({n_rows + 1},) "
                             f"for {n_rows} rows", array=name, rule="record offsets rows",
                             path=path)
    if int(off[0]) != 0:
        raise IntegrityError(f"{name}[0] = {int(off[0])} but record offsets start at 0",
                             array=name, row=0, rule="record offsets start at 0", path=path)
    step = np.diff(off)
    if step.size and int(step.min()) < 0:
        row = int(np.nonzero(step < 0)[0][0]) + 1
        raise IntegrityError(f"{name}[{row}] = {int(off[row])} is smaller than {name}[{row - 1}]"
                             f" = {int(off[row - 1])}; offsets must not decrease", array=name,
                             row=row, rule="record offsets non-decreasing", path=path)
    nbytes = int(data.shape[0])
    if int(off[-1]) != nbytes:
        raise IntegrityError(f"{name}[-1] = {int(off[-1])} but {spec.bytes_array} has {nbytes} "
                             "bytes", array=name, row=n_rows, rule="record offsets end at the "
                             "byte count", path=path)
    if not decode_values:
        return
    raw = _as_numpy(data)
    chunk = 65536
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        a, b = int(off[start]), int(off[stop])
        buf = raw[a:b].tobytes()
        local = off[start : stop + 1] - a
        _check_chunk(buf, local, spec, start, path)


def _check_chunk(buf: bytes, local: np.ndarray, spec: RecordSpec, first: int,
                 path: str | Path | None) -> None:
    bounds = local.tolist()
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        piece = buf[a:b]
        row = first + i
        if piece == NULL:
            if not spec.nullable:
                raise IntegrityError(f"{spec.name}[{row}] is null but {spec.name} is not "
                                     "nullable", array=spec.bytes_array, row=row,
                                     rule=f"{spec.name} is set for every row", path=path)
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"{spec.name}[{row}] is not valid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start})", array=spec.bytes_array, row=row,
                                 rule="records are UTF-8", path=path) from None
        if spec.encoding == "json":
            try:
                json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise IntegrityError(f"{spec.name}[{row}] is not JSON: {exc}",
                                     array=spec.bytes_array, row=row, rule="JSON record",
                                     path=path) from None
        elif spec.choices and text not in spec.choices:
            raise IntegrityError(f"{spec.name}[{row}] = {text!r}, expected one of "
                                 f"{spec.choices}", array=spec.bytes_array, row=row,
                                 rule=f"{spec.name} choices", path=path)


__all__ = ["NULL", "check", "decode", "encode", "gather", "split"]
