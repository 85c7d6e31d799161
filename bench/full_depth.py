"""The whole depth of V4-Flash on one GPU: `configs/deepseek-v4-flash-deep.json` (43 layers + MTP at real widths,
32 routed experts so that bf16 weights fit one H200) with scanned layer groups (ARCHITECTURE §3.1).

Phases, each saved as soon as it is measured (a run cut short by its time limit keeps what it has):
- `init`: random weights drawn leaf by leaf on the device (bench/common.py random_params) and their bytes;
- `copy`: the device's copy bandwidth (a large array copied; read + write bytes per second), the floor's unit;
- `compile`: lowering and compiling seconds of the runner's prefill and decode paths per shape bucket, cold;
- `decode`: time per output token at batch 1 and 32 after a prompt, against the weight-read floor: the bytes of
  the dense weights the step reads (all but the embedding and the MTP module) plus the routed experts it touches
  (batch 1: 6 per layer; batch 32: every expert), divided by the copy bandwidth measured here;
- `prefill`: time to first token of one prompt (8k, 32k tokens) in one chunk, and prefill tokens/s;
- `launches`: kernels launched per decode step (profiler trace);
- `compare`: the same calls of a shallower copy scanned and unscanned (`scan_layers=False`), side by side.

    python3 bench/full_depth.py [--phases init copy compile decode prefill launches compare] [--prompts 8192 32768]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import device_slug, kernel_events, random_params, write_results  # noqa: E402
from bench.model_forward import decode_step_times  # noqa: E402
from dsv4jax.checkpoint.names import path_key  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model import init_state  # noqa: E402
from dsv4jax.run import Runner  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek-v4-flash-deep.json")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def copy_bandwidth(gigabytes: float = 4.0) -> float:
    """Bytes moved (read + write) per second by a device copy of a large array."""
    x = jnp.ones((int(gigabytes * 2 ** 30) // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(10):
        start = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(times)


def weight_bytes(params, config) -> dict:
    """Bytes of the weights a decode step reads: dense (no embedding, no MTP) and one routed expert of a layer."""
    dense = expert_stacks = 0
    for path, var in nnx.to_flat_state(params):
        key, value = path_key(path), var.get_value()
        if key.startswith(("mtp.", "embed.")):
            continue
        if key.endswith(("experts.w1", "experts.w2", "experts.w3")):
            expert_stacks += value.nbytes
        else:
            dense += value.nbytes
    per_expert = expert_stacks / (config.num_hidden_layers * config.n_routed_experts)
    return {"dense": dense, "per_expert": per_expert, "experts": expert_stacks}


def timed_compile(fn, *args) -> tuple:
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_s = time.perf_counter() - start
    compiled = lowered.compile()
    return compiled, lowered_s, time.perf_counter() - start - lowered_s


def launches_per_call(fn, *args) -> int:
    trace = tempfile.mkdtemp(prefix="launches-")
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(trace):
        jax.block_until_ready(fn(*args))
    return sum(1 for _ in kernel_events(trace))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--phases", nargs="+",
                        default=["init", "copy", "compile", "decode", "prefill", "launches", "compare"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before the decode steps")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--compare-layers", type=int, default=6)
    parser.add_argument("--copy-gb", type=float, default=4.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="decode batch sizes")
    args = parser.parse_args()

    config = load_config(args.config, dtype="bfloat16")
    records: list[dict] = []
    extra: dict = {"groups": [dict(first=g.first, period=g.period, repeats=g.repeats) for g in config.layer_groups()]}
    name = os.path.splitext(os.path.basename(args.config))[0]

    def save():
        return write_results(f"full-depth-{device_slug()}", {"config": name, "dtype": "bfloat16",
                                                              "layers": config.num_hidden_layers,
                                                              "routed_experts": config.n_routed_experts}, records, extra)

    start = time.perf_counter()
    graphdef, params = random_params(config)
    sizes = weight_bytes(params, config)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    records.append({"phase": "init", "seconds": time.perf_counter() - start, "parameter_bytes": total, **{
        f"{k}_bytes": v for k, v in sizes.items()}})
    log(f"init {records[-1]['seconds']:.1f} s, {total / 1e9:.1f} GB ({sizes['dense'] / 1e9:.2f} GB dense read per step)")
    save()
    bandwidth = copy_bandwidth(args.copy_gb)
    records.append({"phase": "copy", "bytes_per_s": bandwidth})
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    save()

    runner = Runner(graphdef)
    compiled = {}
    max_len = args.context + 2 * args.decode_steps + 128

    def decode_bucket(batch):
        key = ("decode", batch)
        if key not in compiled:
            state = init_state(config, batch, max_len)
            tokens, active = jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool)
            executable, lowered_s, compile_s = timed_compile(runner.decode, params, state, tokens, active)
            compiled[key] = executable
            records.append({"phase": "compile", "call": "decode", "batch": batch, "lower_s": lowered_s,
                            "compile_s": compile_s})
            log(f"compile decode b={batch}: lower {lowered_s:.1f} s, compile {compile_s:.1f} s")
            save()
        return compiled[key]

    def prefill_bucket(batch, chunk, cache):
        key = ("prefill", batch, chunk, cache)
        if key not in compiled:
            state = init_state(config, batch, cache)
            ids, num_new = jnp.zeros((batch, chunk), jnp.int32), jnp.full((batch,), chunk, jnp.int32)
            executable, lowered_s, compile_s = timed_compile(runner.prefill, params, state, ids, num_new)
            compiled[key] = executable
            records.append({"phase": "compile", "call": "prefill", "batch": batch, "chunk": chunk, "cache": cache,
                            "lower_s": lowered_s, "compile_s": compile_s})
            log(f"compile prefill {batch}x{chunk}: lower {lowered_s:.1f} s, compile {compile_s:.1f} s")
            save()
        return compiled[key]

    if "compile" in args.phases or "decode" in args.phases:
        prefill_bucket(1, args.context, max_len)
        for batch in args.batches:
            decode_bucket(batch)

    if "decode" in args.phases:
        for batch in args.batches:
            prefill = prefill_bucket(batch, args.context, max_len)
            decode = decode_bucket(batch)
            ids = jax.random.randint(jax.random.key(batch), (batch, args.context), 0, config.vocab_size)
            logits, _, state = prefill(params, init_state(config, batch, max_len), ids,
                                       jnp.full((batch,), args.context, jnp.int32))
            active = jnp.ones((batch,), bool)
            timing, _ = decode_step_times(decode, params, state, logits, active, args.decode_steps)
            touched = min(batch * config.num_experts_per_tok, config.n_routed_experts)
            floor_bytes = sizes["dense"] + config.num_hidden_layers * touched * sizes["per_expert"]
            floor_ms = floor_bytes / bandwidth * 1e3
            records.append({"phase": "decode", "batch": batch, "context": args.context, **timing,
                            "floor_bytes": floor_bytes, "floor_ms": floor_ms,
                            "over_floor": timing["median_step_ms"] / floor_ms})
            log(f"decode b={batch}: {timing['median_step_ms']:.2f} ms/step (pipelined "
                f"{timing['pipelined_step_ms']:.2f}), floor {floor_ms:.2f} ms: {records[-1]['over_floor']:.2f}x")
            save()

    if "launches" in args.phases:
        decode = decode_bucket(1)
        state = init_state(config, 1, max_len)
        count = launches_per_call(decode, params, state, jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool))
        records.append({"phase": "launches", "call": "decode", "batch": 1, "kernels": count})
        log(f"decode b=1: {count} kernels per step")
        save()

    if "prefill" in args.phases:
        for prompt in args.prompts:
            try:
                prefill = prefill_bucket(1, prompt, prompt + 128)
                ids = jax.random.randint(jax.random.key(prompt), (1, prompt), 0, config.vocab_size)
                state = init_state(config, 1, prompt + 128)
                num_new = jnp.array([prompt], jnp.int32)
                jax.block_until_ready(prefill(params, state, ids, num_new))
                times = []
                for _ in range(3):
                    begin = time.perf_counter()
                    jax.block_until_ready(prefill(params, state, ids, num_new))
                    times.append(time.perf_counter() - begin)
                seconds = min(times)
                records.append({"phase": "prefill", "tokens": prompt, "seconds": seconds,
                                "tokens_per_s": prompt / seconds})
                log(f"prefill {prompt}: {seconds * 1e3:.0f} ms, {prompt / seconds:.0f} tok/s")
            except Exception as error:  # e.g. out of memory at the longest prompt
                records.append({"phase": "prefill", "tokens": prompt, "error": f"{type(error).__name__}: "
                                                                               f"{str(error)[:300]}"})
                log(f"prefill {prompt}: {type(error).__name__}")
            save()

    if "compare" in args.phases:
        del params, compiled
        layers = args.compare_layers
        shallow = config.replace(num_hidden_layers=layers,
                                 compress_ratios=config.compress_ratios[:layers] + config.compress_ratios[-1:])
        for scan in (True, False):
            variant = shallow.replace(scan_layers=scan)
            graphdef, params = random_params(variant)
            runner = Runner(graphdef)
            state = init_state(variant, 1, max_len)
            tokens, active = jnp.zeros((1,), jnp.int32), jnp.ones((1,), bool)
            decode, lowered_s, compile_s = timed_compile(runner.decode, params, state, tokens, active)
            logits, _, state = decode(params, state, tokens, active)
            timing, _ = decode_step_times(decode, params, state, logits, active, args.decode_steps)
            records.append({"phase": "compare", "layers": layers, "scan_layers": scan, "call": "decode", "batch": 1,
                            "lower_s": lowered_s, "compile_s": compile_s, **timing})
            log(f"{layers} layers scan={scan}: decode lower {lowered_s:.1f} s, compile {compile_s:.1f} s, "
                f"{timing['median_step_ms']:.2f} ms/step")
            save()
            del params, state, decode
    log(f"wrote {save()}")


if __name__ == "__main__":
    main()
