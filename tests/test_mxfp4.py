import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.checkpoint import bf16, mxfp4


def _transformers_bits(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What transformers loads: [E, out, G, 16] -> BF16 [E, in, out], as uint16 bit patterns."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.bfloat16)
    return out.view(torch.uint16).numpy()


def test_random_blocks_match_transformers_bit_for_bit():
    rng = np.random.default_rng(0)
    # More blocks than one decode chunk and more rows than one transposed step, neither a multiple of them.
    blocks = rng.integers(0, 256, (3, 300, 11, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (3, 300, 11), dtype=np.uint8)
    expected = _transformers_bits(blocks, scales)
    assert np.array_equal(mxfp4.dequantize(blocks, scales).transpose(0, 2, 1), expected)
    assert np.array_equal(mxfp4.dequantize_transposed(blocks, scales), expected)


def test_every_scale_and_byte_matches_transformers():
    # Row s holds all 256 byte values under scale s, for every scale including the non-finite 253..255.
    blocks = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (1, 256, 16, 16)).copy()
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (1, 256, 16)).copy()
    ours = mxfp4.dequantize_transposed(blocks, scales)
    assert np.array_equal(ours, _transformers_bits(blocks, scales))
    values = bf16.to_float32(ours[0])  # [in, scale]
    assert not np.isnan(values).any()  # zero times 2**128 is still zero, as torch.ldexp computes it
    assert np.isfinite(values[:, : mxfp4.MAX_FINITE_SCALE + 1]).all()
    assert np.isinf(values[:, mxfp4.MAX_FINITE_SCALE + 1 :]).any()


def test_nibble_order_and_scale_semantics():
    blocks = np.zeros((1, 1, 16), dtype=np.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0) is element 0, high nibble 7 (6.0) is element 1
    blocks[0, 0, 1] = 0xF9  # -0.5 then -6.0
    scales = np.array([[128]], dtype=np.uint8)  # times 2
    values = bf16.to_float32(mxfp4.dequantize(blocks, scales))[0]
    assert values[:4].tolist() == [2.0, 12.0, -1.0, -12.0]
    assert not values[4:].any()
    lone = mxfp4.dequantize(blocks[0, 0], scales[0, 0])  # one [16] block with a scalar scale
    assert lone.shape == (32,) and np.array_equal(lone, mxfp4.dequantize(blocks, scales)[0])


def test_out_buffers_are_filled_in_place_and_checked():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (40, 3, 16), dtype=np.uint8)
    scales = rng.integers(110, 130, (40, 3), dtype=np.uint8)
    buffer = np.empty((40, 96), dtype=np.uint16)
    assert mxfp4.dequantize(blocks, scales, out=buffer) is buffer
    assert np.array_equal(buffer, mxfp4.dequantize(blocks, scales))
    # A column band of a larger matrix: how the expander lets threads share one expert's output.
    wide = np.zeros((96, 50), dtype=np.uint16)
    mxfp4.dequantize_transposed(blocks, scales, out=wide[:, 5:45])
    assert np.array_equal(wide[:, 5:45], buffer.T)
    assert not wide[:, :5].any() and not wide[:, 45:].any()
    with pytest.raises(ValueError, match="out must be"):
        mxfp4.dequantize(blocks, scales, out=np.empty((40, 95), dtype=np.uint16))
    with pytest.raises(ValueError, match="C-contiguous"):
        mxfp4.dequantize(blocks, scales, out=np.empty((96, 40), dtype=np.uint16).T)
    with pytest.raises(ValueError, match="do not form MXFP4 blocks"):
        mxfp4.dequantize(blocks, scales[:, :2])
    with pytest.raises(ValueError, match="no row dimension"):
        mxfp4.dequantize_transposed(blocks[0], scales[0])


_codes = hnp.arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 3), st.just(16)))


@settings(deadline=None, max_examples=200)
@given(blocks=_codes, data=st.data())
def test_representable_values_round_trip_exactly(blocks, data):
    scales = data.draw(hnp.arrays(np.uint8, blocks.shape[:-1], elements=st.integers(0, mxfp4.MAX_FINITE_SCALE)))
    bits = mxfp4.dequantize(blocks, scales)
    values = bf16.to_float32(bits)  # exact: every finite MXFP4 value is a BF16 value
    again = mxfp4.dequantize(*mxfp4.quantize(values))
    assert np.array_equal(again, bits)  # bit patterns, so +0 and -0 must survive too


def _half_step(magnitude: np.ndarray) -> np.ndarray:
    """Half the FP4 grid spacing around a magnitude already divided by its scale (grid gaps 0.5, 1, 2)."""
    return np.select([magnitude <= 2, magnitude <= 4], [0.25, 0.5], 1.0)


# Up to 2**120: beyond 6 * 2**125 MXFP4 saturates, so there is no half-step bound to hold; subnormals included.
_floats = st.floats(-(2.0**120), 2.0**120, allow_nan=False, width=32)


@settings(deadline=None, max_examples=200)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64, 96])), elements=_floats))
def test_quantize_error_is_within_half_a_step_of_the_scale(x):
    blocks, scales = mxfp4.quantize(x)
    back = bf16.to_float32(mxfp4.dequantize(blocks, scales)).astype(np.float64)
    scale = np.ldexp(1.0, scales.astype(np.int64) - mxfp4.SCALE_BIAS)
    scale = np.repeat(scale, mxfp4.BLOCK, axis=-1)
    magnitude = np.abs(x.astype(np.float64)) / scale
    assert (magnitude <= 6).all()
    assert (np.abs(back - x) <= _half_step(magnitude) * scale).all()
    # The scale is the smallest that fits: half of it would push the block's largest value past 6.
    amax = magnitude.reshape(*scales.shape, mxfp4.BLOCK).max(axis=-1)
    assert ((amax * 2 > 6) | (scales == 0) | (amax == 0)).all()


def test_quantize_rejects_ragged_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(np.zeros((2, 48), dtype=np.float32))


def test_bad_scale_count_flags_scales_that_decode_to_inf_or_nan():
    scales = np.array([[0, 127, 252], [253, 254, 255]], dtype=np.uint8)
    assert mxfp4.bad_scale_count(scales) == 3
    assert mxfp4.bad_scale_count(scales[:1]) == 0
    top = np.full((1, 16), 0x66, dtype=np.uint8)  # code 4.0 twice
    assert np.isinf(bf16.to_float32(mxfp4.dequantize(top, np.array([253], dtype=np.uint8)))).all()
    assert np.isfinite(bf16.to_float32(mxfp4.dequantize(top, np.array([252], dtype=np.uint8)))).all()
