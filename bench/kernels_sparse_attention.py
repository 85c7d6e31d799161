"""Benchmark: the Mosaic GPU sparse attention kernel against the jitted XLA reference on V4-Flash shapes.

Prefill: H=64, d=512, bf16, window 128 + top-k 512 (K=640); kv = [window ring 128 | the chunk's S rows | S/4
compressed rows]; query t attends rows 128+t-j (j<128) and 512 distinct random compressed rows.
Decode: B sequences of one query token, K = 128 window + 512 compressed indices into kv of 128+1+ctx/4 rows.
Useful FLOPs: valid (query, key) pairs × H × d × 2 (QK) × 2 (PV). Decode bytes: valid KV rows + Q read.
Each kernel output is checked against the reference first (output buffer poisoned by a preceding NaN run).
Times: `kernel_s` / `reference_s` are device time per call (the call's kernels in a profiler trace, wrapper ops
included; `mosaic_kernel_s` the kernel alone), and every rate, roofline fraction and speed-up comes from them;
`*_wall_s` is the synchronised wall time, which adds ~0.1-0.2 ms of dispatch per call on our H100 host.
Small decode batches split over K by default (--splits 1: one CTA per token and head group). The kernel's switches
(`Tuning` in dsv4jax/pallas/sparse_attention/kernel.py) are set with --tuning, e.g. --tuning warp_issue=0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (device_ms, device_slug, measure_ceilings, median_seconds, rel_l2, roofline,  # noqa: E402
                          trace_every_kernel, write_results)
from dsv4jax.pallas.sparse_attention.kernel import (DEFAULT_TUNING, Tuning, default_splits,  # noqa: E402
                                                    sparse_attention_kernel)
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference  # noqa: E402

H, D, WINDOW, TOPK = 64, 512, 128, 512
SCALE = D ** -0.5


def _distinct_rows(key, count, rows, k):
    """count × k distinct rows < rows each (rows a power of two): a + j·c mod rows with c odd."""
    ka, kc = jax.random.split(key)
    a = jax.random.randint(ka, (count, 1), 0, rows)
    c = 2 * jax.random.randint(kc, (count, 1), 0, max(rows // 2, 1)) + 1
    return ((a + jnp.arange(k)[None] * c) % rows).astype(jnp.int32)


def prefill_inputs(S, key):
    ks = jax.random.split(key, 4)
    n_comp = S // 4
    N = WINDOW + S + n_comp
    q = jax.random.normal(ks[0], (1, S, H, D), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (1, N, D), jnp.bfloat16)
    t = jnp.arange(S)[:, None]
    window = (WINDOW + t - jnp.arange(WINDOW)[None]).astype(jnp.int32)
    comp = WINDOW + S + _distinct_rows(ks[2], S, n_comp, min(TOPK, n_comp))
    idx = jnp.concatenate([window, comp], axis=1)[None]
    sink = jax.random.normal(ks[3], (H,), jnp.float32)
    return q, kv, idx, sink


def decode_inputs(B, ctx, key):
    ks = jax.random.split(key, 4)
    n_comp = ctx // 4
    N = WINDOW + 1 + n_comp
    q = jax.random.normal(ks[0], (B, 1, H, D), jnp.bfloat16)
    kv = jax.random.normal(ks[1], (B, N, D), jnp.bfloat16)
    window = jnp.broadcast_to(jnp.arange(WINDOW, dtype=jnp.int32), (B, 1, WINDOW))
    comp = WINDOW + 1 + _distinct_rows(ks[2], B, n_comp, TOPK)[:, None]
    idx = jnp.concatenate([window, comp], axis=2)
    sink = jax.random.normal(ks[3], (H,), jnp.float32)
    return q, kv, idx, sink


def checked_kernel_output(q, kv, idx, sink, kernel=None, tuning: Tuning = DEFAULT_TUNING):
    """Run the kernel (default: jitted here; or an executable compiled for these shapes) once on NaN queries
    (poisoning the buffer the real run will likely reuse), then for real."""
    kernel = kernel or jax.jit(lambda *a: sparse_attention_kernel(*a, scale=SCALE, tuning=tuning))
    poison = kernel(jnp.full_like(q, jnp.nan), kv, idx, sink)
    jax.block_until_ready(poison)
    del poison
    out = kernel(q, kv, idx, sink)
    return kernel, jax.block_until_ready(out)


def check_small(key, tuning: Tuning = DEFAULT_TUNING):
    """Edge cases on the GPU: many -1, an all-invalid-but-window query, ragged decode, kv shared over B."""
    ks = jax.random.split(key, 6)
    records = []
    ref32 = jax.jit(lambda q, kv, i, s: sparse_attention_reference(q.astype(jnp.float32), kv.astype(jnp.float32),
                                                                   i, s, SCALE))
    cases = []
    B, S, N, K = 2, 64, 700, 600
    idx = jax.random.randint(ks[0], (B, S, K), -1, N)
    idx = jnp.where(jax.random.uniform(ks[1], idx.shape) < 0.5, -1, idx)
    idx = idx.at[:, 0, 4:].set(-1)  # a query with only 4 valid rows
    cases.append(("many -1, K=600", B, S, N, idx, B))
    B, S, N = 3, 3, 5000
    idx = jax.random.randint(ks[2], (B, S, 640), 0, N)
    valid = jnp.array([[640, 300, 129], [5, 640, 64], [1, 2, 640]])[..., None]
    idx = jnp.where(jnp.arange(640)[None, None] < valid, idx, -1)
    cases.append(("ragged decode B=3 S=3", B, S, N, idx, B))
    cases.append(("kv batch 1 shared", B, S, N, idx, 1))
    B, S, N, K = 2, 2, 9000, 4224  # HCA at 512k tokens: K = 128 + 4096 (the index ring wraps 22 times)
    idx = jax.random.randint(ks[3], (B, S, K), 0, N)
    idx = jnp.where(jax.random.uniform(ks[4], idx.shape) < 0.3, -1, idx)
    cases.append(("long-context K=4224", B, S, N, idx, B))
    for name, B, S, N, idx, Bk in cases:
        kq, kk, ksk = jax.random.split(jax.random.fold_in(key, len(records)), 3)
        q = jax.random.normal(kq, (B, S, H, D), jnp.bfloat16)
        kv = jax.random.normal(kk, (Bk, N, D), jnp.bfloat16)
        sink = jax.random.normal(ksk, (H,), jnp.float32)
        _, out = checked_kernel_output(q, kv, idx, sink, tuning=tuning)
        ref = ref32(q, jnp.broadcast_to(kv, (B, N, D)), idx, sink)
        err = rel_l2(out, ref)
        nan = bool(jnp.isnan(out.astype(jnp.float32)).any())
        records.append({"case": name, "rel_l2_vs_fp32_ref": err, "nan": nan, "ok": (err <= 2e-2) and not nan})
        print(f"check {name:28s} rel_l2={err:.2e} nan={nan}", flush=True)
    return records


PREFILL_LENGTHS = (4096, 16384, 65536)
DECODE_SHAPES = tuple((b, c) for c in (4096, 131072) for b in (1, 8, 32, 128))


def benchmark(prefill_lengths=PREFILL_LENGTHS, decode_shapes=DECODE_SHAPES, name=None, splits=None,
              tuning: Tuning = DEFAULT_TUNING) -> list[dict]:
    name = name or f"kernels-sparse_attention-{device_slug()}"
    ceilings = measure_ceilings()
    print(f"ceilings: matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_tbps']:.2f} TB/s", flush=True)
    key = jax.random.key(int(time.time()))
    records = [{"kind": "ceilings", **ceilings}] + [{"kind": "check", **r} for r in check_small(jax.random.fold_in(key, 99), tuning)]
    reference = jax.jit(lambda *a: sparse_attention_reference(*a, SCALE))

    def run(kind, label, q, kv, idx, sink, ref_fits, iters):
        rec = {"kind": kind, "shape": label, "B": q.shape[0], "S": q.shape[1], "H": H, "d": D, "K": idx.shape[2],
               "kv_rows": kv.shape[1],
               "splits": (min(splits, -(-idx.shape[2] // 32)) if splits  # the kernel caps splits at the blocks
                          else default_splits(q.shape[0] * q.shape[1], H, idx.shape[2], split_k=tuning.split_k))}
        start = time.perf_counter()  # first sight of this shape: lowering (Mosaic GPU layout inference) + compile
        lowered = jax.jit(lambda *a: sparse_attention_kernel(*a, scale=SCALE, splits=splits, tuning=tuning)).lower(
            q, kv, idx, sink)
        rec["lower_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        rec["compile_s"] = time.perf_counter() - start
        kernel, out = checked_kernel_output(q, kv, idx, sink, compiled)
        valid = int((idx >= 0).sum())
        flops = valid * H * D * 4
        bytes_read = valid * D * kv.dtype.itemsize + q.size * q.dtype.itemsize
        ref_out = None
        if ref_fits:
            ref_out = jax.block_until_ready(reference(q, kv, idx, sink))
            # bf16 reference vs bf16 kernel; both round P to bf16
            rec["rel_l2_vs_ref"] = rel_l2(out, ref_out.astype(jnp.float32))
        else:
            # the XLA reference would not fit: check a slice of queries against it instead
            sl = slice(0, 2048)
            part = jax.block_until_ready(reference(q[:, sl], kv, idx[:, sl], sink))
            rec["rel_l2_vs_ref"] = rel_l2(out[:, sl], part.astype(jnp.float32))
            rec["reference_note"] = "XLA reference skipped for timing: its [S,K,d] gather would not fit; checked on 2048 queries"
        rec["nan"] = bool(jnp.isnan(out.astype(jnp.float32)).any())
        del out, ref_out
        rec["kernel_wall_s"] = median_seconds(kernel, q, kv, idx, sink, warmup=2, iters=iters)
        dev = device_ms(kernel, q, kv, idx, sink)
        t_k = rec["kernel_s"] = dev["total_ms"] / 1e3
        rec["mosaic_kernel_s"] = max(dev["kernels_ms"].values()) / 1e3
        rec["kernel_tflops"] = flops / t_k / 1e12
        rec["kernel_tbps"] = bytes_read / t_k / 1e12
        roof = roofline(flops, bytes_read, ceilings)
        rec["floor_s"], rec["bound"] = roof["floor_s"], roof["bound"]
        rec["roofline_fraction"] = roof["floor_s"] / t_k
        if ref_fits:
            rec["reference_wall_s"] = median_seconds(reference, q, kv, idx, sink, warmup=1, iters=max(3, iters // 2))
            t_r = rec["reference_s"] = device_ms(reference, q, kv, idx, sink)["total_ms"] / 1e3
            rec["speedup_vs_xla"] = t_r / t_k
        rec["useful_flops"], rec["bytes_read"] = flops, bytes_read
        print(f"{kind:7s} {label:16s} kernel {t_k * 1e3:8.3f} ms {rec['kernel_tflops']:6.1f} TFLOP/s "
              f"{rec['kernel_tbps']:5.2f} TB/s roof {rec['roofline_fraction']:.2f} ({rec['bound']}) "
              f"xla {rec.get('reference_s', float('nan')) * 1e3:8.3f} ms x{rec.get('speedup_vs_xla', float('nan')):.1f} "
              f"err {rec['rel_l2_vs_ref']:.1e}", flush=True)
        return rec

    def save():  # after every record, so a run cut short by a time limit still leaves its figures
        return write_results(name, {"H": H, "d": D, "window": WINDOW, "topk": TOPK, "dtype": "bfloat16",
                                    "block_rows": 32, **dataclasses.asdict(tuning)}, records, {"ceilings": ceilings})

    save()
    for S in prefill_lengths:
        q, kv, idx, sink = prefill_inputs(S, jax.random.fold_in(key, S))
        records.append(run("prefill", f"S={S}", q, kv, idx, sink, ref_fits=S <= 16384, iters=10))
        save()
        del q, kv, idx, sink
    for B, ctx in decode_shapes:
        q, kv, idx, sink = decode_inputs(B, ctx, jax.random.fold_in(key, B * 7 + ctx))
        records.append(run("decode", f"B={B} ctx={ctx}", q, kv, idx, sink, ref_fits=True, iters=20))
        save()
        del q, kv, idx, sink
    print("wrote", save())
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, nargs="*", default=list(PREFILL_LENGTHS), help="prefill lengths")
    parser.add_argument("--decode", nargs="*", default=[f"{b}:{c}" for b, c in DECODE_SHAPES],
                        help="decode shapes as batch:context")
    parser.add_argument("--splits", type=int, default=None,
                        help="CTAs per token over K for every timed shape (default: the kernel's default_splits)")
    parser.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="kernel switches, e.g. chunk_columns=128 row_unroll=8 split_k=0 warp_issue=0 "
                             "no_auto_barriers=0 (default: the verified kernel)")
    parser.add_argument("--name", default=f"kernels-sparse_attention-{device_slug()}")
    args = parser.parse_args()
    tuning = dataclasses.replace(DEFAULT_TUNING, **{
        field: (type(getattr(DEFAULT_TUNING, field))(int(value)))
        for field, value in (item.split("=", 1) for item in args.tuning)})
    trace_every_kernel()
    benchmark(args.prefill, [tuple(map(int, shape.split(":"))) for shape in args.decode], args.name, args.splits,
              tuning)
