"""Pure-JAX specification of the lightning indexer's scores and top-k (ARCHITECTURE §8.4, ARCHITECTURE §8.5)."""

import jax
import jax.numpy as jnp


def indexer_scores_reference(q: jax.Array, weights: jax.Array, keys: jax.Array) -> jax.Array:
    """score(t, j) = Σ_h w_{t,h}·ReLU(⟨q_{t,h}, k_j⟩) in fp32. q [B,S,H,d], weights [B,S,H], keys [B,N,d]."""
    dots = jnp.einsum("bshd,bnd->bshn", q, keys, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bshn,bsh->bsn", jax.nn.relu(dots), weights.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


def indexer_topk_reference(q, weights, keys, visible_rows, k: int) -> jax.Array:
    """Top-k visible rows per query, -1 for unused slots. visible_rows [B,S] = ⌊(t+1)/4⌋ (ARCHITECTURE §8.3).

    Tie rule (ARCHITECTURE §8.5): higher score first, then lower row index (`lax.top_k` guarantees the latter).
    """
    scores = indexer_scores_reference(q, weights, keys)
    visible = jnp.arange(keys.shape[1]) < visible_rows[..., None]
    scores = jnp.where(visible, scores, -jnp.inf)
    k = min(k, keys.shape[1])
    top_scores, top_rows = jax.lax.top_k(scores, k)
    return jnp.where(top_scores > -jnp.inf, top_rows, -1).astype(jnp.int32)
