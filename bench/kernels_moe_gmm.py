"""Benchmark: MoE grouped GEMM kernels (dsv4jax/pallas/moe_gmm) against the XLA reference (ragged_dot_general).

V4-Flash shapes: 256 experts, top-6, D=4096, I=2048, random routing, T tokens -> T*6 rows sorted by expert.
Useful FLOP = rows * (2*D*I*2 + 2*I*D) for the fused first layer plus the second. Bytes = the touched experts'
weights (3*D*I each, bf16 or fp8) + activations (x read, hidden written and read, out written). The roofline
floor is max(FLOP / matmul ceiling, bytes / copy bandwidth), both measured in the same run (bench/common.py).

Before timing, every kernel is checked against the reference on the GPU (the output allocation poisoned with
NaN first): exactly where the reference fits, on sampled rows where it does not.

Times: `kernel_s` / `ref_s` are device time per call (the call's kernels in a profiler trace: both grouped GEMMs
and the tile schedule), and the rates, roofline fractions and speed-ups come from them; `*_wall_s` is the
synchronised wall time, which adds ~0.1-0.2 ms of dispatch per call on our H100 host.

    python -m bench.kernels_moe_gmm            # writes bench/results/kernels-moe_gmm-<device>.json
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (device_ms, device_slug, measure_ceilings, median_seconds, rel_l2, roofline,
                          trace_every_kernel, write_results)
from dsv4jax.pallas import moe_gmm
from dsv4jax.pallas.moe_gmm import kernel

E, TOP_K, D, I = 256, 6, 4096, 2048
LIMIT = 10.0
TOKENS = (1, 16, 128, 1024, 8192, 65536)
REF_MAX_ROWS = 1024 * 6  # ragged_dot_general materialises [E, rows, ...]: larger shapes are tried, OOM caught


def _log(*a):
    print(*a, flush=True)


def _rel(out, ref):
    """rel_l2, or inf where the kernel left a non-finite value (a poisoned row it never wrote)."""
    out = np.asarray(jnp.asarray(out, jnp.float32))
    return rel_l2(out, jnp.asarray(ref, jnp.float32)) if np.all(np.isfinite(out)) else float("inf")


def _poison(shape, dtype):
    """Fill and free an allocation of the output's size so the kernel's output buffer starts as NaN."""
    buf = jnp.full(shape, jnp.nan, dtype)
    buf.block_until_ready()
    buf.delete()


def _weights(key, fp8: bool):
    ks = jax.random.split(key, 3)
    shapes = ((E, I, D), (E, I, D), (E, D, I))
    out = []
    for k, s in zip(ks, shapes):
        w = jax.random.normal(k, s, jnp.bfloat16) * float(1.0 / np.sqrt(s[-1]))
        if not fp8:
            out.append((w, None))
            continue
        exps = jax.random.randint(jax.random.fold_in(k, 1), (s[0], s[1] // 128, s[2] // 128), 118, 122)
        scale = jax.lax.bitcast_convert_type(exps.astype(jnp.uint8), jnp.float8_e8m0fnu)
        sf = jnp.repeat(jnp.repeat(jnp.exp2(exps.astype(jnp.float32) - 127), 128, 1), 128, 2)
        wq = (w.astype(jnp.float32) / sf).astype(jnp.float8_e4m3fn)
        del sf
        out.append((wq, scale))
    return out


def _routing(key, tokens):
    scores = jax.random.uniform(key, (tokens, E))
    experts = jnp.argsort(scores, axis=1)[:, :TOP_K].astype(jnp.int32)
    return jnp.bincount(experts.reshape(-1), length=E).astype(jnp.int32)


def _time(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    second = time.perf_counter() - t0
    if second > 1.0:
        return second
    iters = 20 if second < 0.05 else 5
    return median_seconds(fn, *args, warmup=1, iters=iters)


def _sampled_check(x, h, out, ws, group_sizes, rows, key, fp8):
    """Reference on 48 sampled rows (weights gathered per row)."""
    (w1, s1), (w3, s3), (w2, s2) = ws
    idx = jax.random.choice(key, rows, (48,), replace=False)
    ends = jnp.cumsum(group_sizes)
    g = jnp.searchsorted(ends, idx, side="right")
    deq = (lambda w, s: moe_gmm.dequantize_fp8_blocks(w[g], s[g]).astype(jnp.bfloat16)) if fp8 else \
        (lambda w, s: w[g])
    xr = x[idx].astype(jnp.float32)
    p1 = jnp.einsum("rk,rnk->rn", xr, deq(w1, s1).astype(jnp.float32)).astype(jnp.bfloat16)
    p3 = jnp.einsum("rk,rnk->rn", xr, deq(w3, s3).astype(jnp.float32)).astype(jnp.bfloat16)
    rw = jnp.ones((48,), jnp.float32)
    href = (moe_gmm.clamped_swiglu(p1, p3, LIMIT) * rw[:, None]).astype(jnp.bfloat16)
    oref = jnp.einsum("rk,rnk->rn", h[idx].astype(jnp.float32), deq(w2, s2).astype(jnp.float32))
    return _rel(h[idx], href), _rel(out[idx], oref.astype(jnp.bfloat16))


def _small_correctness(key):
    """Odd cases on the GPU: zero-size groups, rows not a multiple of the block, one group holding all rows."""
    res = []
    g, d, n = 8, 256, 384
    cases = {"zeros+odd": [37, 0, 0, 250, 1, 0, 13, 0], "one_group": [0, 0, 0, 0, 0, 1000, 0, 0],
             "all_empty_but_one_row": [0, 0, 0, 0, 0, 0, 0, 1], "many_small": [3, 5, 7, 11, 13, 17, 19, 23]}
    for name, sizes in cases.items():
        sizes = jnp.array(sizes, jnp.int32)
        m = int(sizes.sum())
        ks = jax.random.split(jax.random.fold_in(key, m), 6)
        x = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
        w1 = jax.random.normal(ks[1], (g, n, d), jnp.bfloat16) * float(2 / np.sqrt(d))
        w3 = jax.random.normal(ks[2], (g, n, d), jnp.bfloat16) * float(2 / np.sqrt(d))
        rw = jax.random.uniform(ks[3], (m,))
        for cfg in (kernel.Config(64, 64, 64, 6), kernel.Config(128, 128, 64, 4)):
            _poison((m, n), jnp.bfloat16)
            h = moe_gmm.grouped_matmul_swiglu(x, w1, w3, sizes, rw, 1.5, cfg=cfg)
            e1 = _rel(h, moe_gmm.grouped_matmul_swiglu_ref(x, w1, w3, sizes, rw, 1.5))
            _poison((m, n), jnp.bfloat16)
            o = moe_gmm.grouped_matmul(x, w1, sizes, cfg=cfg)
            e2 = _rel(o, moe_gmm.grouped_matmul_ref(x, w1, sizes))
            res.append({"case": name, "cfg": dataclasses.asdict(cfg), "swiglu_rel": e1, "plain_rel": e2})
            _log("check", name, cfg, f"swiglu {e1:.2e} plain {e2:.2e}")
        # fp8 weights
        w8 = (jax.random.normal(ks[4], (g, n, d)) * 30).astype(jnp.float8_e4m3fn)
        exps = jax.random.randint(ks[5], (g, n // 128, d // 128), 118, 124).astype(jnp.uint8)
        sc = jax.lax.bitcast_convert_type(exps, jnp.float8_e8m0fnu)
        _poison((m, n), jnp.bfloat16)
        o = moe_gmm.grouped_matmul(x, w8, sizes, sc)
        e3 = _rel(o, moe_gmm.grouped_matmul_ref(x, w8, sizes, sc))
        _poison((m, n), jnp.bfloat16)
        h = moe_gmm.grouped_matmul_swiglu(x, w8, w8, sizes, rw, 1.5, sc, sc)
        e4 = _rel(h, moe_gmm.grouped_matmul_swiglu_ref(x, w8, w8, sizes, rw, 1.5, sc, sc))
        res.append({"case": name + "_fp8", "plain_rel": e3, "swiglu_rel": e4})
        _log("check fp8", name, f"plain {e3:.2e} swiglu {e4:.2e}")
    # The public function through the dispatch, V4-Flash shapes, 64 tokens, against the reference.
    ks = jax.random.split(jax.random.fold_in(key, 7), 8)
    t = 64
    x = jax.random.normal(ks[0], (t, D), jnp.bfloat16)
    experts = jnp.argsort(jax.random.uniform(ks[1], (t, E)), axis=1)[:, :TOP_K].astype(jnp.int32)
    wts = jax.random.uniform(ks[2], (t, TOP_K))
    w1 = jax.random.normal(ks[3], (E, I, D), jnp.bfloat16) * float(2 / np.sqrt(D))
    w3 = jax.random.normal(ks[4], (E, I, D), jnp.bfloat16) * float(2 / np.sqrt(D))
    w2 = jax.random.normal(ks[5], (E, D, I), jnp.bfloat16) * float(1 / np.sqrt(I))
    pallas = jax.jit(lambda *a: moe_gmm.routed_experts(*a, LIMIT, implementation="pallas"))
    got = pallas(x, experts, wts, w1, w3, w2)
    ref = moe_gmm.routed_experts_reference(x, experts, wts, w1, w3, w2, LIMIT)
    e5 = _rel(got, ref)
    res.append({"case": "routed_experts_T64_v4flash", "rel": e5})
    _log("check routed_experts T=64", f"{e5:.2e}")
    return res


def benchmark(tokens=TOKENS, variants: bool = False, out_dir: str | None = None) -> list[dict]:
    key = jax.random.key(int(time.time()))
    ceilings = measure_ceilings()
    _log("ceilings", ceilings)
    records: list[dict] = [{"kind": "ceilings", **ceilings}]
    try:
        records += [{"kind": "check", **r} for r in _small_correctness(jax.random.fold_in(key, 99))]
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        records.append({"kind": "check", "error": repr(e)[:2000]})

    for fp8 in (False, True):
        ws = _weights(jax.random.fold_in(key, 1 + fp8), fp8)
        (w1, s1), (w3, s3), (w2, s2) = ws
        wbytes = 1 if fp8 else 2

        @jax.jit
        def kernels(x, gs, rw, w1, w3, w2, s1, s3, s2):
            h = kernel.grouped_matmul_swiglu(x, w1, w3, gs, rw, LIMIT, s1, s3)
            return h, kernel.grouped_matmul(h, w2, gs, s2)

        @jax.jit
        def reference(x, gs, rw, w1, w3, w2, s1, s3, s2):
            h = moe_gmm.grouped_matmul_swiglu_ref(x, w1, w3, gs, rw, LIMIT, s1, s3)
            return moe_gmm.grouped_matmul_ref(h, w2, gs, s2)

        last_ref_s = None
        for t in tokens:
            rows = t * TOP_K
            padded = -(-rows // 128) * 128  # as routed_experts pads the sorted rows
            kt = jax.random.fold_in(key, t)
            gs = _routing(kt, t)
            x = jax.random.normal(jax.random.fold_in(kt, 1), (padded, D), jnp.bfloat16)
            rw = jnp.ones((padded,), jnp.float32)
            touched = int((gs > 0).sum())
            flops = rows * 6 * D * I
            nbytes = touched * 3 * D * I * wbytes + rows * (D * 2 * 2 + I * 2 * 2)
            floor = roofline(flops, nbytes, ceilings)
            rec = {"kind": "time", "tokens": t, "rows": rows, "weights": "fp8" if fp8 else "bf16",
                   "touched_experts": touched, "flop": flops, "bytes": nbytes, **floor}
            try:
                _poison((padded, I), jnp.bfloat16)
                h, o = kernels(x, gs, rw, w1, w3, w2, s1, s3, s2)
                jax.block_until_ready(o)
                if rows <= REF_MAX_ROWS:
                    ref = reference(x, gs, rw, w1, w3, w2, s1, s3, s2)
                    rec["check_rel"] = _rel(o[:rows], ref[:rows])
                    rec["check_ref_norm"] = float(jnp.linalg.norm(ref[:rows].astype(jnp.float32)))
                    rec["check_out_norm"] = float(jnp.linalg.norm(o[:rows].astype(jnp.float32)))
                    del ref
                else:
                    eh, eo = _sampled_check(x, h, o, ws, gs, rows, jax.random.fold_in(kt, 2), fp8)
                    rec["check_rel_sampled_hidden"], rec["check_rel"] = eh, eo
                del h, o
                rec["kernel_wall_s"] = _time(kernels, x, gs, rw, w1, w3, w2, s1, s3, s2)
                dev = device_ms(kernels, x, gs, rw, w1, w3, w2, s1, s3, s2)
                t_k = dev["total_ms"] / 1e3
                rec["mosaic_kernels_s"] = dev["kernels_ms"].get("body_mosaic_gpu_kernel", 0.0) / 1e3
                rec.update(kernel_s=t_k, kernel_tflops=flops / t_k / 1e12, kernel_roofline=floor["floor_s"] / t_k)
                rec.update(cfg1=dataclasses.asdict(kernel.default_config(padded, I, D, fused=True)),
                           cfg2=dataclasses.asdict(kernel.default_config(padded, D, I, fused=False)))
                if variants and t in (1, 8192, 65536):
                    h, _ = kernels(x, gs, rw, w1, w3, w2, s1, s3, s2)
                    rec["variants"] = _variants(x, gs, rw, h, ws, rows, fp8)
                    del h
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec["kernel_error"] = repr(e)[:2000]
            try:
                if rows > REF_MAX_ROWS and (last_ref_s is None or last_ref_s * rows / REF_MAX_ROWS > 5.0):
                    raise RuntimeError(f"skipped: ragged_dot_general at {REF_MAX_ROWS} rows took {last_ref_s} s; "
                                       "scaled up it would take minutes (or run out of memory)")
                rec["ref_wall_s"] = _time(reference, x, gs, rw, w1, w3, w2, s1, s3, s2)
                t_r = device_ms(reference, x, gs, rw, w1, w3, w2, s1, s3, s2)["total_ms"] / 1e3
                last_ref_s = rec["ref_wall_s"]
                rec.update(ref_s=t_r, ref_tflops=flops / t_r / 1e12, ref_roofline=floor["floor_s"] / t_r)
                if "kernel_s" in rec:
                    rec["speedup"] = t_r / rec["kernel_s"]
            except Exception as e:  # noqa: BLE001
                rec["ref_error"] = repr(e)[:300]
            _log({k: (round(v, 6) if isinstance(v, float) else v) for k, v in rec.items() if k != "variants"})
            records.append(rec)
            if out_dir:
                write_results(_name(), _config(), records)
        del ws, w1, w3, w2
    return records


VARIANTS_BF16 = ((64, 64, 64, 6), (64, 128, 64, 6), (64, 64, 128, 4), (128, 64, 64, 4), (128, 64, 64, 6),
                 (128, 128, 64, 4), (128, 128, 64, 3))
VARIANTS_FP8 = ((64, 64, 128, 4), (128, 64, 128, 3))


def _variants(x, gs, rw, h, ws, rows, fp8, configs=None):
    """Each grouped GEMM alone under other (block_m, block_n, block_k, stages), by device time; a configuration the
    kernel cannot lower is recorded as an error."""
    (w1, s1), (w3, s3), (w2, s2) = ws
    out = []
    for bm, bn, bk, st in configs or (VARIANTS_FP8 if fp8 else VARIANTS_BF16):
        r = {"block_m": bm, "block_n": bn, "block_k": bk, "stages": st}
        cfg = kernel.Config(bm, bn, bk, st)
        # Weights are arguments, never closed over: a closure would embed gigabytes of constants in the program.
        l1 = jax.jit(lambda x, gs, rw, w1, w3, s1, s3, cfg=cfg: kernel.grouped_matmul_swiglu(
            x, w1, w3, gs, rw, LIMIT, s1, s3, cfg=cfg))
        l2 = jax.jit(lambda h, gs, w2, s2, cfg=cfg: kernel.grouped_matmul(h, w2, gs, s2, cfg=cfg))
        for name, fn, args, fl in (("layer1", l1, (x, gs, rw, w1, w3, s1, s3), rows * 4 * D * I),
                                   ("layer2", l2, (h, gs, w2, s2), rows * 2 * D * I)):
            try:
                dev = device_ms(fn, *args)
                s = dev["total_ms"] / 1e3
                r[name + "_s"], r[name + "_tflops"], r[name + "_kernels_ms"] = s, fl / s / 1e12, dev["kernels_ms"]
            except Exception as e:  # noqa: BLE001
                r[name + "_error"] = repr(e)[:200]
        _log("variant", r)
        out.append(r)
    return out


def _name():  # MOE_BENCH_SUFFIX: a partial run (some token counts) writes beside the full results
    return f"kernels-moe_gmm-{device_slug()}" + os.environ.get("MOE_BENCH_SUFFIX", "")


def _config():
    return {"experts": E, "top_k": TOP_K, "dim": D, "inter_dim": I, "tokens": list(TOKENS), "limit": LIMIT,
            "routing": "uniform random top-6 distinct experts", "timing": "median wall time, block_until_ready"}


if __name__ == "__main__":
    trace_every_kernel()
    toks = tuple(int(a) for a in sys.argv[1:]) or TOKENS
    recs = benchmark(toks, variants=True, out_dir="results")  # block-size variants at 1, 8k and 64k tokens
    path = write_results(_name(), _config(), recs)
    if os.environ.get("OUT"):
        import shutil
        shutil.copy(path, os.environ["OUT"])
    _log("wrote", path)
    _log(f"{'T':>6} {'w':>4} {'rows':>7} {'bound':>7} {'kernel ms':>10} {'TFLOP/s':>8} {'roof%':>6} "
         f"{'ref ms':>9} {'ref TF/s':>8} {'x':>6} {'check':>8}")
    for r in recs:
        if r.get("kind") != "time":
            continue
        f = lambda k, s=1.0, fmt="{:.3f}": fmt.format(r[k] * s) if k in r else "-"
        _log(f"{r['tokens']:>6} {r['weights']:>4} {r['rows']:>7} {r['bound']:>7} {f('kernel_s', 1e3):>10} "
             f"{f('kernel_tflops', 1, '{:.1f}'):>8} {f('kernel_roofline', 100, '{:.0f}'):>6} {f('ref_s', 1e3):>9} "
             f"{f('ref_tflops', 1, '{:.1f}'):>8} {f('speedup', 1, '{:.1f}'):>6} {f('check_rel', 1, '{:.1e}'):>8}")
