"""Lightning indexer: scores Σ_h w_h·ReLU(q_h·k_j) over visible index-key rows, and their top-k."""

import functools

import jax

from dsv4jax.pallas.indexer_topk.reference import indexer_scores_reference, indexer_topk_reference


@functools.partial(jax.named_call, name="indexer_topk")
def indexer_topk(q, weights, keys, visible_rows, k: int):
    """q [B,S,H,d]; weights [B,S,H] fp32; keys [B,N,d]; visible_rows [B,S] -> rows [B,S,min(k,N)] int32 (-1 unused),
    higher score first, ties to the lower row. The reference is the specification."""
    return indexer_topk_reference(q, weights, keys, visible_rows, k)
