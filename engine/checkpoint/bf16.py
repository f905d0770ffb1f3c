"""BF16 as numpy uint16 bit patterns (numpy has no bfloat16 dtype)."""

from __future__ import annotations

import numpy as np


def from_float32(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest BF16, ties to even (what torch's `.to(torch.bfloat16)` does); NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
