"""Lightning indexer: scores Σ_h w_h·ReLU(q_h·k_j) over visible index-key rows, and their top-k."""

import functools

import jax
import jax.numpy as jnp

import dsv4jax.pallas as _pallas
from dsv4jax.pallas.indexer_topk.reference import indexer_scores_reference, indexer_topk_reference

__all__ = ["indexer_topk", "indexer_scores", "indexer_topk_kernel", "indexer_scores_reference",
           "indexer_topk_reference", "kernel_supported", "unsupported_reason"]


def unsupported_reason(q, keys) -> str | None:
    """None when the kernel takes these shapes/dtypes, else why not."""
    from dsv4jax.pallas.indexer_topk import kernel

    return kernel.unsupported_reason(q.shape, keys.shape, q.dtype)


def kernel_supported(q, keys) -> bool:
    return unsupported_reason(q, keys) is None


def indexer_scores(q, weights, keys, visible_rows=None, *, interpret=None, plan=None, num_sms=None):
    """Mosaic GPU kernel scores [B,S,N] fp32 (−inf at rows j ≥ visible_rows[b,t]; all rows when None).

    Equals `indexer_scores_reference(q, weights, keys)` on the visible rows, up to fp32 summation order.
    `interpret`: e.g. `dsv4jax.compat.mosaic_gpu_interpret_params()` to run on the CPU. `num_sms`: the
    GPU's SMs for the default plan (None: the default device's).
    """
    from dsv4jax.pallas.indexer_topk import kernel

    return kernel.indexer_scores_kernel(q, weights, keys, visible_rows, interpret=interpret, plan=plan,
                                        num_sms=num_sms)


def _select(scores, k: int):
    """Top-k of masked scores, −1 where the slot holds an invisible (−inf) row. `lax.top_k` breaks ties toward
    the lower index, which is the specification's rule (ARCHITECTURE §8.5)."""
    top_scores, top_rows = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return jnp.where(top_scores > -jnp.inf, top_rows, -1).astype(jnp.int32)


def _total_order_key(x):
    """int32 keys ordered like `lax.top_k` orders float32 (total order: −inf < … < −0.0 < +0.0 < … < +inf)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _select_sorted(scores, k: int):
    """Same result as `_select`, by one stable key-value sort of each row (key: the score's total-order int32
    key, bit-inverted for descending; value: the row index).

    Exact: descending keys put higher scores first and the stable sort keeps the lower row first among equal keys.
    Integer keys, because `lax.top_k` orders floats totally (+0.0 above −0.0 — a score is −0.0 when no head fires
    and w < 0) while `lax.sort` on floats treats ±0.0 as equal. An alternative to `lax.top_k` for long rows, timed
    against it in the benchmark."""
    kk = min(k, scores.shape[-1])
    desc = ~_total_order_key(scores)
    rows = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    key, idx = jax.lax.sort((desc, rows), dimension=scores.ndim - 1, num_keys=1, is_stable=True)
    return jnp.where(key[..., :kk] != ~_total_order_key(jnp.float32(-jnp.inf)), idx[..., :kk], -1)


def indexer_topk_kernel(q, weights, keys, visible_rows, k: int, *, interpret=None, plan=None):
    """The kernel path of `indexer_topk`: kernel scores, then `lax.top_k`."""
    return _select(indexer_scores(q, weights, keys, visible_rows, interpret=interpret, plan=plan), k)


def _use_kernel(q, keys, implementation: str = "auto") -> bool:
    _pallas.check_implementation("indexer_topk", implementation)
    reason = None if implementation == "reference" else unsupported_reason(q, keys)
    return _pallas.use_kernel("indexer_topk", implementation, reason)


@functools.partial(jax.named_call, name="indexer_topk")
def indexer_topk(q, weights, keys, visible_rows, k: int, *, implementation: str = "auto"):
    """q [B,S,H,d]; weights [B,S,H] fp32; keys [B,N,d]; visible_rows [B,S] -> rows [B,S,min(k,N)] int32 (-1 unused),
    higher score first, ties to the lower row. The reference is the specification.

    implementation: "reference", "pallas" (the kernel; a ValueError where it does not support the call) or "auto"
    (the kernel on a GPU where supported, else the reference)."""
    if _use_kernel(q, keys, implementation):
        return indexer_topk_kernel(q, weights, keys, visible_rows, k, interpret=_pallas.interpret_params())
    return indexer_topk_reference(q, weights, keys, visible_rows, k)
