import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.safetensors_io import ShardWriter, iter_rows, read_header, read_tensor


def _write(path, tensors):
    with ShardWriter(path, [(n, d, a.shape) for n, d, a in tensors]) as w:
        for _, _, array in tensors:
            for row in array.reshape(array.shape[0], -1) if array.ndim else [array]:
                w.write(row)  # many small pieces, as the synthesizer writes them


def test_streamed_shard_reads_back_with_the_reference_library(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = np.arange(10, dtype=np.uint8)
    _write(tmp_path / "x.safetensors", [("a", "F32", a), ("b", "U8", b)])
    loaded = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    np.testing.assert_array_equal(read_tensor(header.tensors["a"], header.path), a)
    rows = list(iter_rows(header.tensors["a"], header.path, rows_per_chunk=1))
    assert [r.shape for r in rows] == [(1, 3, 4), (1, 3, 4)]


def test_writer_refuses_short_and_long_writes(tmp_path):
    w = ShardWriter(tmp_path / "s.safetensors", [("a", "U8", (4,))])
    w.write(b"\x00\x01")
    with pytest.raises(ValueError, match="was not written in full"):
        w.close()
    assert not (tmp_path / "s.safetensors").exists(), "an incomplete shard must never appear under its real name"
    w = ShardWriter(tmp_path / "s.safetensors", [("a", "U8", (1,))])
    with pytest.raises(ValueError, match="more bytes written"):
        w.write(b"\x00\x01")
    w.abort()


def _raw_shard(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_header_problems_are_all_reported(tmp_path):
    path = tmp_path / "bad.safetensors"
    _raw_shard(path, {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "Q4", "shape": [2], "data_offsets": [8, 10]},
        "c": {"dtype": "U8", "shape": [3], "data_offsets": [8, 10]},
    }, b"\x00" * 8)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    text = "\n".join(err.value.problems)
    assert "unknown dtype 'Q4'" in text
    assert "tensor c spans 2 bytes but U8[3] needs 3" in text


def test_gap_overlap_and_trailing_bytes(tmp_path):
    path = tmp_path / "gap.safetensors"
    _raw_shard(path, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\x00" * 5)
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert any("leaves a gap of 2 bytes" in p for p in err.value.problems)
    assert any("1 unexpected trailing bytes" in p for p in err.value.problems)
