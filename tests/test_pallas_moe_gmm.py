"""Mosaic GPU MoE grouped GEMM kernels (dsv4jax/pallas/moe_gmm) against their references, on the CPU through the
Mosaic GPU interpreter (TMA, barriers and wgmma simulated; every allocation, the outputs too, starts as NaN, so
an unwritten row fails). Fresh random inputs each run. bf16 tolerance: relative L2 error <= 2e-2."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_l2

from dsv4jax import compat
from dsv4jax.pallas import moe_gmm
from dsv4jax.pallas.moe_gmm import kernel

TOL = 2e-2
CFG = kernel.Config(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, num_sms=4)


@pytest.fixture
def interp():
    yield compat.mosaic_gpu_interpret_params(uninitialized_memory="nan")
    compat.reset_interpret_state()


def _key(salt=0):
    return jax.random.key(time.time_ns() % (2**31) + salt)


def _rel(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert np.all(np.isfinite(out)), f"{np.sum(~np.isfinite(out))} non-finite (unwritten) outputs"
    return rel_l2(out, ref)


def _inputs(sizes, k, n, salt=0):
    sizes = jnp.asarray(sizes, jnp.int32)
    m = int(sizes.sum())
    ks = jax.random.split(_key(salt), 4)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    # Scaled so that the projections often pass the SwiGLU limit (1.5 below).
    w1 = jax.random.normal(ks[1], (len(sizes), n, k), jnp.bfloat16) * float(2 / np.sqrt(k))
    w3 = jax.random.normal(ks[2], (len(sizes), n, k), jnp.bfloat16) * float(2 / np.sqrt(k))
    rw = jax.random.uniform(ks[3], (m,), jnp.float32)
    return sizes, x, w1, w3, rw


def _fp8(shape, salt):
    ks = jax.random.split(_key(salt), 2)
    w = (jax.random.normal(ks[0], shape) * 60).astype(jnp.float8_e4m3fn)
    exps = jax.random.randint(ks[1], (shape[0], shape[1] // 128, shape[2] // 128), 118, 124).astype(jnp.uint8)
    return w, jax.lax.bitcast_convert_type(exps, jnp.float8_e8m0fnu)


def test_tile_schedule_covers_every_row_once():
    rng = np.random.default_rng(time.time_ns() % 2**32)
    for _ in range(20):
        sizes = rng.integers(0, 90, size=rng.integers(1, 12)) * rng.integers(0, 2, size=1)
        sizes[rng.integers(0, len(sizes))] += 1
        m, bm = int(sizes.sum()), int(rng.choice([64, 128]))
        sched = np.asarray(kernel.tile_schedule(jnp.asarray(sizes), m, bm))
        assert sched.shape[1] == kernel.max_tiles(m, len(sizes), bm)
        owner = np.full(m, -1)
        m_pad = -(-m // bm) * bm
        for t in range(sched[4, 0]):
            g, row, lo, hi = sched[:4, t]
            assert 0 <= lo < hi <= bm and 0 <= row <= m_pad - bm and row % kernel.ROW_ALIGN == 0
            rows = np.arange(row + lo, row + hi)
            assert np.all(owner[rows] == -1)
            owner[rows] = g
        assert np.all(sched[2:4, sched[4, 0]:] == 0)
        assert np.array_equal(owner, np.repeat(np.arange(len(sizes)), sizes))
        # one tile per started block_m rows of each group, counted from its first row rounded down to ROW_ALIGN
        starts = np.cumsum(sizes) - sizes
        assert sched[4, 0] == sum(-(-(size + start % kernel.ROW_ALIGN) // bm) for size, start in zip(sizes, starts)
                                  if size)


@pytest.mark.parametrize("sizes", [[37, 0, 50, 0, 13], [0, 0, 150, 0], [37, 150, 13]],
                         ids=["zero_groups_odd_rows", "one_group", "unaligned_group_of_three_tiles"])
def test_grouped_matmul(sizes, interp):
    sizes, x, w1, _, _ = _inputs(sizes, 128, 128)
    out = moe_gmm.grouped_matmul(x, w1, sizes, cfg=CFG, interpret=interp)
    assert out.shape == (x.shape[0], 128) and out.dtype == jnp.bfloat16
    assert _rel(out, moe_gmm.grouped_matmul_ref(x, w1, sizes)) <= TOL


@pytest.mark.parametrize("sizes", [[20, 0, 0, 71, 9], [0, 130, 0]], ids=["zero_groups_odd_rows", "one_group"])
def test_grouped_matmul_swiglu(sizes, interp):
    sizes, x, w1, w3, rw = _inputs(sizes, 128, 128, salt=1)
    out = moe_gmm.grouped_matmul_swiglu(x, w1, w3, sizes, rw, 1.5, cfg=CFG, interpret=interp)
    ref = moe_gmm.grouped_matmul_swiglu_ref(x, w1, w3, sizes, rw, 1.5)
    assert _rel(out, ref) <= TOL


def test_fp8_weights(interp):
    sizes, x, _, _, rw = _inputs([0, 45, 0, 30], 256, 128, salt=2)
    w1, s1 = _fp8((4, 128, 256), 3)
    w3, s3 = _fp8((4, 128, 256), 4)
    # The reference dequantises exactly (ARCHITECTURE §10.2) and multiplies in bf16.
    deq = moe_gmm.dequantize_fp8_blocks(w1, s1)
    assert float(deq[1, 5, 200]) == float(w1[1, 5, 200].astype(jnp.float32)) * 2.0 ** (
        int(jax.lax.bitcast_convert_type(s1[1, 0, 1], jnp.uint8)) - 127)
    out = moe_gmm.grouped_matmul(x, w1, sizes, s1, cfg=CFG, interpret=interp)
    assert _rel(out, moe_gmm.grouped_matmul_ref(x, w1, sizes, s1)) <= TOL
    out = moe_gmm.grouped_matmul_swiglu(x, w1, w3, sizes, rw, 1.5, s1, s3, cfg=CFG, interpret=interp)
    assert _rel(out, moe_gmm.grouped_matmul_swiglu_ref(x, w1, w3, sizes, rw, 1.5, s1, s3)) <= TOL


def test_routed_experts_dispatch(interp):
    """The public function with implementation "pallas" (interpreted on the CPU) against the reference."""
    tokens, top_k, e, d, i = 21, 2, 4, 128, 128
    ks = jax.random.split(_key(5), 6)
    x = jax.random.normal(ks[0], (tokens, d), jnp.bfloat16)
    experts = jnp.argsort(jax.random.uniform(ks[1], (tokens, e)), axis=1)[:, :top_k].astype(jnp.int32)
    experts = experts.at[:, 0].set(jnp.where(experts[:, 0] == 3, 1, experts[:, 0]))  # expert 3: few or no rows
    weights = jax.random.uniform(ks[2], (tokens, top_k))
    w1 = jax.random.normal(ks[3], (e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w3 = jax.random.normal(ks[4], (e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w2 = jax.random.normal(ks[5], (e, d, i), jnp.bfloat16) * float(1 / np.sqrt(i))
    assert moe_gmm.kernel_supported(x, experts, w1, w3, w2)
    got = moe_gmm.routed_experts_pallas(x, experts, weights, w1, w3, w2, 1.5, interpret=interp)
    ref = moe_gmm.routed_experts_reference(x, experts, weights, w1, w3, w2, 1.5)
    assert got.shape == (tokens, d) and got.dtype == jnp.float32
    assert _rel(got, ref) <= TOL
    for implementation in ("reference", "auto"):  # "auto" on a CPU: the reference
        got = moe_gmm.routed_experts(x, experts, weights, w1, w3, w2, 1.5, implementation=implementation)
        assert _rel(got, ref) == 0.0
    got = moe_gmm.routed_experts(x, experts, weights, w1, w3, w2, 1.5, implementation="pallas")  # interpreted
    assert _rel(got, ref) <= TOL


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("rows", [6, 6144], ids=["decode_config", "prefill_config"])
def test_kernels_lower_for_the_gpu(rows, fp8):
    """Mosaic GPU lowering (layout inference included) runs on the CPU: a kernel that the interpreter accepts but
    the GPU compiler would refuse fails here, not on the device. Default configs, V4-Flash widths."""
    experts, inter, dim = 8, 2048, 4096
    spec = jax.ShapeDtypeStruct
    weight = jnp.float8_e4m3fn if fp8 else jnp.bfloat16

    def scale(n, k):
        return spec((experts, n // 128, k // 128), jnp.float8_e8m0fnu) if fp8 else None

    def layers(x, sizes, row_weights, w13, w2, s13, s2):
        h = kernel.grouped_matmul_swiglu(x, w13, w13, sizes, row_weights, 10.0, s13, s13)
        return kernel.grouped_matmul(h, w2, sizes, s2)

    args = (spec((rows, dim), jnp.bfloat16), spec((experts,), jnp.int32), spec((rows,), jnp.float32),
            spec((experts, inter, dim), weight), spec((experts, dim, inter), weight), scale(inter, dim),
            scale(dim, inter))
    text = jax.jit(layers).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2  # both kernels


def test_routed_experts_drop_pairs_with_expert_id_e(interp):
    """Expert id E drops a pair (how an expert-parallel shard skips experts it does not hold): both paths equal the
    reference without those pairs. The kernel never writes the dropped rows (NaN-poisoned here), so they must not
    reach the sum."""
    tokens, top_k, e, d, i = 19, 3, 4, 128, 128
    ks = jax.random.split(_key(6), 7)
    x = jax.random.normal(ks[0], (tokens, d), jnp.bfloat16)
    experts = jnp.argsort(jax.random.uniform(ks[1], (tokens, e)), axis=1)[:, :top_k].astype(jnp.int32)
    weights = jax.random.uniform(ks[2], (tokens, top_k))
    dropped = jax.random.uniform(ks[6], (tokens, top_k)) < 0.4
    w1 = jax.random.normal(ks[3], (e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w3 = jax.random.normal(ks[4], (e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w2 = jax.random.normal(ks[5], (e, d, i), jnp.bfloat16) * float(1 / np.sqrt(i))
    expected = moe_gmm.routed_experts_reference(x, experts, jnp.where(dropped, 0.0, weights), w1, w3, w2, 1.5)
    with_drops = (x, jnp.where(dropped, e, experts), weights, w1, w3, w2, 1.5)
    assert _rel(moe_gmm.routed_experts_reference(*with_drops), expected) <= 1e-6
    assert _rel(moe_gmm.routed_experts_pallas(*with_drops, interpret=interp), expected) <= TOL


def test_routed_experts_of_one_layer_of_a_stack(interp):
    """A scanned group's experts (ARCHITECTURE §3.1): stacks [L, E, ...] and a traced layer index. The kernels read
    that layer's experts in place (groups layer·E … of the flattened stack); both paths equal the reference on the
    layer's own weights, dropped pairs included."""
    layers, tokens, top_k, e, d, i = 3, 17, 2, 4, 128, 128
    ks = jax.random.split(_key(7), 7)
    x = jax.random.normal(ks[0], (tokens, d), jnp.bfloat16)
    experts = jnp.argsort(jax.random.uniform(ks[1], (tokens, e)), axis=1)[:, :top_k].astype(jnp.int32)
    experts = jnp.where(jax.random.uniform(ks[6], (tokens, top_k)) < 0.3, e, experts)  # some pairs dropped
    weights = jax.random.uniform(ks[2], (tokens, top_k))
    w1 = jax.random.normal(ks[3], (layers, e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w3 = jax.random.normal(ks[4], (layers, e, i, d), jnp.bfloat16) * float(2 / np.sqrt(d))
    w2 = jax.random.normal(ks[5], (layers, e, d, i), jnp.bfloat16) * float(1 / np.sqrt(i))
    for layer in (1, 2):
        expected = moe_gmm.routed_experts_reference(x, experts, weights, w1[layer], w3[layer], w2[layer], 1.5)
        reference = jax.jit(lambda index: moe_gmm.routed_experts(x, experts, weights, w1, w3, w2, 1.5,
                                                                 implementation="reference", layer=index))
        assert _rel(reference(layer), expected) == 0.0
        kernels = jax.jit(lambda index: moe_gmm.routed_experts_pallas(x, experts, weights, w1, w3, w2, 1.5,
                                                                      interpret=interp, layer=index))
        assert _rel(kernels(layer), expected) <= TOL  # outputs NaN-poisoned: every kept row written
