"""Lightning indexer: picks the top-k visible compressed rows for each query of a CSA layer (ARCHITECTURE §8.4)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.compressor import Compressor, simulate_quantization
from dsv4jax.model.linear import Linear
from dsv4jax.model.rope import apply_rope


def indexer_scores_reference(q: jax.Array, weights: jax.Array, keys: jax.Array) -> jax.Array:
    """score(t, j) = Σ_h w_{t,h}·ReLU(⟨q_{t,h}, k_j⟩) in fp32. q [B,S,H,d], weights [B,S,H], keys [B,N,d]."""
    dots = jnp.einsum("bshd,bnd->bshn", q, keys, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bshn,bsh->bsn", jax.nn.relu(dots), weights.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def indexer_topk_reference(q, weights, keys, visible_rows, k: int) -> jax.Array:
    """Top-k visible rows per query, -1 for unused slots. visible_rows [B,S] = ⌊(t+1)/4⌋ (§8.3).

    Tie rule (§8.5): higher score first, then lower row index (`lax.top_k` guarantees the latter).
    """
    scores = indexer_scores_reference(q, weights, keys)
    visible = jnp.arange(keys.shape[1]) < visible_rows[..., None]
    scores = jnp.where(visible, scores, -jnp.inf)
    k = min(k, keys.shape[1])
    top_scores, top_rows = jax.lax.top_k(scores, k)
    return jnp.where(top_scores > -jnp.inf, top_rows, -1).astype(jnp.int32)


class Indexer(nnx.Module):
    """Parameters `wq_b` [H_I·d_I, q_lora] (FP8), `weights_proj` [H_I, D] (bf16), and its own compressor."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.quantization = "fp4" if c.simulate_fp4_indexer else None
        self.wq_b = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, ("index_heads_dim", "q_lora"), dtype,
                           rngs, c.simulate_fp8_activations)
        self.weights_proj = Linear(c.hidden_size, c.index_n_heads, ("index_heads", "embed"), dtype, rngs)
        self.compressor = Compressor(c.hidden_size, c.index_head_dim, 4, c.rope_head_dim, c.rms_norm_eps, dtype, rngs,
                                     self.quantization)

    def __call__(self, x, q_latent, positions, keys, frequencies) -> jax.Array:
        """x [B,S,D] attention input, q_latent [B,S,q_lora] (`c_q`), keys [B,N,d_I] -> rows [B,S,top-k]."""
        batch, chunk = x.shape[:2]
        q = self.wq_b(q_latent).reshape(batch, chunk, self.num_heads, self.head_dim)
        q = apply_rope(q, positions[..., None], frequencies)
        q = simulate_quantization(q, self.quantization)
        weights = self.weights_proj(x).astype(jnp.float32) * (self.head_dim ** -0.5 * self.num_heads ** -0.5)
        return indexer_topk(q, weights, keys, (positions + 1) // 4, self.topk)


@functools.partial(jax.named_call, name="indexer_topk")
def indexer_topk(q, weights, keys, visible_rows, k):
    """The swappable op (Pallas kernel on GPU later); the reference is the specification."""
    return indexer_topk_reference(q, weights, keys, visible_rows, k)
