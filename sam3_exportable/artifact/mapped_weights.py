"""Weights of a ``.pt2`` mapped from the file instead of copied (used by :mod:`.fast_load`).

``torch.export.save`` stores every record uncompressed and 64-byte aligned, so each record is
a byte range of the file; the whole file is mapped once, copy-on-write
(``torch.UntypedStorage.from_file(path, shared=False)``: ``MAP_PRIVATE``), and each record
becomes a slice of that storage. Writes to the tensors never reach the file. The mapping only
serves archives opened from the path the scope was opened for, by the thread that opened
it, whose record offsets and sizes agree with our own reading of the zip directory; anything
else (other threads, compressed or misaligned records, non-CPU tensors) goes to torch's own
copying builder.
"""

from __future__ import annotations

import os
import threading
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["_OWNED", "_MappedFile", "_mapped_build_file_map"]


@dataclass
class _MappedFile:
    """One copy-on-write mapping of a zip written by torch, and where its records lie."""

    path: str
    records: dict[str, tuple[int, int]]  # record name (archive prefix removed) -> (offset, size)
    storage: torch.UntypedStorage | None = None
    mapped_records: int = 0

    @classmethod
    def open(cls, path: str) -> _MappedFile:
        records: dict[str, tuple[int, int]] = {}
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            for info in infos:
                _, sep, name = info.filename.partition("/")
                if not sep or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                    continue  # not addressable as raw bytes: torch's builder will copy it
                fh.seek(info.header_offset)
                header = fh.read(30)
                if len(header) != 30 or header[:4] != b"PK\x03\x04":
                    continue
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                records[name] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
        return cls(path=path, records=records)

    def whole(self) -> torch.UntypedStorage:
        if self.storage is None:
            size = os.path.getsize(self.path)
            # shared=False: MAP_PRIVATE, pages are read lazily and writes stay in this process
            self.storage = torch.UntypedStorage.from_file(self.path, False, size)
        return self.storage


_OWNED = threading.local()  # .mapped: _MappedFile | None, for the thread that opened the scope


def _mapped_build_file_map(real: Callable[..., dict[str, torch.Tensor]], serialize: types.ModuleType):
    def _build_file_map(archive_reader: Any, config: Any, base_dir: str) -> dict[str, torch.Tensor]:
        mapped: _MappedFile | None = getattr(_OWNED, "mapped", None)
        if mapped is None:
            return real(archive_reader, config, base_dir)
        reader = archive_reader.archive_file
        plan: dict[str, tuple[Any, torch.dtype, int, int]] = {}  # path_name -> (meta, dtype, offset, size)
        for meta in config.config.values():
            if meta.use_pickle or meta.path_name in plan:
                continue
            record = os.path.join(base_dir, meta.path_name)
            if meta.tensor_meta is None or record not in mapped.records:
                return real(archive_reader, config, base_dir)
            dtype = serialize.deserialize_scalar_type(meta.tensor_meta.dtype)
            if serialize.deserialize_device(meta.tensor_meta.device) != torch.device("cpu"):
                return real(archive_reader, config, base_dir)
            offset, size = mapped.records[record]
            # the archive torch opened must be the file we mapped, record for record
            same = reader.get_record_size(record) == size
            if not same or (size and reader.get_record_offset(record) != offset):
                return real(archive_reader, config, base_dir)
            element = torch.empty((), dtype=dtype).element_size()
            if size % element or offset % element:
                return real(archive_reader, config, base_dir)
            plan[meta.path_name] = (meta, dtype, offset, size)
        file_map: dict[str, torch.Tensor] = {}
        for path_name, (meta, dtype, offset, size) in plan.items():
            if size == 0:
                tensor = torch.zeros(serialize.deserialize_size(meta.tensor_meta.sizes), dtype=dtype)
            else:
                numel = size // torch.empty((), dtype=dtype).element_size()
                tensor = torch.empty(0, dtype=dtype)
                tensor.set_(mapped.whole()[offset : offset + size], 0, (numel,), (1,))
                mapped.mapped_records += 1
            if meta.tensor_meta.requires_grad:
                tensor.requires_grad_(True)
            file_map[path_name] = tensor
        return file_map

    return _build_file_map
