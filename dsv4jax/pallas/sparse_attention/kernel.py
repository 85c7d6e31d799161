"""Mosaic GPU (Hopper) kernel for the V4 sparse attention core (ARCHITECTURE §7).

One CTA per (query token, group of 64 heads); three warpgroups:

* WG0 and WG1 (compute) each own one half of d (``dh = d/2``).  For every block of ``bk`` gathered KV rows:
  ``S_h = Q[:, half h] · K[:, half h]ᵀ`` by wgmma (M = 64 heads, N = bk, K = dh), the two fp32 partial score
  tiles are exchanged through shared memory and summed (identically in both warpgroups), then the online
  softmax (the sink is the initial running max, so masked / empty blocks never give NaN), and
  ``acc_h += P(bf16) · V[:, half h]`` by wgmma with P from registers.
* WG2 (memory) gathers the rows: Hopper TMA has no gather, so each row is d/256 one-row TMAs (one per 256-column
  chunk) into a chunk-major staging buffer, issued by its four warps in parallel; the warpgroup then copies each
  staged chunk into its own (8, 32)-tiled, 64B-swizzled buffer that wgmma reads, and signals the compute
  warpgroups.  Staging and tiled
  buffers are double-buffered, so the row gathers of block j+2 fly while block j is converted and blocks j/j-1
  are multiplied.  The indices stream through a small ring, so shared memory does not grow with K.

Invalid slots (index -1) load row 0 and are masked to -inf before the softmax.  The indices are padded to a
multiple of ``bk`` (times the splits over K) with -1 by the wrapper; heads are padded to a multiple of 64.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from dsv4jax.pallas import sm_count

LOG2E = math.log2(math.e)
# Matches the reference on the H100 (jax 0.11.2; bench/kernels_sparse_attention.py checks it first); "auto"
# dispatch uses the kernel on GPUs. See NOTES.md.
VERIFIED_ON_GPU = True
HEADS_PER_CTA = 64  # wgmma M of one warpgroup
EXCHANGE_PAD = 8  # fp32 columns padding each row of the partial-score exchange (no bank conflicts)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The kernel's tuning switches (for comparing variants on a GPU); the defaults are the verified kernel.

    chunk_columns: column chunk width of the staging and tiled KV buffers: every row is staged chunk-major,
      d/chunk_columns one-row TMAs, and converted chunk by chunk. (On the H100 a register copy from a column slice
      of a row-major staging buffer lands 16-byte units XOR-permuted by the chunk index; whole chunk refs do not.
      NOTES.md.) 256 (a TMA box's widest): two TMAs per row at d=512 instead of four (H100, prefill 16k: 7.09 vs
      8.62 ms alone, 5.18 vs 6.01 ms with warp_issue; kernels-sparse_attention-h100-80gb-hbm3-{cw256,warp,
      warp-cw256}.json).
    row_unroll: row gathers unrolled per loop iteration when one thread issues them all (warp_issue off; lowering
      time grows with it on jax 0.11, NOTES.md).
    split_k: split over K (decode): a few query tokens leave most SMs idle, so each CTA takes 1/splits of the blocks
      and writes a partial output with its log-sum-exp, combined outside the kernel. Verified on the H100 (jax
      0.11.2, kernels-sparse_attention-h100-80gb-hbm3-splitk.json: edge cases and decode B=1..128, rel-L2 ≤ 3.0e-3).
    no_auto_barriers, warp_issue: row-gather issue cost. A Pallas TMA issued by a warpgroup makes all 128 threads
      arrive on the barrier and, with automatic barriers, first syncs the warpgroup. no_auto_barriers drops Pallas's
      automatic warpgroup syncs (the kernel orders its SMEM accesses itself: every staging read precedes a
      commit_smem, whose warpgroup barrier precedes the TMA that overwrites it): prefill 16k 15.19 -> 8.62 ms on the
      H100 (-issue-{base,noauto}.json). warp_issue spreads a block's rows over the memory warpgroup's 4 warps, each
      issuing its own TMAs (the row indices are read before: warp-level code may not load from memory on jax 0.11):
      8.62 -> 6.01 ms (-warp.json).
    """

    chunk_columns: int = 256
    row_unroll: int = 4
    split_k: bool = True
    warp_issue: bool = True
    no_auto_barriers: bool = True


DEFAULT_TUNING = Tuning()


def unsupported_reason(q, kv, indices, sink) -> str | None:
    """None when the kernel handles these shapes/dtypes, else why not."""
    if q.ndim != 4 or kv.ndim != 3 or indices.ndim != 3:
        return "rank"
    B, S, H, d = q.shape
    if kv.shape[0] not in (1, B) or kv.shape[2] != d or indices.shape[:2] != (B, S):
        return "shapes"
    if q.dtype != kv.dtype or q.dtype not in (jnp.bfloat16, jnp.float16):
        return "dtype (bf16/f16 q and kv of one dtype)"
    if H % 16:
        return "H must be a multiple of 16"
    if d not in (128, 256, 512):
        return "d must be 128, 256 or 512"
    if kv.shape[1] < 1 or indices.shape[2] < 1:
        return "empty"
    return None


def default_splits(tokens: int, heads: int, k: int, bk: int = 32, *, split_k: bool = DEFAULT_TUNING.split_k,
                   num_sms: int | None = None) -> int:
    """Splits over K for `tokens` query tokens of `heads` heads over `k` rows: as many CTAs as fit in one wave
    (one CTA fits per SM, ~220 KB of shared memory), ≥ 2 blocks each (each CTA double-buffers its blocks). A second
    wave gains nothing: at B=128 (128 CTAs) two splits ran 52.7 against 46.7 µs of kernel time on the H100
    (kernel-limits-h100-80gb-hbm3.json). num_sms: the GPU's SMs (None: the default device's, see `sm_count`)."""
    ctas, blocks = tokens * -(-heads // HEADS_PER_CTA), -(-k // bk)
    sms = num_sms or sm_count()
    if not split_k or ctas >= sms:
        return 1
    return max(1, min(blocks // 2, sms // ctas))


def _build(T, S, Hp, d, N, Bk, Kp, dtype, scale, bk, interpret, splits=1, tuning: Tuning = DEFAULT_TUNING):
    """splits > 1: CTA (token, group, split) runs blocks [split·nblk, (split+1)·nblk) and returns its normalised
    partial output [splits, T, Hp, d] and base-2 log-sum-exp [splits, T, Hp] (the sink counted in split 0 only)."""
    G = Hp // HEADS_PER_CTA
    dh = d // 2
    nblk = Kp // bk // splits  # blocks per CTA
    NS = 2  # staging buffers (row gathers in flight)
    NT = 2  # tiled buffers (wgmma operands)
    CW = min(tuning.chunk_columns, d // 2)  # chunk width (columns; a TMA box has at most 256 per dimension)
    M = HEADS_PER_CTA
    TL = T if T <= 32768 else 1024  # CUDA grid y/z dimensions stop at 65535: tokens as (T/TL, TL)
    assert T % TL == 0
    NCH = d // CW  # column chunks of a row
    HCH = NCH // 2  # chunks per half
    # Indices live in a ring of NI blocks, not all Kp in SMEM (HCA's K grows with the context: at 512k tokens
    # K = 4224 did not fit). Block j's slot is refilled with block j+NI once both compute WGs are done with j
    # (free_bar of block j, seen at convert(j+NT)), which leaves NI-NT-NS blocks of slack before gather(j+NI).
    NI = NT + NS + 2
    qk_scale = scale * LOG2E
    itemsize = jnp.dtype(dtype).itemsize
    # P·V contracts over the bk rows: with the rows as the MN-major K dimension, wgmma needs K to be a multiple
    # of the swizzle width, so the KV tiles use a 64B swizzle for bk = 32 (128B for bk = 64).
    swz = min(128, bk * itemsize)
    tiled_t = (plgpu.TilingTransform((8, swz // itemsize)), plgpu.SwizzleTransform(swz))
    convert_rows = bk  # rows per register copy: ≤ 32 values per thread (the memory WG has 40 registers), whole tiles
    while convert_rows > 8 and convert_rows * CW > 4096:
        convert_rows //= 2
    assert bk % convert_rows == 0 and bk % 4 == 0, bk
    copy_layout = plgpu.Layout.SMEM_GMEM_COPY((convert_rows, CW), jnp.dtype(dtype), swz)

    def load(ref, layout, **kw):
        if interpret is not None:  # the Mosaic GPU interpreter has no rule for plgpu.load on SMEM
            return ref[...]
        return plgpu.load(ref, (), layout=layout, **kw)

    def cast(x, layout):
        return x if interpret is not None else plgpu.layout_cast(x, layout)

    def body(q_ref, kv_ref, idx_ref, sink_ref, out_ref, *rest):
        lse_ref = None
        if splits > 1:
            lse_ref, rest = rest[0], rest[1:]
        (q_smem, stage, tiled, exch, idx_ring, sink_smem,
         q_bar, idx_bar, stage_bar, ready_bar, free_bar, x_bar, xfree_bar) = rest
        tok = lax.axis_index("th") * TL + lax.axis_index("tl")
        grp = lax.axis_index("hg")
        split = 0
        if splits > 1:  # the grid's third axis is (head group, split)
            grp, split = lax.div(grp, jnp.int32(splits)), lax.rem(grp, jnp.int32(splits))
        first_block = split * nblk
        wg = lax.axis_index("wg")
        kv_b = 0 if Bk == 1 else jnp.minimum(lax.div(tok, jnp.int32(S)), Bk - 1)

        def compute(h):  # h: this warpgroup's half of d (traced)
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(q_ref.at[tok, pl.ds(grp * M, M), pl.ds(h * dh, dh)], q_smem.at[h], q_bar.at[h])
            plgpu.copy_gmem_to_smem(sink_ref.at[grp], sink_smem.at[h], q_bar.at[h])
            plgpu.barrier_wait(q_bar.at[h])
            m0 = load(sink_smem.at[h], plgpu.Layout.WGMMA.reduce(1))  # sink·log2e
            # the sink's exp2(sink - m) term: l starts at 1 (once over the splits: in split 0)
            l_start = 1.0 if splits == 1 else (1 - jnp.minimum(split, 1)).astype(jnp.float32)
            l0 = cast(jnp.full((M,), 1.0, jnp.float32) * l_start, plgpu.Layout.WGMMA.reduce(1))
            acc0 = cast(jnp.zeros((M, dh), jnp.float32), plgpu.Layout.WGMMA)

            def step(j, slot, carry):
                acc, m_i, l_i = carry
                plgpu.barrier_wait(ready_bar.at[slot])
                if interpret is not None:  # both products become plain dots over this half's rows, as (bk, dh)
                    kv_half = tiled.at[slot, pl.ds(h * HCH, HCH)][...].transpose(1, 0, 2).reshape(bk, dh)

                def qk(acc_ref):  # one wgmma per column chunk of this WG's half
                    for c in range(HCH):
                        plgpu.wgmma(acc_ref, q_smem.at[h, :, pl.ds(c * CW, CW)],
                                    plgpu.transpose_ref(tiled.at[slot, h * HCH + c], (1, 0)))
                    return acc_ref[...]

                if interpret is None:
                    s_own = pl.run_scoped(qk, plgpu.ACC((M, bk), jnp.float32))
                else:  # the interpreter's wgmma ignores transposed operands: same product as a plain dot
                    s_own = lax.dot_general(q_smem.at[h][...], kv_half, (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)

                @pl.when(j > 0)
                def _():
                    plgpu.barrier_wait(xfree_bar)  # the other WG has read the previous exchange

                exch.at[h, :, pl.ds(0, bk)][...] = s_own
                plgpu.barrier_arrive(x_bar)
                plgpu.barrier_wait(x_bar)
                s_other = load(exch.at[1 - h, :, pl.ds(0, bk)], plgpu.Layout.WGMMA, optimized=True)
                plgpu.barrier_arrive(xfree_bar)
                s = (s_own + s_other) * qk_scale  # fp32 + is commutative: both WGs get identical scores
                plgpu.barrier_wait(idx_bar.at[lax.rem(j, NI)])
                ids = load(idx_ring.at[lax.rem(j, NI)], plgpu.Layout.WGMMA.reduce(0))
                valid = lax.broadcast_in_dim(ids >= 0, (M, bk), [1])
                s = jnp.where(valid, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (M, bk), [0]))
                l_new = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, (M, dh), [0])
                p16 = p.astype(dtype)

                if interpret is None:
                    def pv(acc_ref):  # each column chunk of V into its slice of the accumulator
                        for c in range(HCH):
                            plgpu.wgmma(acc_ref.at[:, pl.ds(c * CW, CW)], p16, tiled.at[slot, h * HCH + c])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:  # the interpreter has no run_state and no wgmma with A in registers: a plain dot
                    acc = acc + jnp.dot(p16, kv_half, preferred_element_type=jnp.float32)
                plgpu.barrier_arrive(free_bar.at[slot])
                return acc, m_new, l_new

            acc, m_i, l_i = lax.fori_loop(0, nblk, lambda j, c: step(j, lax.rem(j, NT), c), (acc0, m0, l0))
            plgpu.barrier_wait(xfree_bar)  # observe the last exchange phase (barriers end fully observed)
            if splits > 1:  # a split with no valid row and no sink has l = 0: weight 0 in the combination
                seen = l_i > 0.0
                l_i = jnp.where(seen, l_i, 1.0)

                def store_lse():  # from one WG: both hold the same m and l
                    lse_ref.at[split, tok, pl.ds(grp * M, M)][...] = jnp.where(
                        seen, m_i + jnp.log(l_i) * LOG2E, -jnp.inf)

                pl.when(h == 0)(store_lse)
            acc = acc / lax.broadcast_in_dim(l_i, (M, dh), [0])
            out_dst = (out_ref.at[tok, pl.ds(grp * M, M), pl.ds(h * dh, dh)] if splits == 1
                       else out_ref.at[split, tok, pl.ds(grp * M, M), pl.ds(h * dh, dh)])
            q_smem.at[h][...] = acc.astype(dtype)  # this WG's Q half is no longer needed: the output goes via it
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[h], out_dst)
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg < 2)(lambda: compute(wg))

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            def load_indices(j):  # block j's indices into its ring slot
                plgpu.copy_gmem_to_smem(idx_ref.at[tok, pl.ds((first_block + j) * bk, bk)],
                                        idx_ring.at[lax.rem(j, NI)], idx_bar.at[lax.rem(j, NI)])

            for i in range(min(NI, nblk)):
                load_indices(i)

            def gather(j, slot):
                plgpu.barrier_wait(idx_bar.at[lax.rem(j, NI)])

                def row_id(r):  # invalid slots (-1) load row 0, masked later
                    return jnp.maximum(idx_ring[lax.rem(j, NI), r], 0)

                def copy_row(row, r):  # kv row `row` into staging row r: d/CW one-row TMAs, chunk-major
                    for k in range(NCH):
                        plgpu.copy_gmem_to_smem(kv_ref.at[kv_b, pl.ds(row, 1), k], stage.at[slot, k, pl.ds(r, 1)],
                                                stage_bar.at[slot])

                # jax 0.11's Mosaic GPU layout inference grows faster than linearly with the kernel's op count
                # (bk unrolled single-issuer copies: ~15 s to lower one attention shape; NOTES.md). The per-warp
                # issue unrolls bk/4 rows per warp and lowers in 1.6-2.1 s; the single issuer keeps a loop.
                if tuning.warp_issue and interpret is None:
                    rows = [row_id(r) for r in range(bk)]

                    def warp_rows(warp):  # rows warp, warp + 4, ...: four TMA issuers instead of one
                        for i in range(bk // 4):
                            row = rows[4 * i + 3]
                            for w in range(3):
                                row = jnp.where(warp == w, rows[4 * i + w], row)
                            copy_row(row, 4 * i + warp)

                    plgpu.warp_map(warp_rows)
                else:
                    lax.fori_loop(0, bk, lambda r, c: copy_row(row_id(r), r), None, unroll=min(tuning.row_unroll, bk))

            for i in range(min(NS, nblk)):
                gather(i, i)

            def convert(j, s_slot, t_slot):
                plgpu.barrier_wait(stage_bar.at[s_slot])

                @pl.when(j >= NT)
                def _():
                    plgpu.barrier_wait(free_bar.at[t_slot])  # both compute WGs are done with block j - NT

                    @pl.when(j - NT + NI < nblk)
                    def _():
                        load_indices(j - NT + NI)

                for c in range(NCH):
                    for r0 in range(0, bk, convert_rows):
                        dst, src = tiled.at[t_slot, c], stage.at[s_slot, c]
                        if convert_rows < bk:
                            dst, src = dst.at[pl.ds(r0, convert_rows)], src.at[pl.ds(r0, convert_rows)]
                        dst[...] = load(src, copy_layout, optimized=False)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready_bar.at[t_slot])

                @pl.when(j + NS < nblk)
                def _():
                    gather(j + NS, s_slot)

            assert NS == NT

            @pl.loop(0, nblk)
            def _(j):
                convert(j, lax.rem(j, NS), lax.rem(j, NT))

            for j in range(max(nblk - NT, 0), nblk):  # observe the last blocks' releases
                plgpu.barrier_wait(free_bar.at[j % NT])

    scratch = [
        plgpu.SMEM((2, M, dh), dtype, transforms=tiled_t),  # Q halves, then the output
        plgpu.SMEM((NS, NCH, bk, CW), dtype),  # staging (row gathers), chunk-major
        plgpu.SMEM((NT, NCH, bk, CW), dtype, transforms=tiled_t),  # wgmma operand, one tiled ref per chunk
        plgpu.SMEM((2, M, bk + EXCHANGE_PAD), jnp.float32),  # partial-score exchange
        plgpu.SMEM((NI, bk), jnp.int32),  # index ring
        plgpu.SMEM((2, M), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=2),  # q_bar: Q + sink
        plgpu.Barrier(num_barriers=NI),  # idx_bar: one per ring slot
        plgpu.Barrier(num_arrivals=bk * NCH, num_barriers=NS),  # stage_bar: row copies
        plgpu.Barrier(num_barriers=NT),  # ready_bar
        plgpu.Barrier(num_arrivals=2, num_barriers=NT),  # free_bar
        plgpu.Barrier(num_arrivals=2),  # x_bar
        plgpu.Barrier(num_arrivals=2),  # xfree_bar
    ]
    kwargs = {}
    if interpret is not None:
        kwargs["interpret"] = interpret
    out_type = jax.ShapeDtypeStruct((T, Hp, d), dtype)
    if splits > 1:
        out_type = (jax.ShapeDtypeStruct((splits, T, Hp, d), dtype), jax.ShapeDtypeStruct((splits, T, Hp), jnp.float32))
    call = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(T // TL, TL, G * splits),
        grid_names=("th", "tl", "hg"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=tuning.no_auto_barriers),
        **kwargs,
    )
    return call


@functools.partial(jax.jit, static_argnames=("scale", "bk", "interpret", "splits", "tuning", "num_sms"))
def sparse_attention_kernel(q, kv, indices, sink, scale: float, bk: int = 32, interpret=None,
                            splits: int | None = None, *, tuning: Tuning = DEFAULT_TUNING, num_sms: int | None = None):
    """Same contract as `sparse_attention_reference`; kv may have batch 1 (shared over B).
    splits: CTAs per (token, head group) over K (None: `default_splits`, from num_sms SMs: None = the default
    device's, `sm_count`). tuning: the kernel's switches (`Tuning`; the defaults are the verified kernel)."""
    reason = unsupported_reason(q, kv, indices, sink)
    if reason:
        raise ValueError(f"sparse_attention kernel: {reason}")
    B, S, H, d = q.shape
    Bk, N, _ = kv.shape
    K = indices.shape[2]
    Hp = -(-H // HEADS_PER_CTA) * HEADS_PER_CTA
    T = B * S
    if splits is None:
        splits = default_splits(T, H, K, bk, split_k=tuning.split_k, num_sms=num_sms)
    splits = max(1, min(splits, -(-K // bk)))
    Kp = -(-K // (bk * splits)) * bk * splits
    qf = q.reshape(T, H, d)
    sinkf = sink.astype(jnp.float32) * LOG2E
    if Hp != H:
        qf = jnp.pad(qf, ((0, 0), (0, Hp - H), (0, 0)))
        sinkf = jnp.pad(sinkf, (0, Hp - H))
    idx = indices.reshape(T, K).astype(jnp.int32)
    idx = jnp.minimum(idx, N - 1)  # the reference's gather clamps out-of-range rows too
    if Kp != K:
        idx = jnp.pad(idx, ((0, 0), (0, Kp - K)), constant_values=-1)
    Tp = T if T <= 32768 else -(-T // 1024) * 1024
    if Tp != T:  # pad the token axis for the grid; the padded queries read row 0 and are dropped
        qf = jnp.pad(qf, ((0, Tp - T), (0, 0), (0, 0)))
        idx = jnp.pad(idx, ((0, Tp - T), (0, 0)), constant_values=-1)
    call = _build(Tp, S, Hp, d, N, Bk, Kp, q.dtype, float(scale), bk, interpret, splits=splits, tuning=tuning)
    chunk = min(tuning.chunk_columns, d // 2)
    kvr = kv.reshape(Bk, N, d // chunk, chunk)  # rows as column chunks: one TMA per chunk
    out = call(qf, kvr, idx, sinkf.reshape(Hp // HEADS_PER_CTA, HEADS_PER_CTA))
    if splits > 1:  # softmax-weighted sum of the splits' normalised outputs
        parts, lse = out
        weights = jnp.exp2(lse - lse.max(axis=0, keepdims=True))
        weights = weights / weights.sum(axis=0, keepdims=True)
        out = jnp.einsum("sth,sthd->thd", weights, parts.astype(jnp.float32)).astype(q.dtype)
    return out[:T, :H].reshape(B, S, H, d)
