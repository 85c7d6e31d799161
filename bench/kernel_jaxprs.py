"""The jaxprs of the Pallas kernels' GPU path at the benchmark configurations (bench/kernels_*.py), as text.

Traces (no GPU needed) each op's kernel as a GPU run builds it: no interpreter, the default tuning, and the SM count
given explicitly (NUM_SMS, the H100/H200's), so two commits can be diffed for changes to the kernels themselves:

    python3 bench/kernel_jaxprs.py OUT_DIR       # one <op>-<case>.txt per configuration

moe_gmm: both grouped GEMMs (the fused SwiGLU one and the plain one) at bench/kernels_moe_gmm.py's token counts,
bf16 and fp8 weights, and `routed_experts_pallas` at 64 tokens; sparse_attention: the prefill and decode shapes of
bench/kernels_sparse_attention.py; indexer_topk: the scores kernel at bench/kernels_indexer_topk.py's shapes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_SMS = 132
spec = jax.ShapeDtypeStruct


def moe_cases():
    from bench.kernels_moe_gmm import D, E, I, LIMIT, TOKENS, TOP_K
    from dsv4jax.pallas.moe_gmm import kernel, routed_experts_pallas

    def cfg(m, n, k, fused, fp8):
        return dataclasses.replace(kernel.default_config(m, n, k, fused=fused, fp8=fp8), num_sms=NUM_SMS)

    for fp8 in (False, True):
        weight = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
        for t in TOKENS:
            rows = -(-t * TOP_K // 128) * 128
            x, sizes, rw = spec((rows, D), jnp.bfloat16), spec((E,), jnp.int32), spec((rows,), jnp.float32)
            w13, w2 = spec((E, I, D), weight), spec((E, D, I), weight)
            s13 = spec((E, I // 128, D // 128), jnp.float8_e8m0fnu) if fp8 else None
            s2 = spec((E, D // 128, I // 128), jnp.float8_e8m0fnu) if fp8 else None
            c1, c2 = cfg(rows, I, D, True, fp8), cfg(rows, D, I, False, fp8)
            tag = f"{'fp8' if fp8 else 'bf16'}-T{t}"
            yield (f"moe_gmm-fused-{tag}",
                   lambda x, s, r, w, sc, c1=c1: kernel.grouped_matmul_swiglu(x, w, w, s, r, LIMIT, sc, sc, cfg=c1),
                   (x, sizes, rw, w13, s13))
            yield (f"moe_gmm-plain-{tag}", lambda h, s, w, sc, c2=c2: kernel.grouped_matmul(h, w, s, sc, cfg=c2),
                   (spec((rows, I), jnp.bfloat16), sizes, w2, s2))
    t = 64
    args = (spec((t, D), jnp.bfloat16), spec((t, TOP_K), jnp.int32), spec((t, TOP_K), jnp.float32),
            spec((E, I, D), jnp.bfloat16), spec((E, I, D), jnp.bfloat16), spec((E, D, I), jnp.bfloat16))
    yield (f"moe_gmm-routed_experts-T{t}",
           lambda *a: routed_experts_pallas(*a, LIMIT, num_sms=NUM_SMS), args)


def sparse_attention_cases():
    from bench.kernels_sparse_attention import D, DECODE_SHAPES, H, PREFILL_LENGTHS, SCALE, TOPK, WINDOW
    from dsv4jax.pallas.sparse_attention.kernel import sparse_attention_kernel

    def call(*a):
        return sparse_attention_kernel(*a, scale=SCALE, num_sms=NUM_SMS)

    for s in PREFILL_LENGTHS:
        n = WINDOW + s + s // 4
        yield (f"sparse_attention-prefill-S{s}", call,
               (spec((1, s, H, D), jnp.bfloat16), spec((1, n, D), jnp.bfloat16),
                spec((1, s, WINDOW + min(TOPK, s // 4)), jnp.int32), spec((H,), jnp.float32)))
    for b, ctx in DECODE_SHAPES:
        n = WINDOW + 1 + ctx // 4
        yield (f"sparse_attention-decode-B{b}-ctx{ctx}", call,
               (spec((b, 1, H, D), jnp.bfloat16), spec((b, n, D), jnp.bfloat16),
                spec((b, 1, WINDOW + TOPK), jnp.int32), spec((H,), jnp.float32)))


def indexer_cases():
    from bench.kernels_indexer_topk import D, DECODE, H, PREFILL
    from dsv4jax.pallas.indexer_topk import indexer_scores
    from dsv4jax.pallas.indexer_topk.kernel import make_plan

    shapes = [(f"prefill-S{s}", 1, s, s // 4) for s in PREFILL] + [(f"decode-B{b}-N{n}", b, 1, n) for b, n in DECODE]
    for label, b, s, n in shapes:
        plan = make_plan(b, s, H, D, n, num_sms=NUM_SMS)
        yield (f"indexer_topk-scores-{label}", lambda *a, plan=plan: indexer_scores(*a, plan=plan),
               (spec((b, s, H, D), jnp.bfloat16), spec((b, s, H), jnp.float32), spec((b, n, D), jnp.bfloat16),
                spec((b, s), jnp.int32)))


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for cases in (moe_cases, sparse_attention_cases, indexer_cases):
        for name, fn, args in cases():
            text = str(jax.make_jaxpr(fn)(*args))
            text = re.sub(r" at 0x[0-9a-f]+", " at 0x", text)  # object addresses differ between runs
            (out / f"{name}.txt").write_text(text)
            print(f"{name}: {len(text)} chars", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kernel-jaxprs")
