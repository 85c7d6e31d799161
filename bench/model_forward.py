"""End-to-end forward of the `flash-slice` config (V4-Flash widths, 4 layers, 32 experts; configs/deepseek-v4-flash-slice.json) on one GPU:
prefill time at 1k and 4k tokens (last-token logits, as served; and with fp32 logits at every position, as
evaluated) and decode time per token at batch 1, with the kernels that "auto" dispatch picks
(the Pallas kernels verified on the GPU) and with the pure-JAX reference path, and the agreement of their logits
(bf16), each also against the reference run in fp32 on the same (upcast) weights. Writes
bench/results/model-forward-<device>.json.

    python3 bench/model_forward.py [--lengths 1024 4096] [--decode-steps 32] [--implementations auto reference]
                                   [--fp32-truth 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import device_slug, median_seconds, random_model, rel_l2, write_results  # noqa: E402
from dsv4jax.run import Runner  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model import DeepseekV4, init_state  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek-v4-flash-slice.json")


def build_model(path: str, seed: int = 0):
    config = load_config(path, dtype="bfloat16")
    start = time.perf_counter()
    model = random_model(config, os.path.basename(path), seed)
    graphdef, params = model.graphdef, model.params
    count = sum(x.size for x in jax.tree.leaves(params))
    return config, graphdef, params, count, time.perf_counter() - start


def jitted(fn, graphdef, implementation):
    """A separately traced copy of `fn(runner, *args)` whose kernels follow `implementation` ("auto", "pallas" or
    "reference")."""
    runner = Runner(graphdef, kernels=implementation)
    return jax.jit(lambda *args: fn(runner, *args))


def decode_step_times(decode, params, state, logits, active, steps: int, warmup: int = 4):
    """Greedy decode steps after `logits`: median / min ms per step synchronised after each step, and ms per step
    of `steps` dispatched back to back (one synchronisation). Returns (timings, state)."""
    def step(logits, state):
        return decode(params, state, jnp.argmax(logits, -1).astype(jnp.int32), active)

    for _ in range(warmup):
        logits, _, state = step(logits, state)
    jax.block_until_ready(logits)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, _, state = step(logits, state)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        logits, _, state = step(logits, state)
    jax.block_until_ready(logits)
    pipelined = (time.perf_counter() - start) / steps
    times.sort()
    return {"median_step_ms": times[len(times) // 2] * 1e3, "min_step_ms": times[0] * 1e3,
            "pipelined_step_ms": pipelined * 1e3}, state


def fp32_reference_logits(config_path, params, ids, num_new, cache_length):
    """The reference path in fp32 with the bf16 model's weights upcast: what both bf16 paths should approach."""
    config = load_config(config_path, dtype="float32")
    graphdef = nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0))))[0]
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    state = init_state(config, 1, cache_length)
    forward = jitted(lambda r, p, s, i, n: r.forward_fn(p, s, i, n)[0], graphdef, "reference")
    logits = np.asarray(forward(params32, state, ids, num_new), np.float32)
    del params32, state
    return logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--implementations", nargs="+", default=["auto", "reference"])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--fp32-truth", type=int, default=4096,
                        help="up to this prompt length, also run the reference in fp32 (the same weights, upcast) and "
                             "compare both bf16 paths with it (0: off)")
    args = parser.parse_args()

    config, graphdef, params, count, build_s = build_model(args.config)
    print(f"flash-slice: {count / 1e9:.2f} B parameters, built in {build_s:.1f} s", flush=True)
    implementations = args.implementations
    records = []
    name = os.path.splitext(os.path.basename(args.config))[0]

    def save():  # after every phase, so a run cut short by its time limit keeps what it measured
        return write_results(f"model-forward-{device_slug()}", {"config": name, "dtype": "bfloat16",
                                                                "parameters": count}, records)
    for length in args.lengths:
        ids = jax.random.randint(jax.random.key(length), (1, length), 0, config.vocab_size)
        num_new = jnp.array([length], jnp.int32)
        state = init_state(config, 1, length + args.decode_steps + 64)
        logits = {}
        for implementation in implementations:
            # "prefill": the serving path, logits of the last token only; "forward": fp32 logits at every position
            # (what the agreement check compares, and what batch log-likelihood evaluation computes).
            forward = jitted(lambda r, p, s, i, n: r.forward_fn(p, s, i, n)[0], graphdef, implementation)
            prefill = jitted(lambda r, p, s, i, n: r.prefill_fn(p, s, i, n)[0], graphdef, implementation)
            try:
                logits[implementation] = np.asarray(forward(params, state, ids, num_new), np.float32)
                timings = {"forward": median_seconds(forward, params, state, ids, num_new, warmup=1, iters=5)}
                timings["prefill"] = median_seconds(prefill, params, state, ids, num_new, warmup=1, iters=5)
            except Exception as error:  # e.g. the reference running out of memory
                records.append({"phase": "prefill", "tokens": length, "implementation": implementation,
                                "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(f"prefill {length} {implementation}: {type(error).__name__}", flush=True)
                continue
            for phase, seconds in timings.items():
                records.append({"phase": phase, "tokens": length, "implementation": implementation,
                                "seconds": seconds, "tokens_per_s": length / seconds})
                print(f"{phase:8s} {length:6d} {implementation:9s} {seconds * 1e3:9.1f} ms  {length / seconds:9.0f} "
                      f"tok/s", flush=True)
            save()
        if length <= args.fp32_truth and logits:
            truth = fp32_reference_logits(args.config, params, ids, num_new, length + args.decode_steps + 64)
            for implementation, value in logits.items():
                record = {"phase": "prefill-vs-fp32", "tokens": length, "implementation": implementation,
                          "logits_rel_l2": rel_l2(value, truth),
                          "argmax_agreement": float(np.mean(value.argmax(-1) == truth.argmax(-1)))}
                records.append(record)
                print(f"prefill {length}: {implementation} (bf16) vs fp32 reference logits rel-L2 "
                      f"{record['logits_rel_l2']:.3e}, argmax agreement {record['argmax_agreement']:.3f}", flush=True)
            del truth
        if {"auto", "reference"} <= logits.keys():
            agreement = {"phase": "prefill-agreement", "tokens": length,
                         "logits_rel_l2": rel_l2(logits["auto"], logits["reference"]),
                         "argmax_agreement": float(np.mean(logits["auto"].argmax(-1) ==
                                                           logits["reference"].argmax(-1)))}
            records.append(agreement)
            print(f"prefill {length}: kernels (auto) vs reference logits rel-L2 {agreement['logits_rel_l2']:.3e}, "
                  f"argmax agreement {agreement['argmax_agreement']:.3f}", flush=True)
        save()

    # Decode at batch 1 after a 1k prompt: time per output token.
    prompt = 1024
    ids = jax.random.randint(jax.random.key(7), (1, prompt), 0, config.vocab_size)
    for implementation in implementations:
        prefill = jitted(lambda r, p, s, i, n: r.prefill_fn(p, s, i, n), graphdef, implementation)
        decode = jitted(lambda r, p, s, t, a: r.decode_fn(p, s, t, a), graphdef, implementation)
        state = init_state(config, 1, prompt + 2 * args.decode_steps + 64 + 8)
        logits, _, state = prefill(params, state, ids, jnp.array([prompt], jnp.int32))
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        active = jnp.ones((1,), bool)
        logits, _, state = decode(params, state, token, active)  # compile
        jax.block_until_ready(logits)
        timing, _ = decode_step_times(decode, params, state, logits, active, args.decode_steps)
        records.append({"phase": "decode", "batch": 1, "context": prompt, "implementation": implementation,
                        "seconds_per_token": timing["median_step_ms"] / 1e3, **timing})
        print(f"decode batch 1 ctx {prompt} {implementation:9s} {timing['median_step_ms']:8.2f} ms/token "
              f"(pipelined {timing['pipelined_step_ms']:.2f})", flush=True)
        save()
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
