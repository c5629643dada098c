"""Sparse teachers on disk: a whole dataset's top-k teacher, written batch by batch and read back as a stream.

``SparseTeacherWriter(path, k, values="bfloat16")`` appends ``SparseTeacher`` batches (any leading shape, stored as
[rows, k]); ``load_sparse_teachers(path)`` yields them back, batch by batch, as [rows, k] SparseTeachers (reshape
to your leading shape). ``save_sparse_teachers(path, teachers)`` writes an iterable at once.

Layout (little-endian), compact: 4 + 2 bytes per stored class (int32 index, bfloat16 or float16 value):

    header   b"KDSPARSE", version u32, k u32, value dtype u8, kind u8, tail u8, pad u8, CRC32 of the header u32
    chunk    b"CHNK", rows u64, CRC32 of rows and payload u32, payload: indices int32 [rows, k], values [rows, k]
    footer   b"END!", chunks u64, rows u64, CRC32 of the chunks' CRCs u32

Reading checks every CRC as the chunk arrives, a chunk's size against what is left of the file before reading it,
and that the file ends with its footer: a corrupted byte (a CRC mismatch, a row count larger than the file) or a
truncated file (a short chunk, no footer, a footer that does not count what was read) raises ValueError naming the
file and the chunk; nothing is yielded from a chunk that fails. Files of version 1 (whose chunk CRC covers the
payload only) are still read.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import torch

from .sparse import KINDS, SparseTeacher

MAGIC = b"KDSPARSE"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: the chunk CRC does not cover the row count
VALUE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_HEADER = struct.Struct("<8sIIBBBB")
_CHUNK = struct.Struct("<4sQI")
_FOOTER = struct.Struct("<4sQQI")
_CRC = struct.Struct("<I")


class SparseTeacherWriter:
    """Streams ``SparseTeacher`` batches into ``path`` (module docstring); use as a context manager, or call
    ``close()``: a file without its footer is rejected as truncated."""

    def __init__(self, path, k: int, values: str = "bfloat16", kind: str = "logprobs", tail: bool = True):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, got {values!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(tail, bool):
            raise TypeError(f"tail must be True or False, got {tail!r}")
        self.path, self.k, self.kind, self.tail = path, k, kind, tail
        self.dtype = VALUE_DTYPES[values]
        self.chunks = self.rows = 0
        self._crcs = 0
        self._file: BinaryIO = open(path, "wb")
        header = _HEADER.pack(MAGIC, VERSION, k, list(VALUE_DTYPES).index(values), KINDS.index(kind), int(tail), 0)
        self._file.write(header + _CRC.pack(zlib.crc32(header)))

    def write(self, teacher: SparseTeacher) -> None:
        """Appends one batch (its rows, flattened); its k, kind and tail must be the file's."""
        if not isinstance(teacher, SparseTeacher):
            raise TypeError(f"teacher must be a SparseTeacher, got {type(teacher).__name__}")
        if (teacher.k, teacher.kind, teacher.tail) != (self.k, self.kind, self.tail):
            raise ValueError(
                f"this file holds k={self.k}, kind={self.kind!r}, tail={self.tail}; got k={teacher.k}, "
                f"kind={teacher.kind!r}, tail={teacher.tail}"
            )
        flat = teacher.rows()
        indices = flat.indices.detach().cpu()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 2**31):
            raise ValueError("SparseTeacher indices must be in [0, 2^31) to be stored as int32")
        values = flat.values.detach().cpu().to(self.dtype)
        payload = (
            indices.to(torch.int32).contiguous().numpy().tobytes()
            + values.contiguous().view(torch.int16).numpy().tobytes()
        )
        rows = flat.values.shape[0]
        crc = _chunk_crc(VERSION, rows, payload)
        self._file.write(_CHUNK.pack(b"CHNK", rows, crc) + payload)
        self._crcs = zlib.crc32(_CRC.pack(crc), self._crcs)
        self.chunks += 1
        self.rows += rows

    def close(self) -> None:
        if self._file.closed:
            return
        footer = _FOOTER.pack(b"END!", self.chunks, self.rows, self._crcs)
        self._file.write(footer)
        self._file.close()

    def __enter__(self) -> SparseTeacherWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_sparse_teachers(path, teachers: Iterable[SparseTeacher], values: str = "bfloat16") -> int:
    """Writes every batch of ``teachers`` (one k, kind and tail) to ``path``; returns the number of rows."""
    writer = None
    try:
        for teacher in teachers:
            if writer is None:
                writer = SparseTeacherWriter(path, teacher.k, values, teacher.kind, teacher.tail)
            writer.write(teacher)
        if writer is None:
            raise ValueError("teachers is empty: nothing to save")
        return writer.rows
    finally:
        if writer is not None:
            writer.close()


def _chunk_crc(version: int, rows: int, payload: bytes) -> int:
    """The CRC32 a chunk stores: of its row count and payload (of the payload only in version 1)."""
    return zlib.crc32(payload, 0 if version == 1 else zlib.crc32(struct.pack("<Q", rows)))


def _read(f: BinaryIO, n: int, path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated sparse-teacher file ({what}: expected {n} bytes, found {len(data)})")
    return data


def load_sparse_teachers(path, device: torch.device | str = "cpu") -> Iterator[SparseTeacher]:
    """The batches of a file written by SparseTeacherWriter, in order, as [rows, k] SparseTeachers on ``device``
    (values as stored: bfloat16 or float16). Streams: one batch in memory at a time, checked before it is
    yielded (module docstring)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        header = _read(f, _HEADER.size, path, "header")
        magic, version, k, dtype_code, kind_code, tail, _ = _HEADER.unpack(header)
        if magic != MAGIC:
            raise ValueError(f"{path}: not a sparse-teacher file (magic {magic!r}, expected {MAGIC!r})")
        if _CRC.unpack(_read(f, _CRC.size, path, "header checksum"))[0] != zlib.crc32(header):
            raise ValueError(f"{path}: corrupted sparse-teacher file (header checksum mismatch)")
        if version not in READABLE_VERSIONS or dtype_code >= len(VALUE_DTYPES) or kind_code >= len(KINDS) or tail > 1:
            raise ValueError(
                f"{path}: unsupported sparse-teacher file (version {version}, value dtype {dtype_code}, "
                f"kind {kind_code}, tail {tail})"
            )
        dtype = list(VALUE_DTYPES.values())[dtype_code]
        chunks = rows = crcs = 0
        while True:
            tag = _read(f, 4, path, f"chunk {chunks} (no footer)")
            if tag == b"END!":
                _, total_chunks, total_rows, total_crc = _FOOTER.unpack(
                    tag + _read(f, _FOOTER.size - 4, path, "footer")
                )
                if (total_chunks, total_rows, total_crc) != (chunks, rows, crcs) or f.read(1):
                    raise ValueError(
                        f"{path}: corrupted sparse-teacher file (the footer counts {total_chunks} chunks "
                        f"and {total_rows} rows, {chunks} and {rows} were read)"
                    )
                return
            if tag != b"CHNK":
                raise ValueError(f"{path}: corrupted sparse-teacher file (chunk {chunks}: bad tag {tag!r})")
            _, n, crc = _CHUNK.unpack(tag + _read(f, _CHUNK.size - 4, path, f"chunk {chunks} header"))
            size, left = n * k * 6, end - f.tell()
            if size > left:  # checked before reading: a corrupted row count would ask for any size
                raise ValueError(
                    f"{path}: truncated or corrupted sparse-teacher file (chunk {chunks}: {n} rows of k={k} take "
                    f"{size} bytes, {left} are left)"
                )
            payload = _read(f, size, path, f"chunk {chunks} ({n} rows)")
            if _chunk_crc(version, n, payload) != crc:
                raise ValueError(f"{path}: corrupted sparse-teacher file (chunk {chunks}: checksum mismatch)")
            indices = torch.frombuffer(bytearray(payload[: n * k * 4]), dtype=torch.int32).reshape(n, k)
            values = torch.frombuffer(bytearray(payload[n * k * 4 :]), dtype=torch.int16).view(dtype).reshape(n, k)
            crcs = zlib.crc32(_CRC.pack(crc), crcs)
            chunks += 1
            rows += n
            yield SparseTeacher(indices.to(device, torch.int64), values.to(device), KINDS[kind_code], bool(tail))
