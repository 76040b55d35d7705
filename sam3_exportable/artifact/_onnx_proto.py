"""Read one ``metadata_props`` entry of an ``.onnx`` file without onnx or onnxruntime.

An ONNX model is a protobuf ``ModelProto``; its ``metadata_props`` (field 14) are
``StringStringEntryProto`` messages (``key`` field 1, ``value`` field 2). This reader walks
the top-level fields of the file and skips every other field by its length (the graph,
field 7, is never parsed), so reading the manifest of a graph costs a few reads whatever
its size, executes nothing from the file and needs only the standard library.
"""

from __future__ import annotations

import os
from typing import BinaryIO

__all__ = ["read_metadata_prop"]

_METADATA_PROPS = 14
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
#: The largest metadata value read (a manifest is a few KiB).
_MAX_VALUE = 64 << 20


def _varint(fh: BinaryIO) -> int | None:
    """The next varint, or None at the end of the file."""
    shift = result = 0
    while True:
        byte = fh.read(1)
        if not byte:
            if shift:
                raise ValueError("truncated varint")
            return None
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _entry(payload: bytes) -> tuple[str, str]:
    """``(key, value)`` of a ``StringStringEntryProto``."""
    fields: dict[int, bytes] = {}
    pos = 0
    while pos < len(payload):
        tag, pos = _varint_at(payload, pos)
        if tag & 7 != _LEN:
            raise ValueError("unexpected wire type in a metadata entry")
        size, pos = _varint_at(payload, pos)
        fields[tag >> 3] = payload[pos : pos + size]
        pos += size
    return fields.get(1, b"").decode("utf-8"), fields.get(2, b"").decode("utf-8")


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def read_metadata_prop(path: str | os.PathLike[str], key: str) -> str | None:
    """The value of ``metadata_props[key]`` in the ONNX model at ``path``, or None.

    Raises ``ValueError`` when the file is not a well-formed protobuf message (a foreign or
    truncated file), ``OSError`` when it cannot be read.
    """
    found: str | None = None
    with open(path, "rb") as fh:
        end = os.fstat(fh.fileno()).st_size
        while (tag := _varint(fh)) is not None:
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise ValueError("field number 0")
            if wire == _VARINT:
                if _varint(fh) is None:
                    raise ValueError("truncated varint")
            elif wire == _I64:
                fh.seek(8, os.SEEK_CUR)
            elif wire == _I32:
                fh.seek(4, os.SEEK_CUR)
            elif wire == _LEN:
                size = _varint(fh)
                if size is None or fh.tell() + size > end:
                    raise ValueError("a field runs past the end of the file")
                if number == _METADATA_PROPS and size <= _MAX_VALUE:
                    entry_key, value = _entry(fh.read(size))
                    if entry_key == key:
                        found = value  # protobuf: the last occurrence wins
                else:
                    fh.seek(size, os.SEEK_CUR)
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if fh.tell() > end:
                raise ValueError("a field runs past the end of the file")
    return found
