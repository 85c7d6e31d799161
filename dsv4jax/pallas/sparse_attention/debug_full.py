"""GPU debugging of the full kernel: intermediate dumps checked stage by stage, then the plain kernel.

python3 -m dsv4jax.pallas.sparse_attention.debug_full   (LOWER_ONLY=1: lower everything for CUDA on a CPU host)
Exit status 0 only when the default variant matches the reference on every shape.

1. unit: register -> GMEM stores of a WGMMA-layout tile and of its row reduction (the dumps use them);
2. the kernel built with debug=True at d=128 and d=512: each stage (own/other partial scores, mask, m, P, l,
   final acc, output path) is compared with numpy computed from the previous stage's dump, so the first
   wrong stage names the fault;
3. the plain kernel on four shapes. (The layout variants once compared here are gone; NOTES.md has their story.)
"""
import os
import sys
import traceback

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from dsv4jax.pallas.sparse_attention import kernel as KM
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference

LOWER_ONLY = os.environ.get("LOWER_ONLY") == "1"
M, bk = 64, 32
BF = jnp.bfloat16
LOG2E = np.log2(np.e)
table = []

def rel(got, exp):
    got, exp = np.asarray(got, np.float32), np.asarray(exp, np.float32)
    fin = np.isfinite(exp)
    if (np.isfinite(got) != fin).any() or (got[~fin] != exp[~fin]).any():
        return float("inf")  # -inf (masked) positions differ
    return float(np.linalg.norm(got[fin] - exp[fin]) / max(np.linalg.norm(exp[fin]), 1e-30))


def row(name, val, extra=""):
    s = val if isinstance(val, str) else f"{val:.2e}"
    table.append((name, s, extra))
    print(f"{name:44s} {s:>9s}  {extra}", flush=True)


def guarded(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row(name, "EXC", f"{type(e).__name__}: {str(e)[:160]}")


def unit_gmem_store():
    """SMEM (M, bk) f32 -> registers (WGMMA) -> GMEM directly; and its row max (WGMMA row layout) -> GMEM."""
    def body(x_ref, o_ref, v_ref, x_s, bar):
        plgpu.copy_gmem_to_smem(x_ref, x_s, bar)
        plgpu.barrier_wait(bar)
        x = plgpu.load(x_s, (), layout=plgpu.Layout.WGMMA, optimized=False)
        o_ref.at[1, 0][...] = x
        v_ref.at[1][...] = x.max(axis=1)

    k = plgpu.kernel(body, out_type=(jax.ShapeDtypeStruct((2, 2, M, bk), jnp.float32),
                                     jax.ShapeDtypeStruct((2, M), jnp.float32)),
                     scratch_types=[plgpu.SMEM((M, bk), jnp.float32), plgpu.Barrier()])
    x = jax.random.normal(jax.random.key(5), (M, bk), jnp.float32)
    if LOWER_ONLY:
        jax.jit(k).trace(x).lower(lowering_platforms=("cuda",))
        return row("unit regs->GMEM store", "lowered")
    o, v = jax.block_until_ready(k(x))
    xn = np.asarray(x)
    row("unit regs->GMEM store (M,bk) f32", rel(np.asarray(o)[1, 0], xn))
    row("unit regs->GMEM store row max (M,)", rel(np.asarray(v)[1], xn.max(1)))


def unit_qk_chunked(d, dyn):
    """QKᵀ exactly as the kernel's chunked path: Q halves (2, M, d/2) and KV chunks (2, d/64, bk, 64), both
    (8,32)/64B tiled and filled by TMA; one wgmma per 64-column chunk into one accumulator. dyn: the slot and
    half indices come from a grid axis (dynamic), as in the kernel."""
    dh, CW = d // 2, 64
    HCH = dh // CW
    t = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))

    def body(q_ref, x_ref, o_ref, q_s, k_s, bar):
        zero = lax.axis_index("x") if dyn else 0
        slot, outs = zero + 1, []
        for h in (0, 1):
            hh = zero + h
            plgpu.copy_gmem_to_smem(q_ref.at[:, pl.ds(hh * dh, dh)], q_s.at[hh], bar)
        for c in range(d // CW):
            plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(c * CW, CW)], k_s.at[slot, c], bar)
        plgpu.barrier_wait(bar)
        for h in (0, 1):
            hh = zero + h

            def qk(acc_ref):
                for c in range(HCH):
                    plgpu.wgmma(acc_ref, q_s.at[hh, :, pl.ds(c * CW, CW)],
                                plgpu.transpose_ref(k_s.at[slot, hh * HCH + c], (1, 0)))
                return acc_ref[...]

            o_ref.at[h][...] = pl.run_scoped(qk, plgpu.ACC((M, bk), jnp.float32))

    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((2, M, bk), jnp.float32), grid=(1,), grid_names=("x",),
                     scratch_types=[plgpu.SMEM((2, M, dh), BF, transforms=t),
                                    plgpu.SMEM((2, d // CW, bk, CW), BF, transforms=t),
                                    plgpu.Barrier(num_arrivals=2 + d // CW)])
    ks = jax.random.split(jax.random.key(d), 2)
    q = jax.random.normal(ks[0], (M, d), BF)
    x = jax.random.normal(ks[1], (bk, d), BF)
    name = f"unit qk chunked d={d} dyn={dyn}"
    if LOWER_ONLY:
        jax.jit(k).trace(q, x).lower(lowering_platforms=("cuda",))
        return row(name, "lowered")
    o = np.asarray(jax.block_until_ready(k(q, x)))
    qn, xn = np.asarray(q.astype(jnp.float32)), np.asarray(x.astype(jnp.float32))
    for h in (0, 1):
        row(f"{name} h={h}", rel(o[h], qn[:, h * dh:(h + 1) * dh] @ xn[:, h * dh:(h + 1) * dh].T))


def inputs(d, B, S, N, K, seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, S, 64, d), BF)
    kv = jax.random.normal(ks[1], (B, N, d), BF)
    idx = jax.random.randint(ks[2], (B, S, K), -20, N, dtype=jnp.int32)
    sink = jax.random.normal(ks[3], (64,), jnp.float32)
    return q, kv, jnp.maximum(idx, -1), sink


def debug_stages(d):
    B, S, N, K = 1, 2, 300, 96
    q, kv, idx, sink = inputs(d, B, S, N, K, d)
    scale = d ** -0.5
    fn = jax.jit(lambda *a: KM.sparse_attention_kernel(*a, scale=scale, debug=True))
    if LOWER_ONLY:
        fn.trace(q, kv, idx, sink).lower(lowering_platforms=("cuda",))
        return row(f"debug d={d}", "lowered")
    out, ds, dv, dacc, dq, dtile, dstage = (np.asarray(a.astype(jnp.float32))
                                            for a in jax.block_until_ready(fn(q, kv, idx, sink)))
    if os.environ.get("OUT"):
        np.savez_compressed(os.path.join(os.environ["OUT"], f"dumps_d{d}.npz"), out=out, ds=ds, dv=dv, dacc=dacc,
                            dq=dq, dtile=dtile, dstage=dstage, q=np.asarray(q.astype(jnp.float32)),
                            kv=np.asarray(kv.astype(jnp.float32)), idx=np.asarray(idx), sink=np.asarray(sink))
    ref = np.asarray(sparse_attention_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, sink, scale))
    qn, kvn, idn, sn = (np.asarray(a.astype(jnp.float32)) if a.dtype != jnp.int32 else np.asarray(a)
                        for a in (q, kv, idx, sink))
    dh = d // 2
    qs = scale * LOG2E
    worst = {}
    for t in range(B * S):
        b, s_ = divmod(t, S)
        ids = idn[b, s_]
        rows = kvn[b, np.maximum(ids[:bk], 0)]
        qt = qn[b, s_]
        own = [qt[:, h * dh:(h + 1) * dh] @ rows[:, h * dh:(h + 1) * dh].T for h in (0, 1)]
        valid = np.broadcast_to(ids[:bk] >= 0, (M, bk))
        s_all = (qt @ kvn[b, np.maximum(ids, 0)].T) * qs
        s_all = np.where(ids[None] >= 0, s_all, -np.inf)
        m_fin = np.maximum(sn * LOG2E, s_all.max(1))
        l_fin = np.exp2(s_all - m_fin[:, None]).sum(1) + np.exp2(sn * LOG2E - m_fin)
        tile_rows = dtile[t].transpose(1, 0, 2).reshape(bk, d)  # (d/CW, bk, CW) chunks -> (bk, d)
        for k, v in {"staging dump vs gathered rows": rel(dstage[t].reshape(bk, d), rows),
                     "tiled dump vs gathered rows": rel(tile_rows, rows)}.items():
            worst[k] = max(worst.get(k, 0.0), v)
        for h in (0, 1):
            so, sx, sm, vd, p = ds[t, h]
            for k, v in {"Q dump vs q half": rel(dq[t, h], qt[:, h * dh:(h + 1) * dh]),
                         "s_own vs Q dump . tiled dump^T": rel(so, dq[t, h] @ tile_rows[:, h * dh:(h + 1) * dh].T)
                         }.items():
                worst[k] = max(worst.get(k, 0.0), v)
                if v > 1e-2:
                    print(f"  d={d} t={t} h={h} {k}: {v:.2e}", flush=True)
            m0, m1, l1, lf = dv[t, h]
            checks = {
                "s_own vs Q_h K_h^T": rel(so, own[h]),
                "s_other vs other half": rel(sx, own[1 - h]),
                "valid mask": rel(vd, valid.astype(np.float32)),
                "masked s vs (own+other)*scale dumps": rel(sm, np.where(valid, (so + sx) * qs, -np.inf)),
                "m0 vs sink*log2e": rel(m0, sn * LOG2E),
                "m after blk0 vs dumps": rel(m1, np.maximum(m0, sm.max(1))),
                "P vs exp2(s - m) dumps": rel(p, np.exp2(sm - m1[:, None])),
                "l after blk0 vs dumps": rel(l1, np.exp2(m0 - m1) + np.exp2(sm - m1[:, None]).sum(1)),
                "final l vs numpy": rel(lf, l_fin),
                "acc/l vs reference": rel(dacc[t, h] / lf[:, None], ref[b, s_, :, h * dh:(h + 1) * dh]),
                "output vs acc/l dumps (out path)": rel(out[b, s_, :, h * dh:(h + 1) * dh], dacc[t, h] / lf[:, None]),
            }
            for k, v in checks.items():
                worst[k] = max(worst.get(k, 0.0), v)
                if v > 1e-2:
                    print(f"  d={d} t={t} h={h} {k}: {v:.2e}", flush=True)
    for k, v in worst.items():
        row(f"debug d={d} {k}", v)
    row(f"debug d={d} output vs reference", rel(out, ref))


def full():
    ok = True
    for d, B, S, N, K in ((128, 1, 1, 300, 96), (128, 1, 4, 300, 96), (512, 1, 4, 300, 96), (512, 2, 1, 700, 640)):
        name = f"full d={d} B={B} S={S} K={K}"
        try:
            q, kv, idx, sink = inputs(d, B, S, N, K, d + K)
            fn = jax.jit(lambda *a: KM.sparse_attention_kernel(*a, scale=d ** -0.5))
            if LOWER_ONLY:
                fn.trace(q, kv, idx, sink).lower(lowering_platforms=("cuda",))
                row(name, "lowered")
                continue
            out = jax.block_until_ready(fn(q, kv, idx, sink))
            ref = sparse_attention_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, sink, d ** -0.5)
            err = rel(out.astype(jnp.float32), ref)
            ok &= err < 2e-2
            row(name, err)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row(name, "EXC", f"{type(e).__name__}: {str(e)[:160]}")
            ok = False
    return ok


def main():
    print(jax.__version__, jax.devices(), flush=True)
    if os.environ.get("SKIP_DEBUG") != "1":
        guarded("unit regs->GMEM store", unit_gmem_store)
        for d in (128, 512):
            for dyn in (False, True):
                guarded(f"unit qk chunked d={d} dyn={dyn}", lambda d=d, dyn=dyn: unit_qk_chunked(d, dyn))
        for d in (128, 512):
            guarded(f"debug d={d}", lambda d=d: debug_stages(d))
    ok = full()
    print("\n==== table ====")
    for r in table:
        print(f"{r[0]:44s} {r[1]:>9s}  {r[2]}")
    sys.exit(0 if LOWER_ONLY or ok else 1)


if __name__ == "__main__":
    main()
