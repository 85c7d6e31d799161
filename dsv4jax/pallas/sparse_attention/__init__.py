"""V4 attention core: per query token, all heads attend one shared set of K=V rows with a per-head sink."""

import functools

import jax
import jax.numpy as jnp

from dsv4jax import pallas as _pallas
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference


# By device time (a jitted model pays no per-call dispatch) the kernel beats XLA from 8 queries up on the H100:
# B=8 0.015-0.016 vs 0.018 ms, B=32 0.022-0.023 vs 0.041-0.042, B=128 0.049 vs 0.178; B=1 0.013 vs 0.011
# (bench/results/kernels-sparse_attention-h100-80gb-hbm3.json, commit 1f23353).
MIN_KERNEL_QUERIES = 8


def _use_kernel(q, kv, indices, sink, implementation: str) -> bool:
    _pallas.check_implementation("sparse_attention", implementation)
    if implementation == "reference":
        return False
    from dsv4jax.pallas.sparse_attention.kernel import VERIFIED_ON_GPU, unsupported_reason

    # "auto" takes the kernel only once it has passed on a GPU (NOTES.md: verified on the H100, jax 0.11.2), and
    # only from MIN_KERNEL_QUERIES up.
    queries = q.shape[0] * q.shape[1]
    return _pallas.use_kernel("sparse_attention", implementation, unsupported_reason(q, kv, indices, sink),
                              auto=VERIFIED_ON_GPU and queries >= MIN_KERNEL_QUERIES)


@functools.partial(jax.named_call, name="sparse_attention")
def sparse_attention(q, kv, indices, sink, scale: float, *, implementation: str = "auto"):
    """q [B,S,H,d]; kv [B,N,d] (one head, key = value; batch 1 = shared over B); indices [B,S,K] int32 into kv's
    rows, -1 = unused; sink [H] fp32 -> [B,S,H,d] in q's dtype. The reference is the specification.

    implementation: "reference", "pallas" (the kernel; a ValueError where it does not support the call) or "auto"
    (the kernel on a GPU where supported, from MIN_KERNEL_QUERIES query tokens up; else the reference)."""
    if _use_kernel(q, kv, indices, sink, implementation):
        from dsv4jax.pallas.sparse_attention.kernel import sparse_attention_kernel

        return sparse_attention_kernel(q, kv, indices, sink, scale=float(scale), interpret=_pallas.interpret_params())
    if kv.shape[0] == 1 and q.shape[0] > 1:
        kv = jnp.broadcast_to(kv, (q.shape[0], *kv.shape[1:]))
    return sparse_attention_reference(q, kv, indices, sink, scale)
