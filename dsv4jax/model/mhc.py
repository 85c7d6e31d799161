"""Manifold-constrained hyper-connections: n residual streams mixed per sub-layer (ARCHITECTURE §4).

All mixing math is fp32 (ARCHITECTURE §2). A block keeps X of shape [B, S, n, D]; `HyperConnection.pre` collapses it to
the sub-layer input and returns the mixing coefficients that `post` uses to expand the output again.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.model.init import normal
from dsv4jax.model.linear import matmul_fp32
from dsv4jax.model.norm import inverse_rms


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """ARCHITECTURE §4.2: row softmax (+eps), column normalisation, then (iters-1) × (row, column) normalisations."""
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    # Unrolled, not a lax loop: on a GPU each XLA while-loop iteration waits for the host. Batch-1 decode of
    # flash-slice on the H100: 4.90 ms per step with the loop against 3.85 unrolled (pipelined 6.84 vs 1.96;
    # bench/results/decode-attribution-h100-80gb-hbm3-0-loops.json), and 7.48 vs 4.79 in a second run (-0.json).
    # The price is compile time: the first decode call took 22 s instead of 16 s. (Sums as explicit adds, to fuse
    # the chain, made that call run past 200 s on the H100 at commit 7737a7b: keep the reductions.)
    for _ in range(iters - 1):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    return c


def stream_mixes(streams: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
    """(x̃ @ fnᵀ)·ρ with x̃ the flattened streams and ρ its inverse RMS, in fp32 (ARCHITECTURE §4.2, eps = rms_norm_eps).

    In the spec's order: ρ scales the 24 mixes, not the n·D inputs, so no normalised fp32 copy of the streams is
    materialised (the profile put mHC at 19% of a prefill's device time)."""
    flat = streams.reshape(*streams.shape[:-2], -1)
    return matmul_fp32(flat, fn) * inverse_rms(flat.astype(jnp.float32), norm_eps)


def collapse(streams: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Σ_j weights_j · X_j in fp32, cast to the activation dtype."""
    return jnp.einsum("...n,...nd->...d", weights, streams.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(dtype)


class HyperConnection(nnx.Module):
    """Parameters `hc_{attn,ffn}_{fn,base,scale}` of one sub-layer (ARCHITECTURE §4.1)."""

    def __init__(self, hc_mult: int, hidden: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 rngs: nnx.Rngs):
        n = hc_mult
        mix = (2 + n) * n
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        self.fn = nnx.Param(normal(rngs, (mix, n * hidden), 0.02, jnp.float32), axes=("hc_mix", "hc_embed"))
        self.base = nnx.Param(normal(rngs, (mix,), 0.1, jnp.float32), axes=("hc_mix",))
        self.scale = nnx.Param(1.0 + normal(rngs, (3,), 0.1, jnp.float32), axes=(None,))

    def pre(self, streams: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        """streams [..., n, D] -> (sub-layer input [..., D], post [..., n], comb [..., n, n])."""
        n = self.hc_mult
        mixes = stream_mixes(streams, self.fn[...], self.norm_eps)
        scale, base = self.scale[...], self.base[...]
        pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb_logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mixes.shape[:-1], n, n)
        comb = sinkhorn(comb_logits, self.sinkhorn_iters, self.hc_eps)
        return collapse(streams, pre, dtype), post, comb

    @staticmethod
    def post(output: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """ARCHITECTURE §4.3: X_out[k] = post_k·f + Σ_j comb[j,k]·R_j (fp32), cast to the residual dtype."""
        # A multiply-sum over the 4 streams (one fusion), not an einsum: XLA ran that as a GEMM with K=4 at
        # HIGHEST precision, 0.46 against 0.12 ms at 4096 tokens on the H100 (kernel-limits-h100-80gb-hbm3-mhc.json).
        mixed = jnp.sum(comb[..., None] * residual.astype(jnp.float32)[..., :, None, :], axis=-3)
        return (post[..., None] * output.astype(jnp.float32)[..., None, :] + mixed).astype(residual.dtype)


class HyperConnectionHead(nnx.Module):
    """Final collapse `hc_head_{fn,base,scale}` (ARCHITECTURE §4.4): no Sinkhorn, no post/comb."""

    def __init__(self, hc_mult: int, hidden: int, hc_eps: float, norm_eps: float, rngs: nnx.Rngs):
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nnx.Param(normal(rngs, (hc_mult, hc_mult * hidden), 0.02, jnp.float32), axes=(None, "hc_embed"))
        self.base = nnx.Param(normal(rngs, (hc_mult,), 0.1, jnp.float32), axes=(None,))
        self.scale = nnx.Param(1.0 + normal(rngs, (1,), 0.1, jnp.float32), axes=(None,))

    def __call__(self, streams: jax.Array, dtype) -> jax.Array:
        mixes = stream_mixes(streams, self.fn[...], self.norm_eps)
        pre = jax.nn.sigmoid(mixes * self.scale[...][0] + self.base[...]) + self.hc_eps
        return collapse(streams, pre, dtype)
