"""PostgreSQL's binary COPY format, written by hand: a stream of tuples the server reads without parsing text.

Pure and dependency-free (struct only), so the page-decoding process imports it in milliseconds. A stream is
``HEADER``, then per tuple a 16-bit field count and per field a 32-bit length (-1 for NULL) and the value in
the type's binary send format, then ``TRAILER``. Element type OIDs are PostgreSQL's built-in ones, fixed
since 7.x (pg_type.dat): an array value names its element type and the server refuses a mismatch.

Two encoders: :class:`RowPacker` packs rows of fixed-width columns with one precompiled ``struct`` call per
row (one compiled format per pattern of NULLs, cached), for the decoder's fast path; :func:`encode_rows`
encodes any row tuple column by column (slower, for pages the fast path hands to the old normalizer).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import is_
from typing import Any

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
NULL = struct.pack(">i", -1)

# Built-in type OIDs (src/include/catalog/pg_type.dat).
BOOL_OID = 16
INT8_OID = 20
INT2_OID = 21
INT4_OID = 23
TEXT_OID = 25
FLOAT8_OID = 701

# Column kinds, by struct code: the width of the value follows from it.
INT2, INT4, INT8, FLOAT8, BOOL = "h", "i", "q", "d", "?"
TEXT = "text"
FLOAT8_ARRAY = "float8[]"
TEXT_ARRAY = "text[]"
_WIDTH = {INT2: 2, INT4: 4, INT8: 8, FLOAT8: 8, BOOL: 1}

_I32 = struct.Struct(">i")
_ARRAY_HEAD = struct.Struct(">iiiii")  # ndim, has-null flag, element OID, length, lower bound
_NONES = repeat(None)
# map(_none_to_empty, values, values): None becomes b"" (consumed by a zero-width "0s"), the rest stay.
_none_to_empty = {None: b""}.get


def stream(tuples: Iterable[bytes]) -> bytes:
    """A complete COPY stream of already encoded tuples."""
    return b"".join((HEADER, *tuples, TRAILER))


class RowPacker:
    """Packs rows of fixed-width columns (``kinds``: INT2/INT4/INT8/FLOAT8/BOOL), NULLs included.

    ``fields`` is the tuple's field count, when the caller appends further (variable-width) fields itself.
    Each pattern of NULLs gets one compiled format whose NULL columns are ``i0s`` (length -1 and an empty
    value), so every column is two arguments and the values drop into a template with one slice assignment.
    """

    def __init__(self, kinds: str, fields: int | None = None) -> None:
        self.kinds = kinds
        self.fields = len(kinds) if fields is None else fields
        self._by_nulls: dict[tuple[bool, ...], tuple[struct.Struct, list[Any]]] = {}
        self._full = self._compile((False,) * len(kinds))

    def _compile(self, nulls: tuple[bool, ...]) -> tuple[struct.Struct, list[Any]]:
        fmt: list[str] = [">h"]
        template: list[Any] = [self.fields]
        for kind, null in zip(self.kinds, nulls, strict=True):
            if null:
                fmt.append("i0s")
                template += [-1, b""]
            else:
                fmt.append("i" + kind)
                template += [_WIDTH[kind], None]
        compiled = (struct.Struct("".join(fmt)), template)
        self._by_nulls[nulls] = compiled
        return compiled

    def pack(self, values: list[Any]) -> bytes:
        """One tuple's fixed-width fields; ``values`` in column order, None for NULL (range-checked by struct)."""
        if None not in values:  # the common row: no pattern to look up, no value to replace
            packer, template = self._full
            args = template.copy()
            args[2::2] = values
            return packer.pack(*args)
        nulls = tuple(map(is_, values, _NONES))
        packer, template = self._by_nulls.get(nulls) or self._compile(nulls)
        args = template.copy()
        args[2::2] = map(_none_to_empty, values, values)
        return packer.pack(*args)


def text_field(value: str | None) -> bytes:
    """A text field (length and UTF-8 bytes), or NULL."""
    if value is None:
        return NULL
    data = value.encode()
    return _I32.pack(len(data)) + data


def text_array(values: Sequence[str | None]) -> bytes:
    """A one-dimensional text[] field."""
    parts = [text_field(v) for v in values]
    has_null = any(v is None for v in values)
    body = b"".join((_ARRAY_HEAD.pack(1, has_null, TEXT_OID, len(values), 1), *parts))
    return _I32.pack(len(body)) + body


def _float8_element(value: float | None) -> bytes:
    return NULL if value is None else struct.pack(">id", 8, value)


def float8_array(values: Sequence[float | None]) -> bytes:
    """A one-dimensional float8[] field (ints are widened to float, as the server would)."""
    if None in values:
        elements = b"".join(_float8_element(v) for v in values)
        has_null = True
    else:
        elements = struct.pack(">" + "id" * len(values), *_interleave(8, values))
        has_null = False
    body = _ARRAY_HEAD.pack(1, has_null, FLOAT8_OID, len(values), 1) + elements
    return _I32.pack(len(body)) + body


def _interleave(width: int, values: Sequence[Any]) -> list[Any]:
    out: list[Any] = [width] * (2 * len(values))
    out[1::2] = values
    return out


_SCALAR = {kind: struct.Struct(">i" + kind) for kind in _WIDTH}


def field(kind: str, value: Any) -> bytes:
    """One field of any kind, column by column (the slow path)."""
    if value is None:
        return NULL
    if kind == TEXT:
        return text_field(value)
    if kind == FLOAT8_ARRAY:
        return float8_array(value)
    if kind == TEXT_ARRAY:
        return text_array(value)
    if kind == FLOAT8:
        value = float(value)  # an int in a double precision column (OverflowError beyond a double)
    return _SCALAR[kind].pack(_WIDTH[kind], value)


def encode_row(kinds: Sequence[str], row: Sequence[Any], fields: int | None = None) -> bytes:
    """One tuple, field by field; ``fields`` as for :class:`RowPacker`."""
    count = len(kinds) if fields is None else fields
    return struct.pack(">h", count) + b"".join(field(k, v) for k, v in zip(kinds, row, strict=True))


def encode_rows(kinds: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """A complete COPY stream of ``rows`` (tuples in the order of ``kinds``)."""
    return stream(encode_row(kinds, row) for row in rows)
