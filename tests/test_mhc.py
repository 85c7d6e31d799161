"""mHC pieces (ARCHITECTURE §4.2-4.3) against float64 transcriptions; the model-level oracle tests cover the rest."""

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.model.mhc import HyperConnection, sinkhorn, stream_mixes


def _sinkhorn64(logits, iters, eps):
    c = np.exp(logits - logits.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def test_sinkhorn_matches_a_float64_transcription(seed):
    logits = jax.random.normal(jax.random.key(seed), (3, 5, 4, 4), jnp.float32) * 3
    got = np.asarray(sinkhorn(logits, 20, 1e-6), np.float64)
    want = _sinkhorn64(np.asarray(logits, np.float64), 20, 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # one iteration fewer is visibly different: the comparison can fail
    assert np.abs(_sinkhorn64(np.asarray(logits, np.float64), 2, 1e-6) - want).max() > 1e-5


def test_stream_mixes_and_post_match_float64(seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    streams = jax.random.normal(ks[0], (2, 7, 4, 64), jnp.bfloat16)
    fn = jax.random.normal(ks[1], (24, 256), jnp.float32) * 0.02
    flat = np.asarray(streams, np.float64).reshape(2, 7, 256)
    want = flat @ np.asarray(fn, np.float64).T / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-6)
    got = np.asarray(stream_mixes(streams, fn, 1e-6), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # the bf16-rounded weight alone would miss by ~1e-3: the comparison can fail
    rounded = flat @ np.asarray(fn.astype(jnp.bfloat16), np.float64).T
    assert np.abs(rounded / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-6) - want).max() > 1e-5 * np.abs(want).max()

    comb = jax.random.uniform(ks[2], (2, 7, 4, 4), jnp.float32)
    post = jax.random.uniform(ks[3], (2, 7, 4), jnp.float32)
    output = jax.random.normal(ks[4], (2, 7, 64), jnp.float32)
    residual = streams.astype(jnp.float32)
    got = np.asarray(HyperConnection.post(output, residual, post, comb), np.float64)
    want = (np.asarray(post, np.float64)[..., None] * np.asarray(output, np.float64)[..., None, :]
            + np.einsum("...jk,...jd->...kd", np.asarray(comb, np.float64), np.asarray(residual, np.float64)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
