"""The MTP module against a direct transcription of ARCHITECTURE §12.1 (with ARCHITECTURE §3 block, ARCHITECTURE §4 mHC, ARCHITECTURE §5 norms,
ARCHITECTURE §6 RoPE, ARCHITECTURE §7 attention, ARCHITECTURE §8.1 sliding window, ARCHITECTURE §9 MoE) in plain jax.numpy, fp32.

The reference reads its parameters out of the nnx model and shares no code with `dsv4jax.model`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state
from numerics import rel_l2

CFG = load_config("configs/test-tiny.json", dtype="float32")  # ratios (0, 4, 128, 4) + MTP, 16 indexer heads
BATCH, SEQ = 2, 40  # 40 > window 16: the window mask matters
TOL = 1e-5
# LLVM optimisation off: ~3x faster compiles on CPU; model and reference are compiled with the same options.
JIT_OPTIONS = {"xla_backend_optimization_level": 0}
HI = jax.lax.Precision.HIGHEST
jit = functools.partial(jax.jit, compiler_options=JIT_OPTIONS)


# ---------------------------------------------------------------------------------------------------------------
# the transcription (fp32 throughout, so the spec's bf16 casts are identities)

def mm(x, w):  # x @ wᵀ with w in checkpoint layout [out, in]
    return jnp.einsum("...i,oi->...o", x, w, precision=HI)


def sigmoid(x):
    return 1 / (1 + jnp.exp(-x))


def softmax(x, axis):
    e = jnp.exp(x - jnp.max(x, axis=axis, keepdims=True))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def rmsnorm(x, weight=None, eps=CFG.rms_norm_eps):  # ARCHITECTURE §5
    y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def rope(x, pos, theta, inverse=False):
    """ARCHITECTURE §6.1: rotate the LAST rope_head_dim channels, pairs (2i, 2i+1) as complex numbers, angle pos·θ^(−2i/r)."""
    r = CFG.rope_head_dim
    freqs = jnp.asarray((theta ** (-np.arange(0, r, 2, dtype=np.float64) / r)).astype(np.float32))
    angle = pos[..., None] * freqs * (-1 if inverse else 1)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    re, im = x[..., -r:][..., 0::2], x[..., -r:][..., 1::2]
    rotated = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(*x.shape[:-1], r)
    return jnp.concatenate([x[..., :-r], rotated], axis=-1)


def hc_pre(X, fn, scale, base):
    """ARCHITECTURE §4.2 -> (collapsed input, post, comb)."""
    n, eps = CFG.hc_mult, CFG.hc_eps
    flat = X.reshape(*X.shape[:-2], -1)
    rho = 1 / jnp.sqrt(jnp.mean(flat ** 2, axis=-1, keepdims=True) + CFG.rms_norm_eps)
    mixes = mm(flat, fn) * rho
    pre = sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
    post = 2 * sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    a_comb = mixes[..., 2 * n:].reshape(*mixes.shape[:-1], n, n)  # a_comb[j, k] = mixes[2n + j·n + k]
    C = softmax(a_comb * scale[2] + base[2 * n:].reshape(n, n), axis=-1) + eps
    C = C / (jnp.sum(C, axis=-2, keepdims=True) + eps)
    for _ in range(CFG.hc_sinkhorn_iters - 1):
        C = C / (jnp.sum(C, axis=-1, keepdims=True) + eps)
        C = C / (jnp.sum(C, axis=-2, keepdims=True) + eps)
    x = jnp.sum(pre[..., None] * X, axis=-2)
    return x, post, C


def hc_post(f, R, post, comb):
    """ARCHITECTURE §4.3: X_out[k] = post_k·f + Σ_j comb[j,k]·R_j."""
    return post[..., None] * f[..., None, :] + jnp.einsum("bsjk,bsjd->bskd", comb, R, precision=HI)


def hc_head(X, fn, scale, base):
    """ARCHITECTURE §4.4."""
    flat = X.reshape(*X.shape[:-2], -1)
    rho = 1 / jnp.sqrt(jnp.mean(flat ** 2, axis=-1, keepdims=True) + CFG.rms_norm_eps)
    pre = sigmoid(mm(flat, fn) * rho * scale[0] + base) + CFG.hc_eps
    return jnp.sum(pre[..., None] * X, axis=-2)


def window_attention(x, a, pos):
    """ARCHITECTURE §7 with ARCHITECTURE §8.1's index set: keys max(0, t−w+1)..t, θ = rope_theta without YaRN."""
    B, S, _ = x.shape
    H, d, G, R, w = CFG.num_attention_heads, CFG.head_dim, CFG.o_groups, CFG.o_lora_rank, CFG.sliding_window
    theta = CFG.rope_theta
    c_q = rmsnorm(mm(x, a.wq_a.weight[...]), a.q_norm.weight[...])
    q = mm(c_q, a.wq_b.weight[...]).reshape(B, S, H, d)
    q = rmsnorm(q)  # per head, unweighted
    q = rope(q, pos[:, None], theta)
    kv = rope(rmsnorm(mm(x, a.wkv.weight[...]), a.kv_norm.weight[...]), pos, theta)
    z = jnp.einsum("bshd,btd->bhst", q, kv, precision=HI) * d ** -0.5
    t, s = jnp.arange(S)[None, :], jnp.arange(S)[:, None]
    z = jnp.where((t <= s) & (t > s - w), z, -jnp.inf)
    sink = a.attn_sink[...][None, :, None, None]
    M = jnp.max(z, axis=-1, keepdims=True)
    p = jnp.exp(z - M)
    o = jnp.einsum("bhst,btd->bshd", p, kv, precision=HI) / jnp.moveaxis(
        jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - M), 1, 2)
    o = rope(o, pos[:, None], theta, inverse=True)
    o_g = o.reshape(B, S, G, (H // G) * d)
    wo_a = a.wo_a.weight[...]
    u = jnp.stack([mm(o_g[:, :, g], wo_a[g * R:(g + 1) * R]) for g in range(G)], axis=2)
    return mm(u.reshape(B, S, G * R), a.wo_b.weight[...])


def swiglu(a, b):
    lim = CFG.swiglu_limit
    a, b = jnp.minimum(a, lim), jnp.clip(b, -lim, lim)
    return a * sigmoid(a) * b


def score_routed_moe(x, f):
    """ARCHITECTURE §9, score-routed layer: dense over all experts with zero weight for the unselected ones."""
    s = jnp.sqrt(jnp.logaddexp(0.0, mm(x, f.gate.weight[...])))  # sqrt(softplus)
    _, idx = jax.lax.top_k(s + f.gate.bias[...], CFG.num_experts_per_tok)  # bias for selection only
    chosen = jnp.take_along_axis(s, idx, axis=-1)
    g = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * CFG.routed_scaling_factor
    gates = jnp.sum(jax.nn.one_hot(idx, CFG.n_routed_experts) * g[..., None], axis=-2)  # [B,S,E]
    w1, w3, w2 = f.experts.w1[...], f.experts.w3[...], f.experts.w2[...]
    h = swiglu(jnp.einsum("bsd,eid->bsei", x, w1, precision=HI), jnp.einsum("bsd,eid->bsei", x, w3, precision=HI))
    y = jnp.einsum("bsei,edi->bsd", h * gates[..., None], w2, precision=HI)
    sh = f.shared_experts
    return y + mm(swiglu(mm(x, sh.w1.weight[...]), mm(x, sh.w3.weight[...])), sh.w2.weight[...])


def reference_mtp(model, main_streams, next_ids):
    """ARCHITECTURE §12.1 -> (logits [B,S,V], MTP streams before its hc_head [B,S,n,D]); positions 0..S−1."""
    mtp = model.mtp[0]
    pos = jnp.arange(next_ids.shape[1], dtype=jnp.float32)
    e = rmsnorm(model.embed.weight[...][next_ids], mtp.enorm.weight[...])
    h = rmsnorm(main_streams, mtp.hnorm.weight[...])  # per stream
    X = mm(e, mtp.e_proj.weight[...])[:, :, None, :] + mm(h, mtp.h_proj.weight[...])
    # Block (ARCHITECTURE §3)
    R = X
    x, post, comb = hc_pre(X, mtp.hc_attn.fn[...], mtp.hc_attn.scale[...], mtp.hc_attn.base[...])
    X = hc_post(window_attention(rmsnorm(x, mtp.attn_norm.weight[...]), mtp.attn, pos), R, post, comb)
    R = X
    x, post, comb = hc_pre(X, mtp.hc_ffn.fn[...], mtp.hc_ffn.scale[...], mtp.hc_ffn.base[...])
    X = hc_post(score_routed_moe(rmsnorm(x, mtp.ffn_norm.weight[...]), mtp.ffn), R, post, comb)
    y = rmsnorm(hc_head(X, mtp.hc_head.fn[...], mtp.hc_head.scale[...], mtp.hc_head.base[...]), mtp.norm.weight[...])
    return mm(y, model.head[...]), X  # shared LM head


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_parts():
    graphdef, params = nnx.split(DeepseekV4(CFG, nnx.Rngs(0)))
    # Norm weights start at 1: randomise them so a missing or swapped norm would show.
    keys = iter(jax.random.split(jax.random.key(3), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (1 + 0.2 * jax.random.normal(next(keys), x.shape))
        if "norm']['weight']" in jax.tree_util.keystr(p) else x, params)
    return graphdef, params


def test_mtp_matches_spec_transcription(model_parts):
    graphdef, params = model_parts
    main_streams = jax.random.normal(jax.random.key(1), (BATCH, SEQ, CFG.hc_mult, CFG.hidden_size))
    next_ids = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, CFG.vocab_size)

    def model_side(params, streams, ids):
        m = nnx.merge(graphdef, params)
        hidden, mtp_streams, state = m.mtp_forward(streams, ids, init_state(CFG, BATCH, 64, mtp=True))
        return m.logits(hidden), mtp_streams, state.lengths

    def reference_side(params, streams, ids):
        return reference_mtp(nnx.merge(graphdef, params), streams, ids)

    logits, mtp_streams, lengths = jit(model_side)(params, main_streams, next_ids)
    ref_logits, ref_streams = jit(reference_side)(params, main_streams, next_ids)
    r_logits, r_streams = rel_l2(logits, ref_logits), rel_l2(mtp_streams, ref_streams)
    print(f"\n[mtp vs ARCHITECTURE §12.1 transcription] logits rel={r_logits:.2e}, streams rel={r_streams:.2e}")
    assert logits.shape == (BATCH, SEQ, CFG.vocab_size)
    assert r_logits <= TOL and r_streams <= TOL
    np.testing.assert_array_equal(lengths, [SEQ, SEQ])


def test_main_model_returns_pre_hc_head_streams(model_parts):
    graphdef, params = model_parts
    ids = jax.random.randint(jax.random.key(4), (BATCH, SEQ), 0, CFG.vocab_size)

    def run(params, ids):
        m = nnx.merge(graphdef, params)
        hidden, streams, _ = m(ids, init_state(CFG, BATCH, 64), jnp.full((BATCH,), SEQ, jnp.int32))
        return hidden, streams, m.norm(m.hc_head(streams, hidden.dtype))

    hidden, streams, again = jit(run)(params, ids)
    r = rel_l2(again, hidden)
    print(f"\n[pre-hc-head] norm(hc_head(streams)) vs hidden rel={r:.2e}")
    assert streams.shape == (BATCH, SEQ, CFG.hc_mult, CFG.hidden_size)
    assert r <= 1e-6
