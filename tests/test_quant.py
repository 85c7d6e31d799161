"""Bit-exact tests of dsv4jax.quant against independent formulas (ARCHITECTURE §10.2, ARCHITECTURE §10.3).

The references here decode formats from sign/exponent/mantissa arithmetic and round by brute-force nearest grid point
(ties to the even code), sharing nothing with the implementation's bit tricks.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv4jax import quant

SCALE_BYTES = np.arange(100, 155)  # 2^-27 .. 2^27
# jit once per shape: eager dispatch compiles every primitive separately, which dominates the run time on CPU.
FP8_QDQ = jax.jit(quant.fp8_qdq, static_argnums=1)
FP4_QDQ = jax.jit(quant.fp4_qdq, static_argnums=1)
HADAMARD = jax.jit(quant.hadamard)


# --------------------------------------------------------------------------------------------------------------------
# independent references


def decode_e4m3(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * (mantissa / 8) * 2.0**-6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def decode_e2m1(code: int) -> float:
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


E4M3_TABLE = np.array([decode_e4m3(c) for c in range(256)])
E2M1_TABLE = np.array([decode_e2m1(c) for c in range(16)])
# Non-negative finite grid points in code order (= increasing value), so index parity = mantissa parity.
E4M3_GRID = E4M3_TABLE[:0x7F]
E2M1_GRID = E2M1_TABLE[:8]


def e8m0_value(byte) -> np.ndarray:
    return np.where(np.asarray(byte) == 255, np.nan, 2.0 ** (np.asarray(byte, dtype=np.float64) - 127))


def assert_bitwise_equal(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, expected.dtype)
    np.testing.assert_array_equal(np.isnan(actual.astype(np.float32)), np.isnan(expected.astype(np.float32)))
    finite = ~np.isnan(expected.astype(np.float32))
    uint = {4: np.uint32, 2: np.uint16, 1: np.uint8}[actual.dtype.itemsize]
    mismatch = np.flatnonzero((actual.view(uint) != expected.view(uint)) & finite)
    assert mismatch.size == 0, (
        f"{mismatch.size} mismatches, first at {mismatch[0]}: "
        f"{actual.reshape(-1)[mismatch[0]]!r} != {expected.reshape(-1)[mismatch[0]]!r}"
    )


def nearest_on_grid(magnitude: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Brute-force nearest grid point of |y| (float64), ties to the even code."""
    upper = np.clip(np.searchsorted(grid, magnitude), 1, len(grid) - 1)
    lower = upper - 1
    d_lower, d_upper = magnitude - grid[lower], grid[upper] - magnitude
    pick_upper = (d_upper < d_lower) | ((d_upper == d_lower) & (upper % 2 == 0))
    return grid[np.where(pick_upper, upper, lower)]


def reference_qdq(x: np.ndarray, block: int, grid: np.ndarray, amax_floor: float) -> np.ndarray:
    """ARCHITECTURE §10.3 literally: s = 2^ceil(log2(max(amax, floor)/max)) in fp32, nearest-even of clamp(x/s), times s."""
    format_max = grid[-1]
    values = x.astype(np.float64).reshape(-1, block)
    amax = np.abs(values).max(axis=1).astype(np.float32)
    quotient = np.maximum(amax, np.float32(amax_floor)) / np.float32(format_max)  # fp32 division
    scale = 2.0 ** np.ceil(np.log2(quotient.astype(np.float64)))[:, None]
    y = np.clip(values / scale, -format_max, format_max)
    out = np.copysign(nearest_on_grid(np.abs(y), grid), y) * scale
    return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# FP8 / FP4 weight dequantisation (ARCHITECTURE §10.2)


def test_dequantize_fp8_all_codes_times_scales():
    codes = np.tile(np.arange(256, dtype=np.uint8), (len(SCALE_BYTES), 1)).view(ml_dtypes.float8_e4m3fn)
    scale = np.repeat(SCALE_BYTES.astype(np.uint8)[:, None], 2, axis=1).view(ml_dtypes.float8_e8m0fnu)
    got = quant.dequantize_fp8(codes, scale, block=(1, 128))
    expected = (E4M3_TABLE[None, :] * e8m0_value(SCALE_BYTES)[:, None]).astype(np.float32)
    assert_bitwise_equal(got, expected)
    assert np.isnan(got[:, [0x7F, 0xFF]]).all() and np.signbit(got[:, 0x80]).all()


def test_dequantize_fp8_partial_blocks_and_extreme_scales():
    rng = np.random.default_rng(0)
    rows, cols = 200, 300  # not multiples of 128
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    scale_bytes = rng.integers(100, 155, (2, 3)).astype(np.uint8)
    got = quant.dequantize_fp8(codes.view(ml_dtypes.float8_e4m3fn), scale_bytes.view(ml_dtypes.float8_e8m0fnu))
    block_scale = e8m0_value(scale_bytes)[np.arange(rows)[:, None] // 128, np.arange(cols)[None, :] // 128]
    assert_bitwise_equal(got, (E4M3_TABLE[codes] * block_scale).astype(np.float32))
    # scale byte 0 is 2^-127 (an fp32 subnormal), 255 is NaN
    extremes = np.array([[0, 1, 127, 200, 255]], dtype=np.uint8)
    one = np.full((1, 5), 0x38, dtype=np.uint8)  # e4m3 1.0
    got = quant.dequantize_fp8(one.view(ml_dtypes.float8_e4m3fn), extremes.view(ml_dtypes.float8_e8m0fnu), (1, 1))
    assert_bitwise_equal(got, e8m0_value(extremes).astype(np.float32))


def test_dequantize_fp8_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match="scale shape"):
        quant.dequantize_fp8(np.zeros((256, 256), np.uint8), np.zeros((2, 3), np.uint8))


def test_dequantize_fp4_all_codes_both_nibbles_times_scales():
    # every byte value = every (low code, high code) pair
    packed = np.tile(np.arange(256, dtype=np.uint8), (len(SCALE_BYTES), 1)).view(np.int8)
    scale = np.repeat(SCALE_BYTES.astype(np.uint8)[:, None], 512 // 32, axis=1).view(ml_dtypes.float8_e8m0fnu)
    got = quant.dequantize_fp4(packed, scale)
    byte = np.arange(256)
    element_codes = np.stack([byte & 0xF, byte >> 4], axis=1).reshape(-1)  # element 2c = low nibble, 2c+1 = high
    expected = (E2M1_TABLE[element_codes][None, :] * e8m0_value(SCALE_BYTES)[:, None]).astype(np.float32)
    assert_bitwise_equal(got, expected)


def test_dequantize_fp4_partial_block():
    rng = np.random.default_rng(1)
    packed = rng.integers(-128, 128, (3, 24), dtype=np.int8)  # 48 elements: one full and one half 32-block
    scale_bytes = rng.integers(100, 155, (3, 2)).astype(np.uint8)
    got = quant.dequantize_fp4(packed, scale_bytes.view(ml_dtypes.float8_e8m0fnu))
    u = packed.view(np.uint8).astype(np.int64)
    element_codes = np.stack([u & 0xF, u >> 4], axis=-1).reshape(3, 48)
    expected = E2M1_TABLE[element_codes] * e8m0_value(scale_bytes)[:, np.arange(48) // 32]
    assert_bitwise_equal(got, expected.astype(np.float32))


# --------------------------------------------------------------------------------------------------------------------
# weight quantisation round trips


def test_fp8_round_trip_is_exact_on_representable_weights():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, (300, 200), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes
    # scales large enough that no block hits the 1e-4 amax floor
    scale_bytes = rng.integers(110, 150, (3, 2)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    weight = quant.dequantize_fp8(codes.view(ml_dtypes.float8_e4m3fn), scale_bytes)
    for dtype in (np.float32, ml_dtypes.bfloat16):  # e4m3 values times 2^k are exact in bf16 too
        codes2, scale2 = quant.quantize_fp8(weight.astype(dtype))
        assert codes2.dtype == ml_dtypes.float8_e4m3fn and scale2.dtype == ml_dtypes.float8_e8m0fnu
        assert scale2.shape == (3, 2)
        assert_bitwise_equal(quant.dequantize_fp8(codes2, scale2), weight)


def test_fp8_quantize_error_within_half_ulp_and_idempotent():
    rng = np.random.default_rng(3)
    rows, cols = 260, 390
    magnitudes = 10.0 ** rng.uniform(-7, 7, (rows // 10 + 1, 1)).repeat(10, axis=0)[:rows]
    w = (rng.standard_normal((rows, cols)) * magnitudes * 2.0 ** rng.uniform(-12, 0, (rows, cols))).astype(np.float32)
    w[:128, :128] = 0.0  # all-zero block: amax floor
    codes, scale = quant.quantize_fp8(w)
    dq = quant.dequantize_fp8(codes, scale)

    block_scale = e8m0_value(scale.view(np.uint8))[np.arange(rows)[:, None] // 128, np.arange(cols)[None, :] // 128]
    # the scale is the smallest power of two with amax/s <= 448 (above the floor)
    amax = np.zeros(scale.shape)
    np.maximum.at(amax, (np.arange(rows)[:, None] // 128, np.arange(cols)[None, :] // 128), np.abs(w))
    s = e8m0_value(scale.view(np.uint8))
    assert np.all(np.maximum(amax, np.float32(1e-4)) / s <= 448)
    assert np.all(np.maximum(amax, np.float32(1e-4)) / s > 224)

    y = np.abs(w.astype(np.float64)) / block_scale
    exponent = np.floor(np.log2(np.where(y > 0, y, 1.0)))
    half_ulp = 2.0 ** (np.maximum(exponent, -6) - 4) * block_scale  # e4m3 step is 2^(e-3)
    assert np.all(np.abs(dq.astype(np.float64) - w) <= half_ulp)

    assert_bitwise_equal(quant.dequantize_fp8(*quant.quantize_fp8(dq)), dq)


def test_fp4_round_trip_is_exact_on_representable_weights():
    rng = np.random.default_rng(4)
    packed = rng.integers(-128, 128, (64, 96), dtype=np.int8)
    scale_bytes = rng.integers(10, 240, (64, 192 // 32)).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
    weight = quant.dequantize_fp4(packed, scale_bytes)
    packed2, scale2 = quant.quantize_fp4(weight)
    assert packed2.dtype == np.int8 and packed2.shape == packed.shape and scale2.shape == scale_bytes.shape
    assert_bitwise_equal(quant.dequantize_fp4(packed2, scale2), weight)  # -0 codes included


def test_fp4_quantize_error_within_half_ulp_and_idempotent():
    rng = np.random.default_rng(5)
    rows, cols = 40, 160
    w = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-30, 30, (rows, 1)) * 2.0 ** rng.uniform(-6, 0, cols)
    w = w.astype(np.float32)
    w[0, :32] = 0.0
    packed, scale = quant.quantize_fp4(w)
    dq = quant.dequantize_fp4(packed, scale)
    block_scale = np.repeat(e8m0_value(scale.view(np.uint8)), 32, axis=1)
    amax = np.abs(w.astype(np.float64)).reshape(rows, -1, 32).max(-1)
    s = e8m0_value(scale.view(np.uint8))
    floor = 6 * 2.0**-126
    assert np.all(np.maximum(amax, floor) / s <= 6) and np.all(np.maximum(amax, floor) / s > 3)
    y = np.abs(w.astype(np.float64)) / block_scale
    exponent = np.floor(np.log2(np.where(y > 0, y, 1.0)))
    half_ulp = 2.0 ** (np.maximum(exponent, 0) - 2) * block_scale  # E2M1 step is 2^(e-1)
    assert np.all(np.abs(dq.astype(np.float64) - w) <= half_ulp)
    assert_bitwise_equal(quant.dequantize_fp4(*quant.quantize_fp4(dq)), dq)


def test_quantize_rejects_non_finite_and_odd_width():
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize_fp8(np.array([[np.inf, 1.0]], np.float32))
    with pytest.raises(ValueError, match="even"):
        quant.quantize_fp4(np.ones((2, 33), np.float32))


# --------------------------------------------------------------------------------------------------------------------
# activation quant-dequant simulations (ARCHITECTURE §10.3)


def random_activations(rng, rows, cols, dtype):
    """Blocks of very different magnitudes (floor-hitting, tiny, huge) with spread inside each block."""
    magnitude = 10.0 ** rng.uniform(-9, 9, (rows, cols // 32)).repeat(32, axis=1)
    x = rng.standard_normal((rows, cols)) * magnitude * 2.0 ** rng.uniform(-16, 0, (rows, cols))
    x[0] = 0.0
    return x.astype(dtype)


def tie_cases(grid: np.ndarray, block: int, exponent: int) -> np.ndarray:
    """One block per row: amax = max·2^k (so s = 2^k), other entries exact midpoints and midpoints ± 1 fp32 ulp."""
    midpoints = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    values = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(0)), np.nextafter(midpoints, np.inf)])
    values = np.concatenate([values, -values])
    rows = -(-len(values) // (block - 1))
    out = np.zeros((rows, block), np.float32)
    flat = np.zeros(rows * (block - 1), np.float32)
    flat[: len(values)] = values
    out[:, 1:] = flat.reshape(rows, block - 1)
    out[:, 0] = grid[-1]
    return out * np.float32(2.0**exponent)


@pytest.mark.parametrize("block", [128, 64])
def test_fp8_qdq_matches_brute_force(block):
    rng = np.random.default_rng(6)
    qdq = FP8_QDQ
    x = np.concatenate(
        [random_activations(rng, 64, 512, np.float32).reshape(-1, block), tie_cases(E4M3_GRID, block, -3)]
    )
    got = np.asarray(qdq(jnp.asarray(x), block))
    assert_bitwise_equal(got, reference_qdq(x, block, E4M3_GRID, 1e-4))
    assert np.unique(got[-1:]).size > 1
    x16 = random_activations(rng, 32, 256, ml_dtypes.bfloat16)
    assert_bitwise_equal(np.asarray(qdq(jnp.asarray(x16), block)), reference_qdq(x16, block, E4M3_GRID, 1e-4))


def test_fp4_qdq_matches_brute_force():
    rng = np.random.default_rng(7)
    qdq = FP4_QDQ
    x = np.concatenate([random_activations(rng, 64, 256, np.float32).reshape(-1, 32), tie_cases(E2M1_GRID, 32, 5)])
    # A block at the amax floor (s = 2^-126), with a tie. Results below 2^-126 (fp32 subnormals) are left out: they
    # follow the backend's denormal mode (XLA on CPU flushes them to zero).
    x[1] = 0.0
    x[1, :5] = np.float32([6.0, 3.0, -1.25, 0.0, 1.5]) * np.float32(2.0**-126)
    got = np.asarray(qdq(jnp.asarray(x)))
    assert_bitwise_equal(got, reference_qdq(x, 32, E2M1_GRID, 6 * 2.0**-126))
    x16 = random_activations(rng, 16, 128, ml_dtypes.bfloat16)
    assert_bitwise_equal(np.asarray(qdq(jnp.asarray(x16))), reference_qdq(x16, 32, E2M1_GRID, 6 * 2.0**-126))


def test_fp4_qdq_known_ties():
    # s = 1 (amax 6): .25->0, .75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (ties to even mantissa)
    row = np.zeros(32, np.float32)
    row[:8] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5]
    got = np.asarray(FP4_QDQ(jnp.asarray(row[None]), 32))[0, :8]
    np.testing.assert_array_equal(got, [6, 0, 1, 1, 2, 2, 4, -4])


def test_qdq_agrees_with_numpy_weight_quantizers():
    rng = np.random.default_rng(8)
    x = random_activations(rng, 16, 256, np.float32)
    assert_bitwise_equal(
        np.asarray(FP8_QDQ(jnp.asarray(x), 128)), quant.dequantize_fp8(*quant.quantize_fp8(x, (1, 128)), (1, 128))
    )
    assert_bitwise_equal(np.asarray(FP4_QDQ(jnp.asarray(x), 32)), quant.dequantize_fp4(*quant.quantize_fp4(x)))


@pytest.mark.parametrize("format_max", [448.0, 6.0])
def test_scale_from_division_equals_official_reciprocal_multiply(format_max):
    """ARCHITECTURE §10.3 says amax/max; the official kernel computes amax·fp32(1/max). Same ceil-log2 for every fp32 mantissa."""
    amax = (np.arange(2**23, dtype=np.uint32) | np.uint32(127 << 23)).view(np.float32)  # all of [1, 2)
    def ceil_log2(y):  # frexp is exact: y = m·2^e, m in [0.5, 1)
        mantissa, exponent = np.frexp(y)
        return exponent - (mantissa == 0.5)

    by_division = amax / np.float32(format_max)
    by_reciprocal = amax * np.float32(1.0 / format_max)
    assert np.any(by_division != by_reciprocal)  # the quotients do differ by an ulp somewhere...
    np.testing.assert_array_equal(ceil_log2(by_division), ceil_log2(by_reciprocal))  # ...the scales never


def test_qdq_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple"):
        quant.fp8_qdq(jnp.zeros((2, 100)), 128)


# --------------------------------------------------------------------------------------------------------------------
# Hadamard (ARCHITECTURE §8.4)


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_hadamard_is_orthonormal_sylvester(n):
    rows = np.asarray(HADAMARD(jnp.eye(n, dtype=jnp.float32)))  # row i = e_i @ H / sqrt(n)
    assert_bitwise_equal(rows, sylvester(n).astype(np.float32) * np.float32(n**-0.5))
    np.testing.assert_allclose(rows.astype(np.float64) @ rows.T.astype(np.float64), np.eye(n), atol=1e-6)


def test_hadamard_matches_matmul_and_keeps_dot_products():
    rng = np.random.default_rng(9)
    n = 128
    xy = rng.standard_normal((2, 4, 3, n)).astype(np.float32)
    x, y = xy
    hx, hy = np.asarray(HADAMARD(jnp.asarray(xy))).astype(np.float64)
    np.testing.assert_allclose(hx, x.astype(np.float64) @ sylvester(n) / math.sqrt(n), atol=2e-6)
    np.testing.assert_allclose((hx * hy).sum(-1), (x.astype(np.float64) * y).sum(-1), atol=2e-5)
    back = np.asarray(HADAMARD(HADAMARD(jnp.asarray(xy))))
    np.testing.assert_allclose(back, xy, atol=2e-6)  # H/sqrt(n) is its own inverse
    bf16_shape = jax.eval_shape(quant.hadamard, jax.ShapeDtypeStruct((3, n), jnp.bfloat16))
    assert bf16_shape.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="power-of-two"):
        quant.hadamard(jnp.zeros((2, 96)))


def test_fp8_kv_rows_hold_exactly_what_the_kv_simulation_computes():
    """The 584-byte FP8 KV row (448 e4m3 codes, 64 bf16 RoPE values, 7 UE8M0 scales, a pad byte) read back equals
    the model's `simulate_fp8_kv` arithmetic bit for bit, across block scales from the amax floor to huge."""
    from dsv4jax.model.compressor import simulate_quantization

    rng = np.random.default_rng()
    x = rng.standard_normal((6, 9, 512)).astype(np.float32)
    x *= np.exp2(rng.integers(-30, 30, size=(6, 9, 1)))  # per-row magnitudes
    x[0, 0, :64] = 0.0  # an all-zero block: the amax floor's scale
    x[0, 1, 64:128] = 1e-30  # below the floor
    x[0, 2, :448] = float(ml_dtypes.finfo(jnp.bfloat16).max)  # the largest block scale
    x = jnp.asarray(x, jnp.bfloat16)
    rows = quant.pack_fp8_kv(x)
    assert rows.shape == (6, 9, quant.FP8_KV_ROW_BYTES) and rows.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(rows[..., -1]), 0)
    back = quant.unpack_fp8_kv(rows)
    np.testing.assert_array_equal(np.asarray(back, np.float32),
                                  np.asarray(simulate_quantization(x, "fp8", 64), np.float32))
    # Read independently of the unpacker: codes through ml_dtypes, scales as 2^(byte − 127), RoPE bits unchanged.
    raw = np.asarray(rows)
    codes = raw[..., :448].view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(6, 9, 7, 64)
    scales = np.exp2(raw[..., 576:583].astype(np.float32) - 127)[..., None]  # fp32: 256 · 2^120 overflows to inf
    with np.errstate(over="ignore"):  # the largest block: 448 · 2^120 is inf in fp32, as in the simulation
        np.testing.assert_array_equal((codes * scales).reshape(6, 9, 448), np.asarray(back[..., :448], np.float32))
    np.testing.assert_array_equal(raw[..., 448:576].view(ml_dtypes.bfloat16), np.asarray(x[..., 448:]))
    assert raw[0, 2, 576] == 127 + math.ceil(math.log2(float(ml_dtypes.finfo(jnp.bfloat16).max) / 448))
    with pytest.raises(ValueError, match="448 \\+ 64"):
        quant.pack_fp8_kv(x[..., :256])
