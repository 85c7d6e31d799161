"""GPU unit checks of the kernel's pieces (one warpgroup each), plus the full kernel. Prints a table.

python3 bench/debug/sparse_attention_units.py   (LOWER_ONLY=1: lower for CUDA on a CPU host)
A debugging aid kept outside the package (NOTES.md of dsv4jax/pallas/sparse_attention); not run by the tests.
"""
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LOWER_ONLY = os.environ.get("LOWER_ONLY") == "1"
bk, M = 32, 64
BF = jnp.bfloat16
rows_out = []


def swz_t(swz=64):
    return (plgpu.TilingTransform((8, swz // 2)), plgpu.SwizzleTransform(swz))


def run(name, fn, args, expect):
    try:
        if LOWER_ONLY:
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
            rows_out.append((name, "lowered", ""))
            return
        got = np.asarray(jax.block_until_ready(fn(*args))).astype(np.float32)
        exp = np.asarray(expect).astype(np.float32)
        err = np.linalg.norm(got - exp) / max(np.linalg.norm(exp), 1e-30)
        extra = ""
        if err > 1e-2 and got.ndim == 2:
            bad = np.abs(got - exp) > 1e-2 * np.abs(exp).max()
            r, c = np.nonzero(bad)
            extra = f"bad rows {sorted(set(r.tolist()))[:8]} cols[{c.min()}..{c.max()}] n={bad.sum()}"
        rows_out.append((name, f"{err:.2e}", extra))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows_out.append((name, "EXC", f"{type(e).__name__}: {str(e)[:150]}"))


def conv_kernel(d, CW, swz):
    """GMEM (bk, d) -> staging (bk, d/RW, RW) by one TMA -> per-chunk register copy -> tiled -> TMA out."""
    RW = min(d, 256)
    lay = plgpu.Layout.SMEM_GMEM_COPY((bk, CW), jnp.dtype(BF), swz)

    def body(x_ref, o_ref, stage, tiled, bar):
        plgpu.copy_gmem_to_smem(x_ref, stage, bar)
        plgpu.barrier_wait(bar)
        for c in range(d // CW):
            src = stage.at[:, (c * CW) // RW, pl.ds((c * CW) % RW, CW)]
            tiled.at[:, pl.ds(c * CW, CW)][...] = plgpu.load(src, (), layout=lay, optimized=False)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(tiled, o_ref)
        plgpu.wait_smem_to_gmem(0)

    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((bk, d), BF),
                     scratch_types=[plgpu.SMEM((bk, d // RW, RW), BF), plgpu.SMEM((bk, d), BF, transforms=swz_t(swz)),
                                    plgpu.Barrier()])
    return lambda x: k(x.reshape(bk, d // RW, RW))


def conv2_kernel(d, CW, swz, chunked_dst, contig_src):
    """Variants: dst (d/CW, bk, CW) chunks (no column slice of the tiled ref); src staged chunk-major by TMA."""
    lay = plgpu.Layout.SMEM_GMEM_COPY((bk, CW), jnp.dtype(BF), swz)
    nc = d // CW

    def body(x_ref, o_ref, stage, tiled, bar):
        if contig_src:
            for c in range(nc):
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(c * CW, CW)], stage.at[c], bar)
        else:
            plgpu.copy_gmem_to_smem(x_ref, stage, bar)
        plgpu.barrier_wait(bar)
        for c in range(nc):
            src = stage.at[c] if contig_src else stage.at[:, pl.ds(c * CW, CW)]
            v = plgpu.load(src, (), layout=lay, optimized=False)
            if chunked_dst:
                tiled.at[c][...] = v
            else:
                tiled.at[:, pl.ds(c * CW, CW)][...] = v
        plgpu.commit_smem()
        if chunked_dst:
            for c in range(nc):
                plgpu.copy_smem_to_gmem(tiled.at[c], o_ref.at[:, pl.ds(c * CW, CW)])
        else:
            plgpu.copy_smem_to_gmem(tiled, o_ref)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((bk, d), BF),
                        scratch_types=[plgpu.SMEM((nc, bk, CW) if contig_src else (bk, d), BF),
                                       plgpu.SMEM((nc, bk, CW) if chunked_dst else (bk, d), BF,
                                                  transforms=swz_t(swz)),
                                       plgpu.Barrier(num_arrivals=nc if contig_src else 1)])


def stage_dump_kernel(d):
    """GMEM -> untiled staging by TMA -> register load (strided slices, copy layout) -> untiled SMEM -> GMEM."""
    CW = 64
    lay = plgpu.Layout.SMEM_GMEM_COPY((bk, CW), jnp.dtype(BF), 64)

    def body(x_ref, o_ref, stage, out_s, bar):
        plgpu.copy_gmem_to_smem(x_ref, stage, bar)
        plgpu.barrier_wait(bar)
        for c in range(d // CW):
            v = plgpu.load(stage.at[:, pl.ds(c * CW, CW)], (), layout=lay, optimized=False)
            out_s.at[c][...] = v.astype(jnp.float32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_s, o_ref)
        plgpu.wait_smem_to_gmem(0)

    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((d // CW, bk, CW), jnp.float32),
                     scratch_types=[plgpu.SMEM((bk, d), BF), plgpu.SMEM((d // CW, bk, CW), jnp.float32),
                                    plgpu.Barrier()])
    return lambda x: k(x).transpose(1, 0, 2).reshape(bk, d)


def qk_kernel(d, h, swz):
    """S = Q[:, half h] · K[:, half h]^T with Q half and K block TMA'd into tiled SMEM; S out through f32 SMEM."""
    dh = d // 2

    def body(q_ref, k_ref, o_ref, q_s, k_s, s_s, bar):
        plgpu.copy_gmem_to_smem(q_ref.at[:, pl.ds(h * dh, dh)], q_s, bar)
        plgpu.copy_gmem_to_smem(k_ref, k_s, bar)
        plgpu.barrier_wait(bar)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_s, plgpu.transpose_ref(k_s.at[:, pl.ds(h * dh, dh)], (1, 0)))
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((M, bk), jnp.float32))
        s_s[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_s, o_ref)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, bk), jnp.float32),
                        scratch_types=[plgpu.SMEM((M, dh), BF, transforms=swz_t(swz)),
                                       plgpu.SMEM((bk, d), BF, transforms=swz_t(swz)),
                                       plgpu.SMEM((M, bk), jnp.float32), plgpu.Barrier(num_arrivals=2)])


def pv_kernel(d, h, swz, mode):
    """O = P · V[:, half h]; P (M, bk) bf16 from registers (WGMMA layout), V block TMA'd into tiled SMEM.
    mode 'slice': B = column slice of the (bk, d) tile; 'own': V half TMA'd into its own (bk, dh) buffer."""
    dh = d // 2

    def body(p_ref, v_ref, o_ref, p_s, v_s, o_s, bar):
        plgpu.copy_gmem_to_smem(p_ref, p_s, bar)
        if mode == "slice":
            plgpu.copy_gmem_to_smem(v_ref, v_s, bar)
        else:
            plgpu.copy_gmem_to_smem(v_ref.at[:, pl.ds(h * dh, dh)], v_s, bar)
        plgpu.barrier_wait(bar)
        p = plgpu.load(p_s, (), layout=plgpu.Layout.WGMMA, optimized=False)
        vb = v_s.at[:, pl.ds(h * dh, dh)] if mode == "slice" else v_s

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, vb)

        acc = pl.run_state(pv)(plgpu.ACC.init(plgpu.layout_cast(jnp.zeros((M, dh), jnp.float32), plgpu.Layout.WGMMA)))
        o_s[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref)
        plgpu.wait_smem_to_gmem(0)

    vshape = (bk, d) if mode == "slice" else (bk, dh)
    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, dh), jnp.float32),
                        scratch_types=[plgpu.SMEM((M, bk), BF), plgpu.SMEM(vshape, BF, transforms=swz_t(swz)),
                                       plgpu.SMEM((M, dh), jnp.float32), plgpu.Barrier(num_arrivals=2)])


def pv_smemA_kernel(d, h, swz):
    """O = P · V[:, half h] with P from tiled SMEM too (A in SMEM): isolates the A-in-registers path."""
    dh = d // 2

    def body(p_ref, v_ref, o_ref, p_s, v_s, o_s, bar):
        plgpu.copy_gmem_to_smem(p_ref, p_s, bar)
        plgpu.copy_gmem_to_smem(v_ref, v_s, bar)
        plgpu.barrier_wait(bar)

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p_s, v_s.at[:, pl.ds(h * dh, dh)])
            return acc_ref[...]

        o_s[...] = pl.run_scoped(pv, plgpu.ACC((M, dh), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((M, dh), jnp.float32),
                        scratch_types=[plgpu.SMEM((M, bk), BF, transforms=swz_t(swz)),
                                       plgpu.SMEM((bk, d), BF, transforms=swz_t(swz)),
                                       plgpu.SMEM((M, dh), jnp.float32), plgpu.Barrier(num_arrivals=2)])


def main():
    key = jax.random.key(0)
    for d in (128, 512):
        dh = d // 2
        k1, k2, k3, key = jax.random.split(key, 4)
        x = jax.random.normal(k1, (bk, d), BF)
        q = jax.random.normal(k2, (M, d), BF)
        p = jax.random.uniform(k3, (M, bk), jnp.float32).astype(BF)
        xf, qf, pf = (np.asarray(a.astype(jnp.float32)) for a in (x, q, p))
        if os.environ.get("FULL_ONLY") == "1":
            break
        for CW in (64, 32):
            run(f"conv d={d} CW={CW}", conv_kernel(d, CW, 64), (x,), xf)
        if d <= 256:
            run(f"conv d={d} CW=d (no slices)", conv_kernel(d, d, 64), (x,), xf)
        if d <= 256:
            run(f"stage regs dump d={d}", stage_dump_kernel(d), (x,), xf)
        for cd, cs in ((1, 0), (0, 1), (1, 1)) if d <= 256 else ((1, 1),):
            run(f"conv2 d={d} chunkdst={cd} contigsrc={cs}", conv2_kernel(d, 64, 64, cd, cs), (x,), xf)
        for h in (0, 1):
            run(f"qk d={d} h={h}", qk_kernel(d, h, 64), (q, x), qf[:, h * dh:(h + 1) * dh] @ xf[:, h * dh:(h + 1) * dh].T)
            exp = pf @ xf[:, h * dh:(h + 1) * dh]
            run(f"pv regsA slice d={d} h={h}", pv_kernel(d, h, 64, "slice"), (p, x), exp)
            run(f"pv regsA own d={d} h={h}", pv_kernel(d, h, 64, "own"), (p, x), exp)
            run(f"pv smemA slice d={d} h={h}", pv_smemA_kernel(d, h, 64), (p, x), exp)
    # the full kernel
    if os.environ.get("UNITS_ONLY") != "1":
        from dsv4jax.pallas.sparse_attention.kernel import sparse_attention_kernel
        from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference
        for d, B, S, N, K in ((128, 1, 4, 300, 96), (512, 1, 4, 300, 96), (512, 2, 1, 700, 640)):
            ks = jax.random.split(jax.random.key(d + K), 4)
            q = jax.random.normal(ks[0], (B, S, 64, d), BF)
            kv = jax.random.normal(ks[1], (B, N, d), BF)
            idx = jax.random.randint(ks[2], (B, S, K), -20, N, dtype=jnp.int32)
            sink = jax.random.normal(ks[3], (64,), jnp.float32)
            ref = sparse_attention_reference(q.astype(jnp.float32), kv.astype(jnp.float32), idx, sink, d ** -0.5)
            run(f"full d={d} B={B} S={S} K={K}", lambda *a: sparse_attention_kernel(*a, scale=d ** -0.5),
                (q, kv, idx, sink), ref)
    print("\n==== table ====")
    for r in rows_out:
        print(f"{r[0]:34s} {r[1]:>9s}  {r[2]}")


if __name__ == "__main__":
    main()
