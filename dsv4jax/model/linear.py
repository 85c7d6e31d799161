"""Linear layers in checkpoint layout ([out, in]), the embedding, and the fp32 matmul used by §2's fp32 math."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.model.init import fan_in_normal, normal


def matmul_fp32(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x @ weightᵀ computed in fp32 (ARCHITECTURE §2: compressor, gate, head).

    When both operands are bf16 (the checkpoint's weights and the bf16 model's activations), every product of two
    bf16 values is exact in fp32, so a bf16 matmul with fp32 accumulation computes the upcast fp32 product up to
    summation order, on tensor cores instead of fp32 CUDA cores (bench/results/profile-forward-*.json: the
    compressor's fp32 GEMMs took 1.9 ms of a 4k prefill's layer). Otherwise both are upcast, HIGHEST so GPUs
    skip TF32."""
    if x.dtype == weight.dtype == jnp.bfloat16:
        return jnp.einsum("...i,oi->...o", x, weight, preferred_element_type=jnp.float32)
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
