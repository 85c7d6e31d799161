"""Pure-JAX specification of the V4 sparse attention core (ARCHITECTURE §7, ARCHITECTURE §8)."""

import jax
import jax.numpy as jnp


def sparse_attention_reference(q, kv, indices, sink, scale: float):
    """Each query attends the K=V rows `indices` of its sequence, with a per-head sink (ARCHITECTURE §7).

    q [B,S,H,d]; kv [B,N,d] (one head, key = value); indices [B,S,K] int32, -1 = unused; sink [H] fp32.
    Scores and softmax statistics in fp32, probabilities in the KV dtype for P·V, division at the end.
    """
    gathered = jax.vmap(lambda rows, idx: rows[idx])(kv, jnp.maximum(indices, 0))  # [B,S,K,d]
    scores = jnp.einsum("bshd,bskd->bshk", q, gathered, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST) * scale
    scores = jnp.where((indices >= 0)[:, :, None, :], scores, -jnp.inf)
    sink = sink.astype(jnp.float32)[:, None]
    peak = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)  # the sink keeps the max finite
    probs = jnp.exp(scores - peak)
    denominator = jnp.sum(probs, axis=-1, keepdims=True) + jnp.exp(sink - peak)
    out = jnp.einsum("bshk,bskd->bshd", probs.astype(kv.dtype), gathered, preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)
    return (out / denominator).astype(q.dtype)
