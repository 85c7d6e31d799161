"""Mosaic GPU (Hopper) kernel for the lightning indexer's scores (ARCHITECTURE §8.4).

score(t, j) = Σ_h w_{t,h}·ReLU(⟨q_{t,h}, key_j⟩) in fp32, −inf for rows j ≥ visible_rows[t].

Layout of the work. One CTA takes T tokens (T ≤ 4 with H = 64) of one sequence and a range of key steps of
128 rows each. Three warpgroups: warpgroup 2 streams key steps through a ring of shared-memory slots with TMA;
warpgroups 0 and 1 each take one 64-row half of every step and run

    acc[64 keys, T·H] = keys[64, d] · qᵀ[d, T·H]             (one wgmma, M = 64, N = T·H ≤ 256, K = d)

so that the heads of a token lie along the accumulator's N axis, which the WGMMA register layout keeps mostly inside
each thread: ReLU, the multiply by w_{t,h} and the sum over heads are register arithmetic plus two lane shuffles,
with no shared-memory reduction. The [T, 64] fp32 result goes to shared memory and out with a TMA store. Key steps
that no token of the tile can see (causal prefill: j ≥ ⌊(t+1)/4⌋) are not loaded or multiplied; their output is
written as −inf from a constant tile. Decode (few tokens, long key range) splits the key steps of one token tile
over several CTAs so that the grid fills the GPU.
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

BLOCK_KEYS = 128          # key rows per pipeline step (64 per compute warpgroup)
HALF = BLOCK_KEYS // 2
MAX_N = 256               # wgmma N limit: T·H ≤ 256
CTA_WAVES = 2             # the decode key split aims at about two waves of CTAs over the GPU's SMs


@dataclasses.dataclass(frozen=True)
class Plan:
    batch: int
    tokens: int           # S
    heads: int            # H
    dim: int              # d
    rows: int             # N
    tile_tokens: int      # T
    tokens_padded: int    # S rounded up to T
    rows_padded: int      # N rounded up to BLOCK_KEYS
    splits: int           # CTAs sharing one token tile's key range
    steps_per_split: int
    stages: int

    @property
    def token_tiles(self) -> int:
        return self.tokens_padded // self.tile_tokens

    @property
    def total_steps(self) -> int:
        return self.rows_padded // BLOCK_KEYS


def unsupported_reason(q_shape, keys_shape, dtype) -> str | None:
    """None when the kernel takes these shapes and dtype, else why not."""
    if len(q_shape) != 4 or len(keys_shape) != 3:
        return "rank (q [B,S,H,d], keys [B,N,d])"
    b, s, h, d = q_shape
    if keys_shape[0] != b or keys_shape[2] != d:
        return "shapes"
    if keys_shape[1] < 1 or s < 1:
        return "empty"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "dtype (bf16/f16 q)"
    if h % 8 or not 8 <= h <= MAX_N:
        return f"H must be a multiple of 8 from 8 to {MAX_N}"
    if d not in (64, 128):   # d=256 would not fit q + 2 key stages in SMEM
        return "d must be 64 or 128"
    return None


def supported(q_shape, keys_shape, dtype) -> bool:
    """Shapes and dtypes the kernel takes; everything else goes to the reference."""
    return unsupported_reason(q_shape, keys_shape, dtype) is None


def make_plan(b: int, s: int, h: int, d: int, n: int, *, tile_tokens: int | None = None,
              stages: int | None = None, splits: int | None = None, num_sms: int | None = None) -> Plan:
    """num_sms: the GPU's SMs, for the decode key split (None: the default device's, `sm_count`)."""
    max_t = max(1, min(4, MAX_N // h))
    t = tile_tokens or min(s, max_t)
    s_pad = -(-s // t) * t
    n_pad = -(-n // BLOCK_KEYS) * BLOCK_KEYS
    total = n_pad // BLOCK_KEYS
    tiles = b * (s_pad // t)
    if splits is None:
        target = CTA_WAVES * (num_sms or sm_count())
        splits = min(total, max(1, -(-target // tiles))) if tiles < target else 1
    sps = -(-total // splits)
    splits = -(-total // sps)
    if stages is None:
        # q tile (T·H·d bf16) + stages × 128 keys × d bf16 within ~200 KiB of shared memory.
        q_bytes = t * h * d * 2
        step_bytes = BLOCK_KEYS * d * 2
        stages = max(2, min(4, (200 * 1024 - q_bytes) // step_bytes))
    return Plan(b, s, h, d, n, t, s_pad, n_pad, splits, sps, stages)


def _kernel(q_ref, w_ref, vis_ref, k_ref, out_ref, *, plan: Plan, interpreted: bool):
    # Register-layout hints mean nothing to the CPU interpreter (it has no rule for them): drop them there.
    cast = (lambda x, layout: x) if interpreted else plgpu.layout_cast
    T, H, d, stages = plan.tile_tokens, plan.heads, plan.dim, plan.stages
    NT = T * H
    swizzle = plgpu.find_swizzle(d * 16)      # bytes of one d-row of bf16 keys/queries, capped at 128
    transforms = (plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle))

    def scoped(q_smem, w_smem, k_smem, o_smem, ninf_smem, in_bars, k_bars, k_free):
        b = lax.axis_index("b")
        tt = plan.token_tiles - 1 - lax.axis_index("tt")    # heavy (late) causal tiles launch first
        ks = lax.axis_index("ks")
        wg = lax.axis_index("wg")
        t0 = tt * T
        vis = [jnp.minimum(vis_ref[b, t0 + i], plan.rows) for i in range(T)]
        kv_end = functools.reduce(jnp.maximum, vis)
        step_lo = ks * plan.steps_per_split
        step_hi = jnp.minimum(step_lo + plan.steps_per_split, plan.total_steps)
        vis_steps = lax.div(kv_end + (BLOCK_KEYS - 1), jnp.int32(BLOCK_KEYS))
        comp_hi = jnp.clip(vis_steps, step_lo, step_hi)
        n_comp = comp_hi - step_lo

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            q_src = q_ref.at[b, tt] if interpreted else q_ref.at[b, pl.ds(t0 * H, NT)]
            plgpu.copy_gmem_to_smem(q_src, q_smem, in_bars.at[0])
            plgpu.copy_gmem_to_smem(w_ref.at[b, pl.ds(t0 * H, NT)], w_smem, in_bars.at[1])

            @pl.loop(0, n_comp)
            def _load(i):
                slot = lax.rem(i, jnp.int32(stages))

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                halves = b * (plan.rows_padded // HALF) + (step_lo + i) * 2
                plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(halves, 2)], k_smem.at[slot], k_bars.at[slot])

            # Observe the last releases too (the interpreter checks that a waiter sees every phase; free on HW).
            @pl.loop(jnp.maximum(n_comp - stages, 0), n_comp)
            def _drain(i):
                plgpu.barrier_wait(k_free.at[lax.rem(i, jnp.int32(stages))])

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            out_rows = out_ref.at[b, pl.ds(t0, T)]
            plgpu.barrier_wait(in_bars.at[0])
            plgpu.barrier_wait(in_bars.at[1])
            w = cast(w_smem[...], plgpu.Layout.WGMMA.reduce(0))
            w_b = lax.broadcast_in_dim(w, (HALF, NT), (1,))
            # B operand [d, T·H]: the K-major view of the [T·H, d] query tile. The CPU interpreter's wgmma takes no
            # transposed views, so there the wrapper hands the tile over already transposed.
            q_b = q_smem if interpreted else plgpu.transpose_ref(q_smem, (1, 0))
            row_ids = cast(lax.broadcasted_iota(jnp.int32, (HALF,), 0), plgpu.Layout.WGMMA.reduce(1))

            @pl.loop(0, n_comp)
            def _compute(i):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_bars.at[slot])

                def mma(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem.at[slot, wg], q_b)
                    return acc_ref[...]

                acc = pl.run_scoped(mma, plgpu.ACC((HALF, NT), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                p = jnp.maximum(acc, 0.0) * w_b
                key0 = (step_lo + i) * BLOCK_KEYS + wg * HALF
                ids = row_ids + key0
                oslot = lax.rem(i, jnp.int32(2))
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                for j in range(T):
                    s = jnp.sum(p[:, j * H:(j + 1) * H], axis=1)
                    o_smem[wg, oslot, j] = jnp.where(ids < vis[j], s, -jnp.inf)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg, oslot], out_rows.at[:, pl.ds(key0, HALF)])

            # Key steps of this CTA's range that no token of the tile sees: −inf, no loads, no matmul.
            ninf_row = jnp.where(row_ids < 0, 0.0, -jnp.inf)      # in the same register layout as the scores
            for j in range(T):
                ninf_smem[wg, j] = ninf_row
            plgpu.commit_smem()

            @pl.loop(comp_hi, step_hi)
            def _invisible(step):
                plgpu.copy_smem_to_gmem(ninf_smem.at[wg], out_rows.at[:, pl.ds(step * BLOCK_KEYS + wg * HALF, HALF)])

            plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        plgpu.SMEM((d, NT), q_ref.dtype) if interpreted else plgpu.SMEM((NT, d), q_ref.dtype, transforms=transforms),
        plgpu.SMEM((NT,), jnp.float32),
        plgpu.SMEM((stages, 2, HALF, d), k_ref.dtype, transforms=transforms),
        plgpu.SMEM((2, 2, T, HALF), jnp.float32),
        plgpu.SMEM((2, T, HALF), jnp.float32),
        plgpu.Barrier(num_barriers=2),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        collective_axes="wg",
    )


def indexer_scores_kernel(q, weights, keys, visible_rows=None, *, interpret=None, plan: Plan | None = None,
                          num_sms: int | None = None):
    """Kernel scores [B,S,N] fp32, −inf where j ≥ visible_rows[b,t] (all rows visible when visible_rows is None).
    plan: the work layout (None: `make_plan` for num_sms SMs; None = the default device's)."""
    reason = unsupported_reason(q.shape, keys.shape, q.dtype)
    if reason:
        raise ValueError(f"indexer kernel does not support q {q.shape} {q.dtype}, keys {keys.shape}: {reason}")
    b, s, h, d = q.shape
    n = keys.shape[1]
    plan = plan or make_plan(b, s, h, d, n, num_sms=num_sms)
    keys = keys.astype(q.dtype)
    if visible_rows is None:
        visible_rows = jnp.full((b, s), n, jnp.int32)
    vis = jnp.clip(visible_rows.astype(jnp.int32), 0, n)
    w = weights.astype(jnp.float32)
    if plan.tokens_padded != s:
        pad = plan.tokens_padded - s
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        w = jnp.pad(w, ((0, 0), (0, pad), (0, 0)))
        vis = jnp.pad(vis, ((0, 0), (0, pad)))
    if plan.rows_padded != n:
        keys = jnp.pad(keys, ((0, 0), (0, plan.rows_padded - n), (0, 0)))
    if interpret in (None, False):
        q2 = q.reshape(b, plan.tokens_padded * h, d)
    else:   # the interpreter's wgmma needs B as a plain [d, T·H] buffer (see _kernel)
        q2 = q.reshape(b, plan.token_tiles, plan.tile_tokens * h, d).transpose(0, 1, 3, 2)
    w2 = w.reshape(b, plan.tokens_padded * h)
    # Batch folded into the row axis: the TMA descriptor then has no batch dimension (at most 5 strided dims).
    k3 = keys.reshape(b * plan.rows_padded // HALF, HALF, d)

    call = plgpu.kernel(
        functools.partial(_kernel, plan=plan, interpreted=interpret not in (None, False)),
        out_type=jax.ShapeDtypeStruct((b, plan.tokens_padded, plan.rows_padded), jnp.float32),
        grid=(plan.splits, plan.token_tiles, b),
        grid_names=("ks", "tt", "b"),
        num_threads=3,
        thread_name="wg",
        interpret=interpret or None,
    )
    out = call(q2, w2, vis, k3)
    if plan.tokens_padded != s or plan.rows_padded != n:
        out = out[:, :s, :n]
    return out
