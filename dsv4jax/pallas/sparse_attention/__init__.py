"""V4 attention core: per query token, all heads attend one shared set of K=V rows with a per-head sink."""

import functools

import jax

from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference


@functools.partial(jax.named_call, name="sparse_attention")
def sparse_attention(q, kv, indices, sink, scale: float):
    """q [B,S,H,d]; kv [B,N,d] (one head, key = value); indices [B,S,K] int32 into kv's rows, -1 = unused;
    sink [H] fp32 -> [B,S,H,d] in q's dtype. The reference is the specification."""
    return sparse_attention_reference(q, kv, indices, sink, scale)
