"""Decode at batch 1 on the `flash-slice` config with each kernel family switched off in turn: which kernel
makes "auto" faster or slower than the pure-JAX reference.

    python3 bench/decode_attribution.py [--prompt 1024] [--steps 32]

Variants: auto, reference, auto without the MoE grouped GEMM, auto without the indexer kernel (the attention
kernel serves ≥ 8 queries, so batch-1 decode never uses it), and two experiments on XLA while loops, which on
a GPU cost a host round trip per iteration: auto with the MoE tile schedule's binary search as a loop again
(`searchsorted-loop`), and auto with mHC's Sinkhorn iterations as a loop again (`sinkhorn-loop`). Each is timed per
step (synchronised after every step), pipelined (32 steps, one synchronisation), and with --device-time by
device time per step (profiler trace: the kernels alone; command buffers off). Writes
bench/results/decode-attribution-<device>-<prompt>[-device-time].json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import dsv4jax.pallas.indexer_topk as indexer_package  # noqa: E402
import dsv4jax.pallas.moe_gmm as moe_package  # noqa: E402
import dsv4jax.pallas.moe_gmm.kernel as moe_kernel  # noqa: E402
from bench.common import device_ms, device_slug, trace_every_kernel, write_results  # noqa: E402
from bench.model_forward import CONFIG, build_model, decode_step_times, jitted  # noqa: E402
from dsv4jax.model import init_state, mhc  # noqa: E402


def _looped_sinkhorn(logits, iters, eps):  # the model's Sinkhorn before it was unrolled (commit 0fde963)
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def normalise(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, normalise, c)


PATCHES = {  # variant patch -> (module, attribute, replacement), set while the variant is traced
    "no-moe": (moe_package, "kernel_supported", lambda *args: False),
    "no-indexer": (indexer_package, "_use_kernel", lambda *args: False),
    "searchsorted-loop": (moe_kernel, "SEARCH_METHOD", "scan"),
    "sinkhorn-loop": (mhc, "sinkhorn", _looped_sinkhorn),
}
VARIANTS = {"auto": ("auto", None), "reference": ("reference", None), "auto-no-moe": ("auto", "no-moe"),
            "auto-no-indexer": ("auto", "no-indexer"), "auto-searchsorted-loop": ("auto", "searchsorted-loop"),
            "auto-sinkhorn-loop": ("auto", "sinkhorn-loop")}


@contextlib.contextmanager
def patched(patch: str | None):
    """Trace with one of PATCHES applied (restored afterwards)."""
    if patch is None:
        yield
        return
    module, attribute, replacement = PATCHES[patch]
    original = getattr(module, attribute)
    setattr(module, attribute, replacement)
    try:
        yield
    finally:
        setattr(module, attribute, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt length before decoding (0: empty cache)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device-time", action="store_true",
                        help="also the device time per step; turns XLA's command buffers (CUDA graphs) off for "
                             "every timing, which changes the wall times")
    args = parser.parse_args()
    if args.device_time:
        trace_every_kernel()

    config, graphdef, params, count, _ = build_model(args.config)
    records = []
    for name in args.variants:
        implementation, patch = VARIANTS[name]
        with patched(patch):
            decode = jitted(lambda r, p, s, t, a: r.decode_fn(p, s, t, a), graphdef, implementation)
            state = init_state(config, 1, args.prompt + 2 * args.steps + 64 + 8)
            if args.prompt:
                prefill = jitted(lambda r, p, s, i, n: r.prefill_fn(p, s, i, n), graphdef, implementation)
                ids = jax.random.randint(jax.random.key(7), (1, args.prompt), 0, config.vocab_size)
                _, _, state = prefill(params, state, ids, jnp.array([args.prompt], jnp.int32))
            token, active = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)
            start = time.perf_counter()
            logits, _, state = decode(params, state, token, active)
            jax.block_until_ready(logits)
            first_call = time.perf_counter() - start
        timing, state = decode_step_times(decode, params, state, logits, active, args.steps)
        record = {"variant": name, "first_call_s": first_call, "command_buffers": not args.device_time, **timing}
        if args.device_time:
            device = device_ms(decode, params, state, token, active)
            record.update(device_step_ms=device["total_ms"], device_top_kernels_ms=device["kernels_ms"])
        records.append(record)
        print(record, flush=True)
    config_name = os.path.splitext(os.path.basename(args.config))[0]
    path = write_results(f"decode-attribution-{device_slug()}-{args.prompt}" + ("-device-time" * args.device_time),
                         {"config": config_name, "batch": 1, "prompt": args.prompt, "steps": args.steps,
                          "parameters": count}, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
