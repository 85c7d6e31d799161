"""The Mosaic GPU lightning-indexer kernel, run by the Mosaic GPU interpreter on the CPU, against the reference.

Scores: fp32 reference on the same bf16 inputs, relative error (max |Δ| / max |ref|) ≤ 2e-2 — the kernel
accumulates in fp32, so it lands near 1e-6. Selections: the row SETS must equal the reference's for every query
whose k-th and (k+1)-th reference scores are further apart than the score tolerance; the −1 tail must match exactly.
Unwritten output would show as NaN: the interpreter fills fresh buffers with NaN (`uninitialized_memory="nan"`).
"""

import os

# The interpreter runs each warpgroup as a separate XLA:CPU computation that blocks inside barrier callbacks; with
# XLA's default pool of one thread per core (2 here) the producer warpgroup can starve. Must precede JAX's CPU client.
os.environ.setdefault("NPROC", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dsv4jax import compat  # noqa: E402
from dsv4jax.pallas.indexer_topk import (  # noqa: E402
    indexer_scores, indexer_scores_reference, indexer_topk, indexer_topk_kernel, indexer_topk_reference, kernel)

SCORE_RTOL = 2e-2      # bf16-input tolerance of the brief
KERNEL_RTOL = 1e-4     # what fp32 accumulation must reach
SET_GAP = 2 * KERNEL_RTOL   # boundary gaps (relative to the largest score) beyond which selections must agree
_seed = [0]


def _interpret():
    return compat.mosaic_gpu_interpret_params(uninitialized_memory="nan", detect_races=False)


def _inputs(b, s, h, d, n):
    _seed[0] += 1
    ks = jax.random.split(jax.random.key(1000 + _seed[0] + int(np.random.randint(1 << 20))), 3)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.bfloat16)
    w = jax.random.normal(ks[1], (b, s, h), jnp.float32) * 0.3
    keys = jax.random.normal(ks[2], (b, n, d), jnp.bfloat16)
    return q, w, keys


def _ref_scores(q, w, keys, vis):
    ref = np.asarray(indexer_scores_reference(q.astype(jnp.float32), w, keys.astype(jnp.float32)))
    n = keys.shape[1]
    visible = np.arange(n)[None, None, :] < np.asarray(vis)[..., None]
    return np.where(visible, ref, -np.inf)


def _check(q, w, keys, vis, k, plan):
    got = np.asarray(indexer_scores(q, w, keys, vis, interpret=_interpret(), plan=plan))
    ref = _ref_scores(q, w, keys, vis)
    assert got.shape == ref.shape
    assert not np.isnan(got).any(), "unwritten (NaN) output"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = np.isfinite(ref)
    scale = np.abs(ref[fin]).max() if fin.any() else 1.0
    if fin.any():
        rel = np.abs(got[fin] - ref[fin]).max() / scale
        assert rel <= SCORE_RTOL, rel
        assert rel <= KERNEL_RTOL, f"fp32 accumulation should be far inside the bf16 tolerance: {rel}"

    # Selections: the kernel path's top-k against the reference's, as sets, where the boundary gap is clear.
    rows = np.asarray(jax.jit(lambda s: _select_rows(s, k))(jnp.asarray(got)))
    ref_rows = np.asarray(indexer_topk_reference(q, w, keys, vis, k))
    kk = min(k, keys.shape[1])
    assert rows.shape == ref_rows.shape == q.shape[:2] + (kk,)
    np.testing.assert_array_equal((rows < 0).sum(-1), (ref_rows < 0).sum(-1))
    srt = -np.sort(-np.where(fin, ref, -np.inf), axis=-1)
    compared = 0
    for bi, ti in np.ndindex(*q.shape[:2]):
        nvis = int(fin[bi, ti].sum())
        if nvis > kk:
            gap = srt[bi, ti, kk - 1] - srt[bi, ti, kk]
            if gap <= SET_GAP * scale:
                continue
        a, r = set(rows[bi, ti][rows[bi, ti] >= 0]), set(ref_rows[bi, ti][ref_rows[bi, ti] >= 0])
        assert a == r, (bi, ti, sorted(a ^ r))
        compared += 1
    assert compared >= q.shape[0] * q.shape[1] // 2
    return got


def _select_rows(scores, k):
    top, idx = jax.lax.top_k(scores, min(k, scores.shape[-1]))
    return jnp.where(top > -jnp.inf, idx, -1)


def test_prefill_causal_real_width():
    """H=64, d=128 (the real indexer), prefill visibility ⌊(t+1)/4⌋: t = 0..2 see no row (all −1), the rest fewer
    rows than k (−1 tail)."""
    b, s, h, d = 1, 24, 64, 128
    n = s // 4
    q, w, keys = _inputs(b, s, h, d, n)
    vis = jnp.broadcast_to((jnp.arange(s) + 1) // 4, (b, s)).astype(jnp.int32)
    _check(q, w, keys, vis, 4, kernel.make_plan(b, s, h, d, n, splits=1))


def test_causal_skips_invisible_key_steps():
    """A causal-shaped pattern over several 128-row key steps, N not a multiple of the step: token tiles whose rows
    end before a step skip it (−inf written without loads); the last step is partial."""
    b, s, h, d, n = 1, 16, 16, 64, 300
    q, w, keys = _inputs(b, s, h, d, n)
    vis = jnp.broadcast_to((jnp.arange(s) + 1) * n // s, (b, s)).astype(jnp.int32)   # 18 … 300 rows
    plan = kernel.make_plan(b, s, h, d, n, splits=1, stages=2)
    assert plan.total_steps == 3 and plan.rows_padded == 384
    _check(q, w, keys, vis, 32, plan)


@pytest.mark.parametrize("s", [1, 3])
def test_decode_ragged(s):
    """Decode: B=3 sequences with ragged visible counts (one with none, one with fewer than k, one with all),
    key steps split over CTAs, N not a multiple of the step."""
    b, h, d, n = 3, 16, 64, 200
    q, w, keys = _inputs(b, s, h, d, n)
    base = np.array([[0], [37], [200]])
    vis = jnp.asarray(np.clip(base + np.arange(s)[None, :] - (s - 1), 0, n), jnp.int32)
    plan = kernel.make_plan(b, s, h, d, n, splits=2)
    assert plan.tile_tokens == s and plan.splits == 2
    _check(q, w, keys, vis, 64, plan)


def test_all_rows_and_token_padding():
    """visible_rows=None (all rows, the reference's plain scores) with S not a multiple of the token tile."""
    b, s, h, d, n = 1, 6, 16, 64, 128
    q, w, keys = _inputs(b, s, h, d, n)
    plan = kernel.make_plan(b, s, h, d, n, splits=1)
    assert plan.tokens_padded == 8
    got = np.asarray(indexer_scores(q, w, keys, None, interpret=_interpret(), plan=plan))
    ref = np.asarray(indexer_scores_reference(q.astype(jnp.float32), w, keys.astype(jnp.float32)))
    assert np.abs(got - ref).max() / np.abs(ref).max() <= KERNEL_RTOL


def test_topk_kernel_path_matches_reference_selection():
    """`indexer_topk_kernel` (kernel scores + lax.top_k) selects the reference's sets."""
    b, s, h, d, n = 2, 4, 16, 64, 256
    q, w, keys = _inputs(b, s, h, d, n)
    vis = jnp.asarray([[5, 100, 255, 256], [0, 1, 64, 200]], jnp.int32)
    got = np.asarray(indexer_topk_kernel(q, w, keys, vis, 64, interpret=_interpret(),
                                         plan=kernel.make_plan(b, s, h, d, n, splits=1)))
    ref = np.asarray(indexer_topk_reference(q, w, keys, vis, 64))
    for bi, ti in np.ndindex(b, s):
        assert set(got[bi, ti]) == set(ref[bi, ti])


def test_dispatch():
    """On this CPU, "auto" and "reference" run the reference; "pallas" refuses unsupported shapes."""
    q, w, keys = _inputs(1, 4, 8, 32, 16)
    vis = jnp.full((1, 4), 16, jnp.int32)
    ref = indexer_topk_reference(q, w, keys, vis, 4)
    for choice in ("auto", "reference"):
        np.testing.assert_array_equal(indexer_topk(q, w, keys, vis, 4, implementation=choice), ref)
    with pytest.raises(ValueError, match="indexer_topk.*d must be 64 or 128"):
        indexer_topk(q, w, keys, vis, 4, implementation="pallas")
    assert not kernel.supported(q.shape, keys.shape, q.dtype)          # d = 32 < 64
    assert kernel.supported((2, 8, 64, 128), (2, 512, 128), jnp.bfloat16)
    assert not kernel.supported((2, 8, 64, 128), (2, 512, 128), jnp.float32)


def test_sort_selection_equals_top_k():
    """The sort-based selection (timed against `lax.top_k` in the benchmark) returns exactly `lax.top_k`'s rows:
    ties to the lower row, +0.0 above −0.0 (both occur: no head fires, w of either sign), −inf rows as −1."""
    from dsv4jax.pallas.indexer_topk import _select, _select_sorted

    rng = np.random.default_rng()
    for shape, k in (((3, 5, 300), 64), ((2, 7, 50), 64), ((4, 1000), 512)):
        x = rng.normal(size=shape).astype(np.float32)
        x[..., ::7] = 0.0
        x[..., 1::11] = -0.0
        x[..., 2::13] = -np.inf
        x[..., 3::17] = x[..., 5::17][..., : x[..., 3::17].shape[-1]]     # exact ties
        x[0] = np.where(np.arange(shape[-1]) < 20, x[0], -np.inf)          # fewer visible rows than k
        np.testing.assert_array_equal(np.asarray(_select_sorted(jnp.asarray(x), k)),
                                      np.asarray(_select(jnp.asarray(x), k)))


@pytest.mark.parametrize("b,s,n", [(1, 4096, 1024), (32, 1, 32768)], ids=["prefill", "decode"])
def test_kernel_lowers_for_the_gpu(b, s, n):
    """Mosaic GPU lowering (layout inference included) on the CPU, at V4-Flash indexer widths (64 heads x 128):
    what the interpreter accepts but the GPU compiler would refuse fails here, not on the device."""
    spec = jax.ShapeDtypeStruct
    args = (spec((b, s, 64, 128), jnp.bfloat16), spec((b, s, 64), jnp.float32), spec((b, n, 128), jnp.bfloat16),
            spec((b, s), jnp.int32))
    text = jax.jit(indexer_scores).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
