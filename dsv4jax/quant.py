"""Number formats of DeepSeek-V4 (ARCHITECTURE §10).

Host side (numpy, used by the checkpoint loader and writer):
  * `dequantize_fp8` / `quantize_fp8`: e4m3 weights with one UE8M0 scale per 128×128 block (ARCHITECTURE §10.1, ARCHITECTURE §10.2).
  * `dequantize_fp4` / `quantize_fp4`: packed E2M1 weights (two codes per int8) with one UE8M0 scale per 1×32 block.
Model side (jax.numpy, optional quantization simulations of the official forward, ARCHITECTURE §10.3):
  * `fp8_qdq`: per-row blocks, power-of-two scale, e4m3 round-to-nearest-even, multiply back.
  * `fp4_qdq`: per-row 32-blocks, power-of-two scale, E2M1 round-to-nearest-even, multiply back.
  * `hadamard`: orthonormal Sylvester Walsh–Hadamard transform of the last axis (indexer, ARCHITECTURE §8.4).

Every rounding here is done explicitly in fp32 arithmetic (exponent read from the bits, `round` half-to-even on an
exact multiple of the grid step) instead of through float8/float4 casts: under `jax.jit` on GPU, XLA removes a
`f32 -> float8_e4m3fn -> f32` (or float4_e2m1fn) convert pair altogether (seen on an H100 with jax 0.11.2: the round
trip came back as the identity), while on CPU the casts are RNE; the explicit form is bit-identical to an RNE cast on
every backend. Power-of-two scales are built from their bits (as the official `fast_pow2` does), so every scale
multiply is exact. Results below 2^-126 (fp32 subnormals, reachable only by fp4 blocks at the amax floor) follow the
backend's denormal mode; XLA on CPU flushes them to zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Lower bounds on a block's amax before the scale is derived (ARCHITECTURE §10.3): keep the scale finite for all-zero blocks.
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
FP8_WEIGHT_BLOCK = (128, 128)
FP4_WEIGHT_BLOCK = 32

# (mantissa bits, smallest normal exponent) of the element formats: the grid step in the binade 2^e is
# 2^(max(e, min_exp) - mantissa_bits); below 2^min_exp the format is subnormal with the constant smallest step.
_E4M3_GRID = (3, -6)
_E2M1_GRID = (1, 0)

# ARCHITECTURE §10.2: E2M1 code -> value, bit 3 is the sign.
E2M1_LUT = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
_E2M1_MAGNITUDES = E2M1_LUT[:8]

_E8M0_BIAS = 127
_E8M0_NAN_BYTE = 0xFF


# --------------------------------------------------------------------------------------------------------------------
# shared helpers (numpy)


def _as_bytes_of(array: np.ndarray, dtype, what: str) -> np.ndarray:
    """Raw uint8 codes of a one-byte format; accepts the ml_dtypes dtype or an already raw uint8/int8 array."""
    array = np.asarray(array)
    if array.dtype == np.dtype(dtype) or array.dtype in (np.uint8, np.int8):
        return array.view(np.uint8)
    raise TypeError(f"{what} must be {np.dtype(dtype).name} (or raw uint8/int8 codes), got {array.dtype}")


def _np_pow2(exponent: np.ndarray) -> np.ndarray:
    """2^k as float32 from its bits, for integer k in the normal range [-126, 127]."""
    exponent = np.asarray(exponent, dtype=np.int32)
    return ((exponent + 127).astype(np.uint32) << np.uint32(23)).view(np.float32)


def _np_ceil_log2(positive: np.ndarray) -> np.ndarray:
    """ceil(log2(y)) for positive normal float32 y, read from the bits (the official `fast_log2_ceil`)."""
    bits = np.ascontiguousarray(positive, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    return exponent + ((bits & np.uint32(0x7FFFFF)) != 0).astype(np.int32)


def _np_round_to_grid(y: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Round float32 `y` (already inside the format's range) to the element grid, ties to even mantissa.

    Within one binade the grid is the integers times the step, and the even integers are exactly the even mantissas
    (the binade starts at an even multiple 2^mantissa_bits), so numpy's half-to-even `round` is the format's RNE.
    """
    mantissa_bits, min_exp = grid
    exponent = ((y.view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    exponent = np.maximum(exponent, min_exp)  # zero/subnormal fp32 and the format's subnormals share the last step
    return np.round(y * _np_pow2(mantissa_bits - exponent)) * _np_pow2(exponent - mantissa_bits)


def _e8m0_to_float32(scale: np.ndarray) -> np.ndarray:
    """UE8M0 byte b -> 2^(b-127) exactly (b=0 is the fp32 subnormal 2^-127), b=0xFF -> NaN (ARCHITECTURE §10.1)."""
    scale_bytes = _as_bytes_of(scale, ml_dtypes.float8_e8m0fnu, "scale")
    bits = scale_bytes.astype(np.uint32) << np.uint32(23)
    bits = np.where(scale_bytes == 0, np.uint32(0x00400000), bits)
    bits = np.where(scale_bytes == _E8M0_NAN_BYTE, np.uint32(0x7FC00000), bits)
    return bits.astype(np.uint32).view(np.float32)


def _exponent_to_e8m0(exponent: np.ndarray) -> np.ndarray:
    biased = np.asarray(exponent, dtype=np.int32) + _E8M0_BIAS
    if biased.size and (biased.min() < 0 or biased.max() > 254):
        raise ValueError("scale exponent outside the UE8M0 range [-127, 127]")
    return biased.astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def _blocked(x: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[..., R, C] -> [..., ceil(R/br), br, ceil(C/bc), bc], zero-padded (zeros never change a block's amax)."""
    rows, cols = x.shape[-2:]
    block_rows, block_cols = block
    pad_rows, pad_cols = -rows % block_rows, -cols % block_cols
    if pad_rows or pad_cols:
        x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_rows), (0, pad_cols)])
    lead = x.shape[:-2]
    return x.reshape(*lead, x.shape[-2] // block_rows, block_rows, x.shape[-1] // block_cols, block_cols)


def _unblocked(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    lead = x.shape[:-4]
    return x.reshape(*lead, x.shape[-4] * x.shape[-3], x.shape[-2] * x.shape[-1])[..., :rows, :cols]


def _check_scale_shape(scale_shape, expected, what: str) -> None:
    if tuple(scale_shape) != tuple(expected):
        raise ValueError(f"{what}: scale shape {tuple(scale_shape)} does not match the expected {tuple(expected)}")


def _finite_float32(w_float, what: str) -> np.ndarray:
    w = np.asarray(w_float).astype(np.float32)  # bf16/fp16/fp32 widen exactly
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what}: weight has non-finite values")
    return w


# --------------------------------------------------------------------------------------------------------------------
# FP8 weights: e4m3 with UE8M0 scale per 128×128 block (ARCHITECTURE §10.1, ARCHITECTURE §10.2)


def dequantize_fp8(weight: np.ndarray, scale: np.ndarray, block: tuple[int, int] = FP8_WEIGHT_BLOCK) -> np.ndarray:
    """ARCHITECTURE §10.2: W[i,j] = float(e4m3[i,j]) · 2^(e8m0[i//128, j//128] − 127), as float32.

    `weight` [..., out, in] float8_e4m3fn, `scale` [..., ceil(out/128), ceil(in/128)] float8_e8m0fnu (raw uint8
    codes are accepted for both). Exact: every product is representable in fp32 except where it overflows.
    """
    weight_bytes = _as_bytes_of(weight, ml_dtypes.float8_e4m3fn, "weight")
    scale_f32 = _e8m0_to_float32(scale)
    rows, cols = weight_bytes.shape[-2:]
    expected = (*weight_bytes.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    _check_scale_shape(scale_f32.shape, expected, "dequantize_fp8")
    values = _blocked(weight_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32), block)
    values *= scale_f32[..., :, None, :, None]
    return np.ascontiguousarray(_unblocked(values, rows, cols))


def quantize_fp8(w_float: np.ndarray, block: tuple[int, int] = FP8_WEIGHT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `dequantize_fp8` (official checkpoint format): returns (e4m3 weight, e8m0 scale).

    Per block: s = 2^ceil(log2(max(amax, 1e-4)/448)) (UE8M0, ARCHITECTURE §10.3's rule, so amax/s ≤ 448), codes =
    e4m3_RNE(clamp(w/s, ±448)). The input is widened to fp32 first; dequantize∘quantize is idempotent.
    """
    w = _finite_float32(w_float, "quantize_fp8")
    rows, cols = w.shape[-2:]
    blocks = _blocked(w, block)
    amax = np.abs(blocks).max(axis=(-3, -1))
    exponent = _np_ceil_log2(np.maximum(amax, np.float32(FP8_AMAX_FLOOR)) * np.float32(1.0 / E4M3_MAX))
    scaled = np.clip(blocks * _np_pow2(-exponent)[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    codes = _np_round_to_grid(scaled.astype(np.float32), _E4M3_GRID).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(_unblocked(codes, rows, cols)), _exponent_to_e8m0(exponent)


# --------------------------------------------------------------------------------------------------------------------
# FP4 weights: packed E2M1 with UE8M0 scale per 1×32 block (ARCHITECTURE §10.1, ARCHITECTURE §10.2)


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """ARCHITECTURE §10.2: byte u = uint8(packed[i, c]); element 2c <- u & 0xF, element 2c+1 <- u >> 4; W = LUT[code]·2^(s−127).

    `packed` [..., out, in/2] int8, `scale` [..., out, ceil(in/32)] float8_e8m0fnu. Returns float32 [..., out, in].
    """
    packed_bytes = np.asarray(packed)
    if packed_bytes.dtype not in (np.int8, np.uint8):
        raise TypeError(f"packed FP4 weight must be int8 (two E2M1 codes per byte), got {packed_bytes.dtype}")
    packed_bytes = packed_bytes.view(np.uint8)
    scale_f32 = _e8m0_to_float32(scale)
    cols = 2 * packed_bytes.shape[-1]
    expected = (*packed_bytes.shape[:-1], -(-cols // FP4_WEIGHT_BLOCK))
    _check_scale_shape(scale_f32.shape, expected, "dequantize_fp4")
    codes = np.empty((*packed_bytes.shape[:-1], cols), dtype=np.uint8)
    codes[..., 0::2] = packed_bytes & 0x0F
    codes[..., 1::2] = packed_bytes >> 4
    values = _blocked(E2M1_LUT[codes], (1, FP4_WEIGHT_BLOCK))
    values *= scale_f32[..., :, None, :, None]
    return np.ascontiguousarray(_unblocked(values, codes.shape[-2], cols))


def quantize_fp4(w_float: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `dequantize_fp4` (official checkpoint format): returns (packed int8, e8m0 scale).

    Per 1×32 block along the last axis: s = 2^ceil(log2(max(amax, 6·2^-126)/6)), codes = E2M1_RNE(clamp(w/s, ±6));
    negative values that round to zero keep their sign (code 8, −0). The last axis must be even.
    """
    w = _finite_float32(w_float, "quantize_fp4")
    rows, cols = w.shape[-2:]
    if cols % 2:
        raise ValueError(f"quantize_fp4: the last axis ({cols}) must be even to pack two codes per byte")
    blocks = _blocked(w, (1, FP4_WEIGHT_BLOCK))
    amax = np.abs(blocks).max(axis=(-3, -1))
    exponent = _np_ceil_log2(np.maximum(amax, np.float32(FP4_AMAX_FLOOR)) * np.float32(1.0 / E2M1_MAX))
    scaled = np.clip(blocks * _np_pow2(-exponent)[..., :, None, :, None], -E2M1_MAX, E2M1_MAX)
    rounded = _unblocked(_np_round_to_grid(scaled.astype(np.float32), _E2M1_GRID), rows, cols)
    codes = np.searchsorted(_E2M1_MAGNITUDES, np.abs(rounded)).astype(np.uint8)  # exact grid hits -> index = code
    codes |= np.signbit(rounded).astype(np.uint8) << 3
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed.view(np.int8)), _exponent_to_e8m0(exponent)


# --------------------------------------------------------------------------------------------------------------------
# activation-side simulations (jax, ARCHITECTURE §10.3)


def _jnp_pow2(exponent: jax.Array) -> jax.Array:
    """2^k as float32 from its bits (official `fast_pow2`), integer k in [-126, 127]."""
    return jax.lax.bitcast_convert_type((exponent.astype(jnp.int32) + 127) << 23, jnp.float32)


def _jnp_biased_exponent(x: jax.Array) -> jax.Array:
    return (jax.lax.bitcast_convert_type(x, jnp.int32) >> 23) & 0xFF


def _jnp_ceil_log2(positive: jax.Array) -> jax.Array:
    """ceil(log2(y)) of positive normal fp32 y from its bits (official `fast_log2_ceil`)."""
    bits = jax.lax.bitcast_convert_type(positive, jnp.int32)
    return _jnp_biased_exponent(positive) - 127 + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)


def _jnp_round_to_grid(y: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """RNE of fp32 `y` (inside the format's range) onto the element grid; see `_np_round_to_grid`."""
    mantissa_bits, min_exp = grid
    exponent = jnp.maximum(_jnp_biased_exponent(y) - 127, min_exp)
    return jnp.round(y * _jnp_pow2(mantissa_bits - exponent)) * _jnp_pow2(exponent - mantissa_bits)


def _block_scale(blocks: jax.Array, format_max: float, amax_floor: float) -> tuple[jax.Array, jax.Array]:
    """fp32 blocks [..., n, block] -> (the power-of-two scale's exponent [..., n, 1], blocks / scale clamped to the
    format's range)."""
    amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    # ARCHITECTURE §10.3 writes amax/max; like the official kernel we multiply by fp32(1/max), an exact IEEE multiply on every
    # backend. The two differ by an ulp for some amax but never after ceil-log2 (exhaustive test in test_quant.py).
    exponent = _jnp_ceil_log2(jnp.maximum(amax, jnp.float32(amax_floor)) * jnp.float32(1.0 / format_max))
    return exponent, jnp.clip(blocks * _jnp_pow2(-exponent), -format_max, format_max)  # = x / s exactly


def _blockwise_qdq(x: jax.Array, block: int, format_max: float, amax_floor: float, grid) -> jax.Array:
    if x.shape[-1] % block:
        raise ValueError(f"last axis {x.shape[-1]} is not a multiple of the quantization block {block}")
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    exponent, scaled = _block_scale(blocks, format_max, amax_floor)
    dequantized = _jnp_round_to_grid(scaled, grid) * _jnp_pow2(exponent)
    return dequantized.reshape(x.shape).astype(x.dtype)


def fp8_qdq(x: jax.Array, block: int = 128) -> jax.Array:
    """ARCHITECTURE §10.3 items 1–2: e4m3 quantize-dequantize per `block` channels of the last axis, in fp32, back to x.dtype.

    s = 2^ceil(log2(max(amax, 1e-4)/448)), x_q = e4m3_RNE(clamp(x/s, ±448)), returns x_q·s.
    Used with block=128 for linear inputs and block=64 for the KV QAT simulation.
    """
    return _blockwise_qdq(x, block, E4M3_MAX, FP8_AMAX_FLOOR, _E4M3_GRID)


def fp4_qdq(x: jax.Array, block: int = 32) -> jax.Array:
    """ARCHITECTURE §10.3 item 3: E2M1 quantize-dequantize per `block` channels of the last axis, in fp32, back to x.dtype.

    s = 2^ceil(log2(max(amax, 6·2^-126)/6)), x_q = E2M1_RNE(clamp(x/s, ±6)) on {0,.5,1,1.5,2,3,4,6}, returns x_q·s.
    """
    return _blockwise_qdq(x, block, E2M1_MAX, FP4_AMAX_FLOOR, _E2M1_GRID)


def hadamard(x: jax.Array) -> jax.Array:
    """Orthonormal Sylvester Walsh–Hadamard transform of the last axis: x @ H_n · n^-1/2 (fp32 math, ARCHITECTURE §8.4).

    Done as log2(n) exact fp32 add/subtract butterflies (no matmul, so no TF32 on GPUs), scaled once at the end like
    the official `hadamard_transform(x, scale=n**-0.5)`. H_n is symmetric, so x @ H_n = H_n x.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two last axis, got {n}")
    y = x.astype(jnp.float32)
    lead = x.shape[:-1]
    half = n // 2
    while half >= 1:
        # Sylvester: H_2m = [[H_m, H_m], [H_m, -H_m]] -> pair element j with j+half inside every 2·half group.
        pairs = y.reshape(*lead, n // (2 * half), 2, half)
        low, high = pairs[..., 0, :], pairs[..., 1, :]
        y = jnp.stack([low + high, low - high], axis=-2).reshape(*lead, n)
        half //= 2
    return (y * jnp.float32(n**-0.5)).astype(x.dtype)


# ---- the FP8 KV cache row: FlashMLA's layout for V4, the storage form of ARCHITECTURE §10.3's KV quantization ----------

FP8_KV_BLOCK = 64
FP8_KV_ROW_BYTES = 584  # 448 e4m3 codes + 64 bf16 RoPE values (128 bytes) + 7 UE8M0 scales + 1 pad byte


def pack_fp8_kv(kv: jax.Array, rope_dim: int = 64) -> jax.Array:
    """K=V rows [..., 512] -> uint8 [..., 584]: the non-RoPE channels as e4m3 codes with one UE8M0 scale per 64
    (exactly `fp8_qdq(·, 64)`'s quantization, ARCHITECTURE §10.3), the RoPE channels as bf16, a pad byte."""
    nope = kv.shape[-1] - rope_dim
    if nope % FP8_KV_BLOCK or nope // FP8_KV_BLOCK + 1 + nope + 2 * rope_dim != FP8_KV_ROW_BYTES:
        raise ValueError(f"the FP8 KV row holds 448 + 64 channels; got {nope} + {rope_dim}")
    blocks = kv[..., :nope].astype(jnp.float32).reshape(*kv.shape[:-1], nope // FP8_KV_BLOCK, FP8_KV_BLOCK)
    exponent, scaled = _block_scale(blocks, E4M3_MAX, FP8_AMAX_FLOOR)
    codes = jax.lax.bitcast_convert_type(scaled.astype(jnp.float8_e4m3fn), jnp.uint8).reshape(*kv.shape[:-1], nope)
    rope = jax.lax.bitcast_convert_type(kv[..., nope:].astype(jnp.bfloat16), jnp.uint8).reshape(*kv.shape[:-1], -1)
    scales = (exponent[..., 0] + 127).astype(jnp.uint8)
    pad = jnp.zeros((*kv.shape[:-1], 1), jnp.uint8)
    return jnp.concatenate([codes, rope, scales, pad], axis=-1)


def unpack_fp8_kv(rows: jax.Array, dtype=jnp.bfloat16, rope_dim: int = 64) -> jax.Array:
    """uint8 [..., 584] -> K=V rows [..., 512] in `dtype`; equal to `fp8_qdq` on the non-RoPE channels and to the
    bf16 RoPE channels, so a bf16 model reads from it what `simulate_fp8_kv` computes."""
    lead = rows.shape[:-1]
    nope = (FP8_KV_ROW_BYTES - 1 - 2 * rope_dim) * FP8_KV_BLOCK // (FP8_KV_BLOCK + 1)  # a code per channel, a scale per 64
    count = nope // FP8_KV_BLOCK
    codes = jax.lax.bitcast_convert_type(rows[..., :nope], jnp.float8_e4m3fn).astype(jnp.float32)
    scales = _jnp_pow2(rows[..., nope + 2 * rope_dim:nope + 2 * rope_dim + count].astype(jnp.int32) - 127)
    values = (codes.reshape(*lead, count, FP8_KV_BLOCK) * scales[..., None]).reshape(*lead, nope)
    rope = jax.lax.bitcast_convert_type(rows[..., nope:nope + 2 * rope_dim].reshape(*lead, rope_dim, 2),
                                        jnp.bfloat16)
    return jnp.concatenate([values.astype(dtype), rope.astype(dtype)], axis=-1)
