"""RMSNorm variants (ARCHITECTURE §5): all statistics in fp32, one final cast to the input dtype."""

import jax
import jax.numpy as jnp
from flax import nnx


def inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(x²) + eps) over the last axis (kept), for fp32 x."""
    return jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """Unweighted RMS normalisation over the last axis, in fp32 (returns fp32)."""
    x = x.astype(jnp.float32)
    return x * inverse_rms(x, eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # ARCHITECTURE §5: the fp32 weight multiplies the fp32 normalised x before the single cast back.
    return (weight.astype(jnp.float32) * rms_normalize(x, eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight is held in fp32 (the checkpoint's bf16 upcast exactly)."""

    def __init__(self, dim: int, eps: float, axis_name: str = "embed"):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32), axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)
