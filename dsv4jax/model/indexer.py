"""Lightning indexer: picks the top-k visible compressed rows for each query of a CSA layer (ARCHITECTURE §8.4)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.compressor import Compressor, simulate_quantization
from dsv4jax.model.linear import Linear
from dsv4jax.model.rope import apply_rope
from dsv4jax.pallas.indexer_topk import indexer_topk


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

    def __call__(self, x, q_latent, positions, keys, frequencies, *, implementation: str = "auto") -> jax.Array:
        """x [B,S,D] attention input, q_latent [B,S,q_lora] (`c_q`), keys [B,N,d_I] -> rows [B,S,top-k].
        implementation: the kernel choice of `indexer_topk` ("auto", "reference" or "pallas")."""
        batch, chunk = x.shape[:2]
        q = self.wq_b(q_latent).reshape(batch, chunk, self.num_heads, self.head_dim)
        q = apply_rope(q, positions[..., None], frequencies)
        q = simulate_quantization(q, self.quantization)
        weights = self.weights_proj(x).astype(jnp.float32) * (self.head_dim ** -0.5 * self.num_heads ** -0.5)
        return indexer_topk(q, weights, keys, (positions + 1) // 4, self.topk, implementation=implementation)
