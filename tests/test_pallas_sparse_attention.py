"""The Mosaic GPU sparse attention kernel in the Mosaic GPU interpreter (CPU) against the reference.

The interpreter fills every allocation with NaN (uninitialized_memory="nan"), so unwritten outputs fail.
Its wgmma has no transposed operands and no A-in-registers form: in interpret mode the kernel computes its two
products with plain dots and tests everything else (row gathers, staging->tiled conversion, barriers and the
pipeline, the partial-score exchange, masking, online softmax with the sink, padding of heads and K).
"""

import jax
import jax.numpy as jnp
import pytest

from dsv4jax import compat
from dsv4jax.pallas.sparse_attention.kernel import sparse_attention_kernel
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference

D = 128


def _inputs(seed, B, S, H, N, K, Bk=None, d=D):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, S, H, d), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (Bk or B, N, d), jnp.bfloat16)
    idx = jax.random.randint(ks[2], (B, S, K), 0, N, dtype=jnp.int32)
    sink = jax.random.normal(ks[3], (H,), jnp.float32)
    return q, kv, idx, sink


def _check(q, kv, idx, sink, splits=1):
    scale = q.shape[-1] ** -0.5
    try:
        out = sparse_attention_kernel(q, kv, idx, sink, scale=scale, interpret=compat.mosaic_gpu_interpret_params(),
                                      splits=splits)
        out = jax.block_until_ready(out)
    except Exception:
        compat.reset_interpret_state()
        raise
    kvb = jnp.broadcast_to(kv, (q.shape[0], *kv.shape[1:]))
    ref32 = sparse_attention_reference(q.astype(jnp.float32), kvb.astype(jnp.float32), idx, sink, scale)
    ref16 = sparse_attention_reference(q, kvb, idx, sink, scale).astype(jnp.float32)
    out = out.astype(jnp.float32)
    assert not jnp.isnan(out).any()
    for ref in (ref32, ref16):
        err = jnp.linalg.norm((out - ref).ravel()) / jnp.linalg.norm(ref.ravel())
        assert err <= 2e-2, float(err)


def test_many_invalid_and_k_not_block_multiple(seed):
    q, kv, idx, sink = _inputs(seed, 1, 2, 16, 100, 70)
    drop = jax.random.uniform(jax.random.key(seed + 1), idx.shape) < 0.6
    _check(q, kv, jnp.where(drop, -1, idx), sink)


def test_only_a_few_window_rows(seed):
    q, kv, idx, sink = _inputs(seed, 1, 1, 64, 90, 64)
    idx = jnp.where(jnp.arange(64) < 3, 80 - jnp.arange(64), -1)[None, None].astype(jnp.int32)
    _check(q, kv, idx, sink)


def test_early_tokens_window_has_unused_slots(seed):
    # window of 8 (t, t-1, ..., t-7) for t = 0, 1: negative positions are -1; then 24 compressed slots
    q, kv, idx, sink = _inputs(seed, 1, 2, 16, 64, 32)
    t = jnp.arange(2)[:, None]
    window = t - jnp.arange(8)[None]
    window = jnp.where(window >= 0, window, -1)
    comp = jnp.where(jnp.arange(24)[None] < 5, 40 + jnp.arange(24)[None], -1) + 0 * t
    _check(q, kv, jnp.concatenate([window, comp], 1)[None].astype(jnp.int32), sink)


@pytest.mark.parametrize("S", [1, 3])
def test_ragged_decode(seed, S):
    B, K = 2, 40
    q, kv, idx, sink = _inputs(seed, B, S, 16, 120, K)
    valid = jax.random.randint(jax.random.key(seed + 2), (B, S, 1), 1, K + 1)
    _check(q, kv, jnp.where(jnp.arange(K) < valid, idx, -1), sink)


def test_h64_kv_shared_over_batch(seed):
    q, kv, idx, sink = _inputs(seed, 2, 1, 64, 100, 33, Bk=1)
    _check(q, kv, idx, sink)


def test_d256_128_column_chunks(seed):
    # d=256 takes 128-column chunks (d/2; the GPU default at d=512 is 256, d=128 falls back to 64)
    q, kv, idx, sink = _inputs(seed, 1, 2, 16, 80, 40, d=256)
    _check(q, kv, jnp.where(jnp.arange(40) % 7 == 3, -1, idx), sink)


def test_more_blocks_than_the_index_ring(seed):
    # K = 200 is 7 blocks of 32: the ring of 6 index blocks wraps, refilled while the compute WGs run
    q, kv, idx, sink = _inputs(seed, 1, 2, 16, 300, 200)
    _check(q, kv, jnp.where(jax.random.uniform(jax.random.key(seed + 3), idx.shape) < 0.2, -1, idx), sink)


def test_split_over_k_with_empty_splits(seed, splits=3):
    # decode-like: 2 sequences × 2 tokens, K = 160 (5 blocks: 2 + 2 + 1) over 3 CTAs each; one token's only
    # valid rows sit in the first block, so the later splits see none (l = 0, weight 0), and the sink is counted
    # once; the last split is short
    q, kv, idx, sink = _inputs(seed, 2, 2, 16, 400, 160)
    idx = idx.at[0, 1, 20:].set(-1)
    idx = jnp.where(jax.random.uniform(jax.random.key(seed + 4), idx.shape) < 0.3, -1, idx)
    _check(q, kv, idx, sink, splits=splits)


@pytest.mark.parametrize("K", [640, 4224, 8320])
def test_lowers_for_the_gpu_at_long_context_k(K):
    # HCA attends all visible compressed rows: K = 128 + n/128 grows with the context (4224 at 512k tokens,
    # 8320 at 1M). Shared memory must not grow with K (it once held all indices and overflowed at 512k).
    args = (jax.ShapeDtypeStruct((4, 1, 64, 512), jnp.bfloat16), jax.ShapeDtypeStruct((4, 9000, 512), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 1, K), jnp.int32), jax.ShapeDtypeStruct((64,), jnp.float32))
    for splits in (1, 4):
        jax.jit(lambda *a: sparse_attention_kernel(*a, scale=0.04, splits=splits)).trace(*args).lower(
            lowering_platforms=("cuda",))
