"""What limits the kernels where the kernel targets are not met: each case timed beside a variant that removes one
suspect, in one run, by device time (a `jax.profiler` trace, so launch and host overhead are not counted).

    python3 bench/kernel_limits.py [--parts attention moe]

Attention decode (B=128 sequences, one query of 64 heads each, d=512, K=640 rows = 20 blocks of 32 per CTA):
- rows from HBM (each sequence's 640 random rows of a 128k-token cache) against rows from L2 (the same grid
  reading 640 random rows of one shared 2 MB kv): the difference is the cost of HBM latency per block;
- K = 640 / 1280 / 2560 rows: the slope is the time per 32-row block, the intercept the fixed cost per CTA;
- splits over K = 1 / 2 / 4 (more CTAs than SMs);
- XLA's gather of the same rows alone: the random-row bandwidth this GPU gives without any attention.
MoE, one token (6 rows; bf16 and fp8 weights): device time of each grouped GEMM and of the glue around them
(sort, gathers, scatter-add), and each GEMM under other block sizes.
mHC at prefill width: the model's einsums at HIGHEST precision against one-fusion multiply-sums.

Writes bench/results/kernel-limits-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import (device_ms, device_slug, measure_ceilings, median_seconds, trace_every_kernel,  # noqa: E402
                          write_results)
from bench.kernels_sparse_attention import D, H, SCALE, _distinct_rows, decode_inputs, rel_l2  # noqa: E402
from dsv4jax.pallas.sparse_attention.kernel import sparse_attention_kernel  # noqa: E402
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference  # noqa: E402


def _record(records, rec, name):
    print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
    records.append(rec)
    write_results(name, {"parts": "see records"}, records)


def attention_decode(records, name, key, ceilings):
    B, ctx = 128, 131072
    kernel = jax.jit(lambda q, kv, i, s, splits: sparse_attention_kernel(q, kv, i, s, scale=SCALE, splits=splits),
                     static_argnums=4)
    reference = jax.jit(lambda *a: sparse_attention_reference(*a, SCALE))

    def case(label, q, kv, idx, sink, splits=1):
        valid = int((idx >= 0).sum())
        row_bytes = valid * D * kv.dtype.itemsize
        out = kernel(q, kv, idx, sink, splits)
        ref = reference(q, jnp.broadcast_to(kv, (q.shape[0], *kv.shape[1:])), idx, sink)
        dev = device_ms(kernel, q, kv, idx, sink, splits)
        kernel_ms = max(dev["kernels_ms"].values())  # the Mosaic kernel; the rest is the wrapper's small ops
        rec = {"part": "attention_decode", "case": label, "B": q.shape[0], "K": idx.shape[2], "splits": splits,
               "blocks_per_cta": -(-idx.shape[2] // 32 // splits),
               "rel_l2_vs_ref": rel_l2(out, ref.astype(jnp.float32)),
               "wall_ms": 1e3 * median_seconds(kernel, q, kv, idx, sink, splits, warmup=2, iters=20),
               "device_ms": dev["total_ms"], "kernel_ms": kernel_ms, "device_kernels_ms": dev["kernels_ms"],
               "row_tbps": row_bytes / kernel_ms / 1e9}
        _record(records, rec, name)
        return rec

    q, kv, idx, sink = decode_inputs(B, ctx, key)
    base = case("rows from HBM (random, 128k-token caches)", q, kv, idx, sink)
    for splits in (2, 4):
        case("rows from HBM", q, kv, idx, sink, splits)
    # XLA's gather of the same rows, nothing else: [B, K, d] read at random and written contiguously.
    gather = jax.jit(lambda kv, idx: jnp.take_along_axis(kv, idx[:, 0, :, None], axis=1))
    g = device_ms(gather, kv, idx)
    moved = 2 * idx.size * D * kv.dtype.itemsize
    _record(records, {"part": "attention_decode", "case": "XLA gather of the same rows (read + write)",
                      "device_ms": g["total_ms"], "tbps_read_plus_write": moved / g["total_ms"] / 1e9,
                      "copy_ceiling_tbps": ceilings["copy_tbps"]}, name)
    for k_total in (1280, 2560):  # more compressed rows per sequence: the slope is the time per block
        comp = 129 + _distinct_rows(jax.random.fold_in(key, k_total), B, ctx // 4, k_total - 128)[:, None]
        case(f"K={k_total}, rows from HBM", q, kv, jnp.concatenate([idx[..., :128], comp], axis=2), sink)
    del kv
    # Rows from L2: one shared kv of 2048 rows (2 MB), 640 distinct random rows per sequence.
    kv_small = jax.random.normal(jax.random.fold_in(key, 5), (1, 2048, D), jnp.bfloat16)
    idx_small = _distinct_rows(jax.random.fold_in(key, 6), B, 2048, 640)[:, None]
    hot = case("rows from L2 (one shared 2 MB kv)", q, kv_small, idx_small, sink)
    blocks = base["blocks_per_cta"]
    records.append({"part": "attention_decode", "case": "summary",
                    "us_per_block_hbm": 1e3 * base["kernel_ms"] / blocks,
                    "us_per_block_l2": 1e3 * hot["kernel_ms"] / blocks})
    print(records[-1], flush=True)


def moe_one_token(records, name, key, ceilings):
    from bench.kernels_moe_gmm import D as MD, I as MI, LIMIT, TOP_K, _variants, _weights
    from dsv4jax.pallas.moe_gmm import routed_experts_pallas, routed_experts_reference

    for fp8 in (False, True):
        (w1, s1), (w3, s3), (w2, s2) = _weights(jax.random.fold_in(key, 1 + fp8), fp8)
        x = jax.random.normal(jax.random.fold_in(key, 3), (1, MD), jnp.bfloat16)
        experts = jax.random.permutation(jax.random.fold_in(key, 4), 256)[:TOP_K][None].astype(jnp.int32)
        weights = jax.random.uniform(jax.random.fold_in(key, 5), (1, TOP_K), jnp.float32)
        wbytes = 1 if fp8 else 2
        floor_ms = TOP_K * 3 * MD * MI * wbytes / ceilings["copy_tbps"] / 1e9
        label = "fp8" if fp8 else "bf16"
        if not fp8:  # the model's path (bf16 weights): the whole routed-experts function
            full = jax.jit(lambda *a: routed_experts_pallas(*a, LIMIT))
            args = (x, experts, weights, w1, w3, w2)
            got = full(*args)
            ref = jax.jit(lambda *a: routed_experts_reference(*a, LIMIT))(*args)
            dev = device_ms(full, *args)
            _record(records, {"part": "moe_one_token", "weights": label, "case": "routed_experts (kernels + glue)",
                              "rel_l2_vs_ref": rel_l2(got, ref), "device_ms": dev["total_ms"],
                              "device_kernels_ms": dev["kernels_ms"], "weight_floor_ms": floor_ms,
                              "wall_ms": 1e3 * median_seconds(full, *args, warmup=2, iters=20)}, name)
        rows = 128  # 6 rows, padded as routed_experts pads them
        xs = jnp.pad(jnp.broadcast_to(x, (TOP_K, MD)), ((0, rows - TOP_K), (0, 0)))
        gs = jnp.zeros((256,), jnp.int32).at[experts[0]].set(1)
        rw = jnp.pad(weights[0], (0, rows - TOP_K))
        h = jax.random.normal(jax.random.fold_in(key, 7), (rows, MI), jnp.bfloat16)
        # block_n 32 faults on the H100 (misaligned address, which poisons the process; `kernel.supported` refuses it)
        sweep = ((64, 64, 64, 6), (64, 64, 64, 8), (64, 64, 128, 4), (64, 128, 64, 4), (128, 64, 64, 6))
        for variant in _variants(xs, gs, rw, h, ((w1, s1), (w3, s3), (w2, s2)), TOP_K, fp8, sweep):
            rec = {"part": "moe_one_token", "weights": label, "case": "layer sweep", **variant}
            for layer, weight_elems in (("layer1", 2 * MD * MI), ("layer2", MD * MI)):
                if layer + "_s" in variant:
                    rec[layer + "_weight_tbps"] = TOP_K * weight_elems * wbytes / variant[layer + "_s"] / 1e12
            _record(records, rec, name)
        del w1, w3, w2


def mhc_formulations(records, name, key, ceilings):
    """mHC at prefill width (4096 tokens, n=4 streams of D=4096, bf16 streams): the model's functions against the
    einsums at HIGHEST precision they replaced (commit 295e50c), by device time, with their agreement."""
    from dsv4jax.model import mhc
    from dsv4jax.model.norm import inverse_rms

    S, n, D = 4096, 4, 4096
    ks = jax.random.split(key, 5)
    streams = jax.random.normal(ks[0], (1, S, n, D), jnp.bfloat16)
    fn = jax.random.normal(ks[1], ((2 + n) * n, n * D), jnp.float32) * 0.02
    weights = jax.random.uniform(ks[2], (1, S, n), jnp.float32)
    comb = jax.random.uniform(ks[3], (1, S, n, n), jnp.float32)
    output = jax.random.normal(ks[4], (1, S, D), jnp.bfloat16)
    post = weights * 2

    def mixes_highest(streams, fn):
        flat = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)
        mixes = jnp.einsum("...k,mk->...m", flat, fn, precision=jax.lax.Precision.HIGHEST)
        return mixes * inverse_rms(flat, 1e-6)

    def post_highest(output, residual, post, comb):
        mixed = jnp.einsum("...jk,...jd->...kd", comb, residual.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        return (post[..., None] * output.astype(jnp.float32)[..., None, :] + mixed).astype(residual.dtype)

    pairs = {
        "mixes": ((mixes_highest, lambda s, f: mhc.stream_mixes(s, f, 1e-6)), (streams, fn)),
        "collapse": ((lambda s, w: jnp.einsum("...n,...nd->...d", w, s.astype(jnp.float32),
                                              precision=jax.lax.Precision.HIGHEST).astype(s.dtype),
                      lambda s, w: mhc.collapse(s, w, jnp.bfloat16)), (streams, weights)),
        "post": ((post_highest, mhc.HyperConnection.post), (output, streams, post, comb)),
    }
    for label, ((old, new), args) in pairs.items():
        outs = []
        for variant, fn_ in (("einsum at HIGHEST (before)", old), ("model now", new)):
            f = jax.jit(fn_)
            outs.append(f(*args).astype(jnp.float32))
            dev = device_ms(f, *args)
            rec = {"part": "mhc", "case": f"{label}: {variant}", "device_ms": dev["total_ms"],
                   "device_kernels_ms": dev["kernels_ms"]}
            if len(outs) == 2:
                rec["rel_l2_vs_before"] = rel_l2(outs[1], outs[0])
            _record(records, rec, name)


def main():
    trace_every_kernel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=["attention", "moe", "mhc"], choices=["attention", "moe", "mhc"])
    args = parser.parse_args()
    name = f"kernel-limits-{device_slug()}"
    ceilings = measure_ceilings()
    records = [{"part": "ceilings", **ceilings}]
    key = jax.random.key(int(time.time()))
    for part, fn in (("attention", attention_decode), ("moe", moe_one_token), ("mhc", mhc_formulations)):
        if part in args.parts:
            try:
                fn(records, name, jax.random.fold_in(key, len(records)), ceilings)
            except Exception as e:  # noqa: BLE001 (the other part still runs; the error is in the results)
                traceback.print_exc()
                records.append({"part": part, "error": repr(e)[:2000]})
    print("wrote", write_results(name, {"parts": args.parts}, records))


if __name__ == "__main__":
    main()
