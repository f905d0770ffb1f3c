"""The MXFP4 codec used by gpt-oss checkpoints, in numpy.

Each block is 32 FP4 (E2M1) codes packed two per byte, the even element in the low nibble, sharing one E8M0
scale byte: value = FP4[code] * 2**(scale - 127). Blocks run along the input (contraction) dimension, so a weight
stored as [E, out, in] becomes `blocks` [E, out, in/32, 16] and `scales` [E, out, in/32].

Dequantization is one table lookup per byte: there are only 256 scales and 256 bytes, so a 256 KB table holds
every possible pair of BF16 results, computed once the way transformers computes them (`torch.ldexp` on the
FP4 value, then BF16).
"""

from __future__ import annotations

import numpy as np

from engine.checkpoint import bf16

BLOCK = 32
BLOCK_BYTES = 16
SCALE_BIAS = 127
# E8M0 255 is NaN in the OCP MX spec; above 252 even the code 4.0 overflows BF16 to infinity.
MAX_FINITE_SCALE = 252
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      dtype=np.float32)
_FP4_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
# Blocks decoded per step: the uint16 index (256 KB) and the output it selects (1 MB) stay in cache, and no
# index temporary grows with the tensor.
_CHUNK_BLOCKS = 8192
# Output rows decoded per step of the transposed decoder; its scratch stays small while each transposed write
# still covers whole cache lines.
_TRANSPOSE_ROWS = 256


def _build_table() -> np.ndarray:
    """(scale << 8 | byte) -> the byte's two BF16 values packed in a uint32 (low nibble in the low half)."""
    # ldexp in float64 is exact for every scale, as torch.ldexp is: zero stays zero even at scale 255 and only
    # results beyond the float range become infinite (a float32 2**128 would turn 0 * scale into NaN).
    exponents = np.arange(256)[:, None] - SCALE_BIAS
    with np.errstate(over="ignore"):
        lo = np.ldexp(FP4_VALUES[np.arange(256) & 0xF].astype(np.float64), exponents).astype(np.float32)
        hi = np.ldexp(FP4_VALUES[np.arange(256) >> 4].astype(np.float64), exponents).astype(np.float32)
    return (bf16.from_float32(lo).astype(np.uint32) | (bf16.from_float32(hi).astype(np.uint32) << 16)).reshape(-1)


# 256 scales x 256 bytes: one gather per byte yields both BF16 values, exactly as transformers computes them
# (FP4 value times a power of two, rounded once to BF16).
_TABLE = _build_table()


def _check_blocks(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1:] != (BLOCK_BYTES,):
        raise ValueError(f"blocks {blocks.shape} and scales {scales.shape} do not form MXFP4 blocks")
    return blocks, scales


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.uint16)
    if out.shape != shape or out.dtype != np.uint16:
        raise ValueError(f"out must be uint16 {shape}, got {out.dtype} {out.shape}")
    return out


def dequantize(blocks: np.ndarray, scales: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """[..., G, 16] uint8 blocks and [..., G] uint8 scales -> [..., G*32] BF16 bits (uint16).

    `out`, if given, must be C-contiguous; reusing one buffer spares the page faults of a fresh allocation.
    """
    blocks, scales = _check_blocks(blocks, scales)
    groups = blocks.shape[-2] if blocks.ndim > 1 else 1  # a lone [16] block with a scalar scale gives [32]
    out = _output(out, (*blocks.shape[:-2], groups * BLOCK))
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    flat_blocks = blocks.reshape(-1, BLOCK_BYTES)
    flat_scales = scales.reshape(-1, 1)
    pairs = out.reshape(-1).view(np.uint32).reshape(-1, BLOCK_BYTES)  # one uint32 = the two values of a byte
    index = np.empty((min(_CHUNK_BLOCKS, len(flat_blocks)), BLOCK_BYTES), dtype=np.uint16)
    for first in range(0, len(flat_blocks), _CHUNK_BLOCKS):
        last = min(first + _CHUNK_BLOCKS, len(flat_blocks))
        idx = index[: last - first]
        np.left_shift(flat_scales[first:last], 8, out=idx, dtype=np.uint16)
        np.bitwise_or(idx, flat_blocks[first:last], out=idx)
        # Every index is below 65536 = len(_TABLE); mode "clip" skips the bounds check that would buffer `out`.
        np.take(_TABLE, idx, out=pairs[first:last], mode="clip")
    return out


def dequantize_transposed(blocks: np.ndarray, scales: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """[..., R, G, 16] blocks and [..., R, G] scales -> [..., G*32, R] BF16 bits: each [out, in] matrix
    transposed to [in, out], which is the parameter layout transformers gives `gate_up_proj` / `down_proj`.

    `out` may be a strided view (e.g. a column range of a larger matrix), so threads can fill slices of one
    expert side by side.
    """
    blocks, scales = _check_blocks(blocks, scales)
    if blocks.ndim < 3:
        raise ValueError(f"blocks {blocks.shape} have no row dimension to transpose")
    *lead, rows, groups, _ = blocks.shape
    cols = groups * BLOCK
    out = _output(out, (*lead, cols, rows))
    scratch = np.empty((min(_TRANSPOSE_ROWS, rows), cols), dtype=np.uint16)
    for at in np.ndindex(*lead):
        for first in range(0, rows, _TRANSPOSE_ROWS):
            last = min(first + _TRANSPOSE_ROWS, rows)
            part = dequantize(blocks[at][first:last], scales[at][first:last], out=scratch[: last - first])
            out[at][:, first:last] = part.T
    return out


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., K] floats (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]).

    The scale is the smallest power of two that brings the block's largest magnitude within 6.0; each value is
    then rounded to the nearest FP4 magnitude. Values that MXFP4 can represent come back exactly.
    """
    x = np.asarray(values, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {BLOCK}")
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(groups).max(axis=-1)
    # The smallest k with amax <= 6 * 2**k = 0.75 * 2**(k+3), read off amax = m * 2**q (m in [0.5, 1)). No
    # division: amax / 6 underflows to zero for the smallest subnormals, which would pick scale 2**0.
    mant, exp = np.frexp(amax)
    exp = exp - 3 + (mant > 0.75)
    exp = np.where(amax > 0, exp, 0)
    exp = np.clip(exp, -SCALE_BIAS, MAX_FINITE_SCALE - SCALE_BIAS)
    scaled = groups * np.ldexp(np.float32(1), -exp)[..., None]
    codes = np.searchsorted(_FP4_MIDPOINTS, np.abs(scaled), side="left").astype(np.uint8)
    codes |= np.signbit(scaled).astype(np.uint8) << 3
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.astype(np.uint8), (exp + SCALE_BIAS).astype(np.uint8)


def bad_scale_count(scales: np.ndarray) -> int:
    """How many scale bytes fall outside the finite range (NaN or overflowing BF16)."""
    return int(np.count_nonzero(np.asarray(scales, dtype=np.uint8) > MAX_FINITE_SCALE))
