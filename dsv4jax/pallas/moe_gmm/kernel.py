"""Mosaic GPU grouped GEMMs for the routed experts (Hopper: TMA + wgmma, persistent group-aware grid).

Rows of the left operand are sorted by group (expert): row r belongs to group g when
cumsum(sizes)[g-1] <= r < cumsum(sizes)[g]. Weights are in checkpoint layout [G, N, K] (contract over the last
axis), bf16 or float8_e4m3fn with 128x128 UE8M0 block scales.

Work decomposition (all computed in plain JAX before the kernel, `tile_schedule`): each group's rows are cut into
block_m-row *tiles* from its first row (rounded down to a multiple of 8 for the TMA), so a tile spends almost no
rows on a neighbouring group: a group of 192 rows is two tiles wherever it starts (cut at global block_m
boundaries, it was often three, each streaming the expert's weights). There are at most cdiv(M, block_m) + G - 1
tiles and at most M, so the static bound is tight in every regime (decode: one tile per touched expert; prefill:
~M / block_m). Each tile is computed for all N / block_n column blocks. The kernel
is persistent: one CTA per SM walks the flattened (tile, column block) work list, whose length is read from
memory at run time, so empty groups and unused tiles cost nothing. For each work item the K loop is a
multi-stage TMA -> wgmma pipeline (`plgpu.emit_pipeline`); the epilogue rounds the fp32 accumulators, applies
the clamped SwiGLU and the per-row routing weight (fused kernel), writes the tile to shared memory and stores
only the rows of its group with a ladder of power-of-two TMA stores (rows of other groups sharing the block are
written by their own tiles).

FP8 weights: each e4m3 tile is TMA-loaded as fp8, converted in registers (e4m3 -> f16 -> f32, times the
power-of-two block scale, -> bf16, all exact) into a double-buffered bf16 shared-memory tile, and fed to the
bf16 wgmma. Activations stay bf16 (the spec's dequantised weights), so results equal the bf16 kernel on the
dequantised weights up to accumulation order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

_SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int = 128
    block_n: int = 128       # per weight matrix (the fused kernel computes two block_n wide tiles)
    block_k: int = 64
    max_concurrent_steps: int = 4
    num_sms: int | None = None  # CTAs of the persistent grid; None: the default device's SMs (`sm_count`)


def default_config(m: int, n: int, k: int, *, fused: bool, fp8: bool = False) -> Config:
    """Block sizes: small row counts (decode) use 64-row tiles and narrow columns, to spread the weight
    streaming over more SMs (fp8 weights: wider tiles per step); large row counts use 128 x 128 tiles (fused:
    128 x (64 + 64))."""
    if m <= 512 and fp8:
        # H100, one token (kernel-limits-h100-80gb-hbm3.json): fused 64.5 µs at block_n 128 vs 88.5 at 64; plain
        # 32.3 µs at block_k 128 vs 45.6 at 64 (fp8 tiles are half as many bytes, so larger ones per step).
        return Config(block_m=64, block_n=128 if fused else 64, block_k=64 if fused else 128, max_concurrent_steps=4)
    if m <= 512:
        bm, bn, stages = 64, 64, 6
    else:
        bm, bn, stages = 128, (64 if fused else 128), 4
    return Config(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=stages)


def unsupported_reason(m: int, n: int, k: int, cfg: Config) -> str | None:
    """None when the kernel takes an [m, k] x [n, k] grouped GEMM with `cfg`, else why not."""
    if m < 1:
        return "no rows"
    # block_n = 32 lowers but faults on the H100 (misaligned address; fp8: no layout found), kernel-limits-*.json
    if cfg.block_n < 64:
        return f"block_n={cfg.block_n} < 64"
    if n % cfg.block_n or k % cfg.block_k:
        return f"n={n} and k={k} must be multiples of block_n={cfg.block_n} and block_k={cfg.block_k}"
    return None


def supported(m: int, n: int, k: int, cfg: Config) -> bool:
    return unsupported_reason(m, n, k, cfg) is None


def max_tiles(m: int, groups: int, block_m: int) -> int:
    return max(1, min(-(-m // block_m) + groups - 1, m))


# One fusion comparing every tile with every group end, not the default binary search, which XLA runs as a while
# loop (on GPUs: ~9 dependent launches with a host round trip each, for 256 groups, twice per MoE layer).
SEARCH_METHOD = "compare_all"


# A tile's rows are TMA-loaded into shared memory tiled in 8-row groups; Mosaic GPU lowers the load only from a row
# offset it knows to be a multiple of 8 (from any other offset, layout inference fails).
ROW_ALIGN = 8


def tile_schedule(group_sizes: jax.Array, m: int, block_m: int, group_offset=0) -> jax.Array:
    """int32 [5, max_tiles]: per tile its group (+ `group_offset`: the weight it multiplies), the first of the
    block_m rows it loads (a multiple of ROW_ALIGN), and the first and end row of its group within those rows;
    [4, 0] holds the number of valid tiles. A group's tiles start at its first row rounded down to ROW_ALIGN, so
    they hold (nearly) only its rows. Tiles are ordered by group then position; invalid tiles have first == end == 0."""
    sizes = group_sizes.astype(jnp.int32)
    groups = sizes.shape[0]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    base = starts // ROW_ALIGN * ROW_ALIGN
    count = jnp.where(sizes > 0, -(-(ends - base) // block_m), 0)
    cum = jnp.cumsum(count)
    total = cum[-1]
    t = jnp.arange(max_tiles(m, groups, block_m), dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(cum, t, side="right", method=SEARCH_METHOD), groups - 1).astype(jnp.int32)
    tile_start = base[g] + (t - (cum[g] - count[g])) * block_m
    # The kernel reads block_m rows: a tile near the end of the padded rows is read from further back.
    m_pad = -(-m // block_m) * block_m
    row = jnp.minimum(tile_start, m_pad - block_m)
    lo = jnp.maximum(starts[g], tile_start) - row
    hi = jnp.minimum(ends[g], tile_start + block_m) - row
    valid = t < total
    zero = jnp.zeros_like(t)
    out = [jnp.where(valid, g, zero) + group_offset, jnp.where(valid, row, zero), jnp.where(valid, lo, zero),
           jnp.where(valid, hi, zero), zero.at[0].set(total)]
    return jnp.stack(out).astype(jnp.int32)


def _kernel(*, m_pad: int, n: int, k: int, n_weights: int, fp8: bool, swiglu: bool, limit: float,
            out_dtype, cfg: Config, interpret=None, rhs_kn: bool = False):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from dsv4jax.pallas import sm_count

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    n_blocks, k_steps = n // bn, k // bk
    if fp8:
        assert _SCALE_BLOCK % bn == 0 and _SCALE_BLOCK % bk == 0, (bn, bk)
    row_powers = []
    p = 1
    while p <= bm:
        row_powers.append(p)
        p *= 2
    row_powers.reverse()

    def rhs_view(w_smem):
        # Checkpoint layout: the (bn, bk) tile is K-major, wgmma reads it transposed. The interpreter's wgmma
        # does not take transposed operands, so interpret mode runs on [G, K, N] weights with (bk, bn) tiles.
        return w_smem if rhs_kn else plgpu.transpose_ref(w_smem, (1, 0))

    def body(*refs):
        sched_ref, x_ref = refs[:2]
        w_refs = refs[2:2 + n_weights]
        rest = refs[2 + n_weights:]
        s_refs = rest[:n_weights] if fp8 else ()
        rest = rest[n_weights:] if fp8 else rest
        rw_ref = rest[0] if swiglu else None
        out_ref = rest[-1]

        total = sched_ref[4, 0] * n_blocks

        def scratch_scope(rw_smem, rw_barrier, o_smem, *dq_smems):
            @plgpu.nd_loop((total,), collective_axes="sm")
            def _work(info):
                (li,) = info.index
                t = lax.div(li, n_blocks)
                ni = lax.rem(li, n_blocks)
                g = sched_ref[0, t]
                row = pl.multiple_of(sched_ref[1, t], ROW_ALIGN)
                lo = sched_ref[2, t]
                hi = sched_ref[3, t]
                if swiglu:
                    plgpu.copy_gmem_to_smem(rw_ref.at[pl.ds(row, bm)], rw_smem, rw_barrier)

                def mma_step(idxs, x_smem, *w_smems, accs):
                    if not fp8:
                        for acc, w_smem in zip(accs, w_smems):
                            plgpu.wgmma(acc, x_smem, rhs_view(w_smem))
                        # Keep this step's wgmma in flight; the previous step's is done, so its slots (released
                        # one step late, delay_release=1) can be refilled.
                        plgpu.wgmma_wait(n_weights)
                        return
                    (ki,) = idxs
                    slot = lax.rem(ki, 2)
                    for j, (acc, w_smem) in enumerate(zip(accs, w_smems)):
                        scale = s_refs[j][g, lax.div(ni * bn, _SCALE_BLOCK), lax.div(ki * bk, _SCALE_BLOCK)]
                        w = w_smem[...].astype(jnp.float16).astype(jnp.float32) * scale
                        dq_smems[j].at[slot][...] = w.astype(jnp.bfloat16)
                    plgpu.commit_smem()
                    for j, acc in enumerate(accs):
                        plgpu.wgmma(acc, x_smem, rhs_view(dq_smems[j].at[slot]))
                    # The wgmma of the previous step read the other dequantised slot: finish it before the
                    # next step overwrites that slot.
                    plgpu.wgmma_wait(n_weights)

                def acc_scope(*accs):
                    in_specs = [plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), delay_release=1)]
                    w_block, w_index = ((bk, bn), lambda kk: (kk, ni)) if rhs_kn else ((bn, bk), lambda kk: (ni, kk))
                    in_specs += [plgpu.BlockSpec(w_block, w_index, delay_release=0 if fp8 else 1)
                                 for _ in range(n_weights)]
                    plgpu.emit_pipeline(
                        lambda idxs, x_smem, *w_smems: mma_step(idxs, x_smem, *w_smems, accs=accs),
                        grid=(k_steps,), in_specs=in_specs,
                        max_concurrent_steps=cfg.max_concurrent_steps,
                    )(x_ref.at[pl.ds(row, bm)], *[w.at[g] for w in w_refs])
                    return tuple(acc[...] for acc in accs)

                accs = pl.run_scoped(acc_scope, *[plgpu.ACC((bm, bn)) for _ in range(n_weights)])

                if swiglu:
                    gate, up = (a.astype(out_dtype).astype(jnp.float32) for a in accs)
                    gate = jnp.minimum(gate, limit)
                    up = jnp.minimum(jnp.maximum(up, -limit), limit)
                    h = gate * jax.nn.sigmoid(gate) * up
                    plgpu.barrier_wait(rw_barrier)
                    h = h * lax.broadcast_in_dim(rw_smem[...], (bm, bn), [0])
                    o_smem[...] = h.astype(out_dtype)
                else:
                    o_smem[...] = accs[0].astype(out_dtype)
                plgpu.commit_smem()
                # Store rows [lo, hi) of the tile: one TMA store per set bit of the row count.
                count = hi - lo
                start = lo
                for rows in row_powers:
                    @pl.when((count & rows) != 0)
                    def _store(start=start, rows=rows):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(start, rows)],
                            out_ref.at[pl.ds(row + start, rows), pl.ds(ni * bn, bn)])
                    start = start + (count & rows)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        scratch = [plgpu.SMEM((bm,), jnp.float32), plgpu.Barrier(num_arrivals=1), plgpu.SMEM((bm, bn), out_dtype)]
        if fp8:
            scratch += [plgpu.SMEM((2, bk, bn) if rhs_kn else (2, bn, bk), jnp.bfloat16) for _ in range(n_weights)]
        pl.run_scoped(scratch_scope, *scratch)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(cfg.num_sms or sm_count(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({} if interpret is None else {"interpret": interpret}),
    )


def _pad_rows(a: jax.Array, rows: int) -> jax.Array:
    return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


def _rhs(w: jax.Array, rhs_kn: bool) -> jax.Array:
    return jnp.swapaxes(w, 1, 2) if rhs_kn else w


def _scales_f32(scale: jax.Array) -> jax.Array:
    return scale.astype(jnp.float32)


def _check(x, w, scale, cfg):
    m, k = x.shape
    _, n, k2 = w.shape
    if k != k2:
        raise ValueError(f"x {x.shape} and weight {w.shape} disagree on K")
    if not supported(m, n, k, cfg):
        raise ValueError(f"unsupported shape m={m} n={n} k={k} for {cfg}")
    if (scale is None) != (w.dtype != jnp.float8_e4m3fn):
        raise ValueError("fp8 weights need a block scale, bf16 weights none")
    if x.dtype != jnp.bfloat16 or (scale is None and w.dtype != x.dtype):
        raise ValueError(f"x must be bf16 and w bf16 or float8_e4m3fn; got {x.dtype}, {w.dtype}")


def grouped_matmul(x, w, group_sizes, w_scale=None, *, cfg: Config | None = None, out_dtype=None,
                   interpret=None, group_offset=0):
    """out[r] = x[r] @ w[group_offset + g(r)]ᵀ for rows sorted by group; x [M, K] bf16, w [G, N, K] (bf16, or e4m3
    with w_scale [G, N/128, K/128]); rows past sum(group_sizes) are left unwritten. Returns [M, N] in out_dtype
    (x.dtype by default). `group_offset` (traced) selects a run of groups of w in place (a scanned layer's experts
    in the stack of its group)."""
    m, k = x.shape
    n = w.shape[1]
    cfg = cfg or default_config(m, n, k, fused=False, fp8=w_scale is not None)
    _check(x, w, w_scale, cfg)
    m_pad = -(-m // cfg.block_m) * cfg.block_m
    sched = tile_schedule(group_sizes, m, cfg.block_m, group_offset)
    rhs_kn = interpret is not None
    call = _kernel(m_pad=m_pad, n=n, k=k, n_weights=1, fp8=w_scale is not None, swiglu=False, limit=0.0,
                   out_dtype=out_dtype or x.dtype, cfg=cfg, interpret=interpret, rhs_kn=rhs_kn)
    args = [sched, _pad_rows(x, m_pad), _rhs(w, rhs_kn)] + ([_scales_f32(w_scale)] if w_scale is not None else [])
    return call(*args)[:m]


def grouped_matmul_swiglu(x, w1, w3, group_sizes, row_weights, limit: float, w1_scale=None, w3_scale=None, *,
                          cfg: Config | None = None, interpret=None, group_offset=0):
    """h[r] = x.dtype( silu(min(p1, limit)) · clip(p3, ±limit) · row_weights[r] ) with p = x.dtype(x[r] @ w[g]ᵀ)
    (the projections are rounded to x.dtype first), for rows sorted by group; x [M, K], w1/w3 [G, N, K],
    row_weights [M] fp32. Returns [M, N] in x.dtype; rows past sum(group_sizes) are left unwritten; `group_offset` as
    in `grouped_matmul`."""
    m, k = x.shape
    n = w1.shape[1]
    fp8 = w1_scale is not None
    cfg = cfg or default_config(m, n, k, fused=True, fp8=fp8)
    _check(x, w1, w1_scale, cfg)
    _check(x, w3, w3_scale, cfg)
    m_pad = -(-m // cfg.block_m) * cfg.block_m
    sched = tile_schedule(group_sizes, m, cfg.block_m, group_offset)
    rhs_kn = interpret is not None
    call = _kernel(m_pad=m_pad, n=n, k=k, n_weights=2, fp8=fp8, swiglu=True, limit=float(limit),
                   out_dtype=x.dtype, cfg=cfg, interpret=interpret, rhs_kn=rhs_kn)
    args = [sched, _pad_rows(x, m_pad), _rhs(w1, rhs_kn), _rhs(w3, rhs_kn)]
    if fp8:
        args += [_scales_f32(w1_scale), _scales_f32(w3_scale)]
    args.append(_pad_rows(row_weights.astype(jnp.float32), m_pad))
    return call(*args)[:m]
