"""Linear layers in checkpoint layout ([out, in]), the embedding, and the fp32 matmul used by ARCHITECTURE §2's fp32 math."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.model.init import fan_in_normal, normal


def bf16_parts(w: jax.Array) -> list[jax.Array]:
    """fp32 w as three bf16 arrays whose sum is w exactly: each takes the next 8 significant bits, by truncation
    of the bit pattern (not by casts, which XLA may drop as excess precision on GPUs)."""
    parts, rest = [], w.astype(jnp.float32)
    for _ in range(3):
        part = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
        parts.append(part.astype(jnp.bfloat16))  # exact: 8 significant bits
        rest = rest - part  # exact: the bits truncated away
    return parts


def matmul_fp32(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x @ weightᵀ computed in fp32 (ARCHITECTURE §2: compressor, gate, head, mHC mixes).

    Every product of two bf16 values is exact in fp32, so with bf16 x the product is computed on tensor cores as
    bf16 matmuls with fp32 accumulation, equal to the upcast fp32 product up to summation order: one matmul for a
    bf16 weight, three for an fp32 weight split exactly into bf16 parts (`bf16_parts`). On the H100 the compressor's
    fp32 GEMMs took 1.9 ms of a 4k prefill's layer, and mHC's mixes 0.29 ms against 0.11
    (bench/results/profile-forward-*.json, kernel-limits-h100-80gb-hbm3-mhc.json). fp32 x takes the fp32 path at
    HIGHEST precision, so GPUs skip TF32."""
    if x.dtype == jnp.bfloat16 and weight.dtype in (jnp.bfloat16, jnp.float32):
        parts = [weight] if weight.dtype == jnp.bfloat16 else bf16_parts(weight)
        return sum(jnp.einsum("...i,oi->...o", x, part, preferred_element_type=jnp.float32) for part in parts)
    return jnp.einsum("...i,oi->...o", x.astype(jnp.float32), weight.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def matmul(x: jax.Array, weight: jax.Array, out_dtype=None) -> jax.Array:
    """x @ weightᵀ in the activation dtype with fp32 accumulation, output in `out_dtype` (default x.dtype)."""
    y = jnp.einsum("...i,oi->...o", x, weight.astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


class Linear(nnx.Module):
    """A projection stored as in the checkpoint: `weight` [out, in] (FP8/FP4 weights are dequantised on load).

    With `simulate_fp8_activations` the input is quantised per token and 128-channel block first, as the
    official FP8 GEMM does (ARCHITECTURE §10.3 item 1).
    """

    def __init__(self, in_dim: int, out_dim: int, axes: tuple, dtype, rngs: nnx.Rngs,
                 simulate_fp8_activations: bool = False):
        self.simulate_fp8_activations = simulate_fp8_activations
        self.weight = nnx.Param(fan_in_normal(rngs, (out_dim, in_dim), dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.simulate_fp8_activations:
            from dsv4jax.quant import fp8_qdq
            x = fp8_qdq(x, 128)
        return matmul(x, self.weight[...])


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(normal(rngs, (vocab, dim), 1.0, dtype), axes=("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)
