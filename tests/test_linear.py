"""matmul_fp32 (compressor, gate, head: ARCHITECTURE §2) is an fp32 computation on both of its paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4jax.model.linear import bf16_parts, matmul_fp32


@pytest.mark.parametrize("dtype,weight_dtype", [(jnp.bfloat16, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
                                                (jnp.float32, jnp.float32)])
def test_matmul_fp32_matches_the_exact_product_to_fp32_accuracy(seed, dtype, weight_dtype):
    # bf16 x takes bf16 matmuls with fp32 accumulation (exact products; an fp32 weight split into three bf16
    # parts); fp32 x the HIGHEST fp32 path.
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (3, 17, 2048), dtype)
    weight = jax.random.normal(kw, (96, 2048), weight_dtype)
    out = matmul_fp32(x, weight)
    assert out.dtype == jnp.float32 and out.shape == (3, 17, 96)
    exact = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    # fp32 summation of 2048 terms of size ~1: error ~ sqrt(2048)·eps·|term| ≪ 1e-5 of the typical |sum| (~45)
    scale = np.sqrt((exact ** 2).mean())
    assert np.abs(np.asarray(out, np.float64) - exact).max() <= 1e-5 * scale
    # a bf16 rounding of the result would be ~1e-3 of the scale: the check can fail
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
    assert np.abs(rounded - exact).max() > 1e-5 * scale


def test_bf16_parts_sum_to_the_fp32_value_exactly(seed):
    w = jax.random.normal(jax.random.key(seed), (4096,), jnp.float32) * jnp.logspace(-20, 20, 4096)
    parts = bf16_parts(w)
    assert all(p.dtype == jnp.bfloat16 for p in parts)
    total = sum(np.asarray(p, np.float64) for p in parts)
    np.testing.assert_array_equal(total, np.asarray(w, np.float64))
    # one part alone is only bf16-accurate: the test can fail
    assert np.abs(np.asarray(parts[0], np.float64) - np.asarray(w, np.float64)).max() > 0
