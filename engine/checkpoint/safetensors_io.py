"""The safetensors file format, read and written without loading tensors whole.

Format: an 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}` (plus an
optional `__metadata__` of strings), then the tensor bytes. We parse headers ourselves so that inspecting a 65 GB
checkpoint reads kilobytes, and write shards as streams so that synthesizing one never holds a tensor in memory.
BF16 has no numpy dtype: it travels as uint16 bit patterns.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.inventory import DTYPE_BYTES

# The reference implementation refuses headers over 100 MB; a real gpt-oss shard header is about 20 kB.
MAX_HEADER_BYTES = 100_000_000
NUMPY_DTYPES = {
    "BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I8": np.int8,
    "I32": np.int32, "I64": np.int64, "U16": np.uint16, "BOOL": np.bool_,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check a shard's header against its size; raises CheckpointError naming every problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError([f"{path.name}: truncated shard ({size} bytes, no header length)"])
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError([f"{path.name}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"])
            if 8 + n > size:
                raise CheckpointError([f"{path.name}: truncated shard: header claims {n} bytes but the file has "
                                       f"{size - 8} after the length"])
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError([f"{path.name}: corrupt safetensors header (not JSON: {exc})"]) from None
    if not isinstance(doc, dict):
        raise CheckpointError([f"{path.name}: corrupt safetensors header (not a JSON object)"])

    problems: list[str] = []
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        problems.append(f"{path.name}: __metadata__ must map strings to strings")
        metadata = {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in doc.items():
        entry = _parse_entry(path.name, name, info, data_start, problems)
        if entry is not None:
            tensors[name] = entry
            spans.append((entry.start - data_start, entry.end - data_start, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            kind = "overlaps the previous tensor" if begin < cursor else f"leaves a gap of {begin - cursor} bytes"
            problems.append(f"{path.name}: tensor {name} {kind}")
        cursor = max(cursor, end)
    if cursor > data_len:
        problems.append(
            f"{path.name}: truncated shard: tensors need {cursor} bytes of data but the file holds {data_len}"
        )
    elif cursor < data_len:
        problems.append(f"{path.name}: {data_len - cursor} unexpected trailing bytes after the last tensor")
    if problems:
        raise CheckpointError(problems)
    return ShardHeader(path, tensors, dict(metadata))


def _parse_entry(shard: str, name: str, info: object, data_start: int, problems: list[str]) -> TensorEntry | None:
    if not isinstance(info, dict):
        problems.append(f"{shard}: header entry {name!r} is not an object")
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        problems.append(f"{shard}: tensor {name} has unknown dtype {dtype!r}")
        return None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        problems.append(f"{shard}: tensor {name} has an invalid shape {shape!r}")
        return None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        problems.append(f"{shard}: tensor {name} has invalid data_offsets {offsets!r}")
        return None
    expected = prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        problems.append(
            f"{shard}: tensor {name} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}"
        )
        return None
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_tensor(entry: TensorEntry, path: str | Path) -> np.ndarray:
    """Load one tensor (BF16 as uint16 bits). For whole-model streaming use `iter_rows`."""
    with Path(path).open("rb") as f:
        f.seek(entry.start)
        buf = f.read(entry.nbytes)
    if len(buf) != entry.nbytes:
        raise CheckpointError([f"{Path(path).name}: tensor {entry.name} is cut short"])
    return np.frombuffer(buf, dtype=NUMPY_DTYPES[entry.dtype]).reshape(entry.shape)


def iter_rows(entry: TensorEntry, path: str | Path, rows_per_chunk: int) -> Iterator[np.ndarray]:
    """Yield a tensor in slices along its first axis, holding at most `rows_per_chunk` rows at a time."""
    row_shape = entry.shape[1:]
    row_bytes = prod(row_shape) * DTYPE_BYTES[entry.dtype]
    total_rows = entry.shape[0] if entry.shape else 1
    with Path(path).open("rb") as f:
        f.seek(entry.start)
        for first in range(0, total_rows, rows_per_chunk):
            count = min(rows_per_chunk, total_rows - first)
            buf = f.read(count * row_bytes)
            if len(buf) != count * row_bytes:
                raise CheckpointError([f"{Path(path).name}: tensor {entry.name} is cut short"])
            yield np.frombuffer(buf, dtype=NUMPY_DTYPES[entry.dtype]).reshape((count, *row_shape))


class ShardWriter:
    """Writes one safetensors file as a stream: the header first (all shapes are known), then tensor bytes in
    declaration order, in as many pieces as the caller likes."""

    def __init__(self, path: str | Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in specs:
            nbytes = prod(shape) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, nbytes))
            offset += nbytes
        self.data_bytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header with spaces to an 8-byte boundary
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = self._tmp.open("wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._index = 0
        self._left = self._sizes[0][1] if self._sizes else 0

    @property
    def current(self) -> str | None:
        return self._sizes[self._index][0] if self._index < len(self._sizes) else None

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes to the current tensor; moves on to the next tensor when this one is full."""
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        while buf.nbytes:
            if self._index >= len(self._sizes):
                raise ValueError(f"{self.path.name}: more bytes written than the header declares")
            take = min(self._left, buf.nbytes)
            self._file.write(buf[:take])
            buf = buf[take:]
            self._left -= take
            while self._left == 0 and self._index < len(self._sizes):
                self._index += 1
                self._left = self._sizes[self._index][1] if self._index < len(self._sizes) else 0

    def close(self) -> None:
        """Finish the file; it appears under its real name only when complete."""
        self._file.close()
        if self._index < len(self._sizes):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path.name}: tensor {self.current} was not written in full")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
