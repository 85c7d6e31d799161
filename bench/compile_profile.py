"""Where the GPU compile time of the serving engine goes: for each variant (kernel choice × XLA flags), a fresh
process builds the `flash-slice` model and lowers, compiles and first-runs a few engine buckets, one at a time.
Each bucket reports its trace/lower seconds, XLA compile seconds (with the backend-compile share jax.monitoring
sees), and first-call seconds (a Mosaic GPU kernel may finish compiling on first use). Variants run in parallel
processes (the machine has 16 cores; XLA compiles one module mostly on one), so each figure carries some
contention; compare variants of one run, not across runs. Writes bench/results/compile-profile-<device>.json.

`--abstract` compiles the runner's prefill and decode from abstract parameters instead (compile time only; any
config, the deep one too). `--pass-times` has XLA log the time of every HLO pass (TF_CPP_VMODULE) and adds each
bucket's slowest passes to its record: where the backend compile goes.

    python3 bench/compile_profile.py [--variants reference:autotune0 auto:default ...] [--timeout 240]
    python3 bench/compile_profile.py --abstract --pass-times --config configs/deepseek-v4-flash-deep.json \
        --variants reference:default --buckets decode:1 prefill:1x1024
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = {
    "default": "",
    "autotune0": "--xla_gpu_autotune_level=0",
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "autotune0_no_triton_gemm": "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
}
BUCKETS = ("decode:8", "prefill:1x512", "decode-mtp:8")


PASS_TIME = re.compile(r"HLO pass: (\S+) time: .*?\((\d+) us\)")
PASS_LOGGING = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "hlo_pass_pipeline=1"}


def pass_times(log_path: str, top: int = 8) -> list[dict]:
    """Per bucket, in order, from a child's log (XLA's pass timers, split at the bucket records the child prints):
    total seconds of HLO passes, and the `top` slowest passes (seconds summed over calls, and the longest call)."""
    buckets, current = [], None
    for line in open(log_path, errors="replace"):
        if line.startswith("{") and '"stage"' in line:
            if current is not None:
                buckets.append({"stage": json.loads(line)["stage"], **current})
            current = None
            continue
        match = PASS_TIME.search(line)
        if match:
            current = current or {"passes": {}}
            name, seconds = match.group(1), int(match.group(2)) / 1e6
            total, longest, calls = current["passes"].get(name, (0.0, 0.0, 0))
            current["passes"][name] = (total + seconds, max(longest, seconds), calls + 1)
    if current is not None:
        buckets.append({"stage": "unfinished", **current})
    for bucket in buckets:
        passes = bucket.pop("passes")
        bucket["hlo_passes_s"] = sum(total for total, _, _ in passes.values())
        bucket["slowest"] = [{"pass": name, "seconds": total, "longest_call_s": longest, "calls": calls}
                             for name, (total, longest, calls) in sorted(passes.items(), key=lambda kv: -kv[1][0])[:top]]
    return buckets


def abstract_child(variant: str, buckets: list[str], out: str, config_path: str, layers: int | None = None,
                   overrides: tuple[str, ...] = ()) -> None:
    """`--abstract`: the runner's prefill (rows x chunk) and decode (rows) lowered from abstract parameters and state
    (ShapeDtypeStructs) and compiled, no weights drawn: compile time alone, for configs whose weights would not fit
    several processes at once (the deep config). No first call."""
    import jax
    import jax.monitoring
    import jax.numpy as jnp
    from flax import nnx

    from dsv4jax.config import load_config
    from dsv4jax.model import DeepseekV4, init_state
    from dsv4jax.run import Runner

    events: dict[str, float] = {}
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, seconds, **_: events.__setitem__(name, events.get(name, 0.0) + seconds))
    config = load_config(config_path, dtype="bfloat16")
    # FIELD=VALUE (JSON) config changes, to see what a program's compile time depends on (e.g. hc_sinkhorn_iters=2)
    config = config.replace(**{k: json.loads(v) for k, v in (o.split("=", 1) for o in overrides)})
    if layers is not None:  # the first `layers` layers and the MTP layer: which layers' programs compile slowly
        config = config.replace(num_hidden_layers=layers, num_hash_layers=min(config.num_hash_layers, layers),
                                compress_ratios=config.compress_ratios[:layers] + config.compress_ratios[-1:])
    graphdef, params = nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0))))
    runner = Runner(graphdef, kernels=variant.partition(":")[0])
    for bucket in buckets:
        kind, _, shape = bucket.partition(":")
        rows, _, chunk = shape.partition("x")
        rows, chunk = int(rows), int(chunk or 1)
        state = jax.eval_shape(lambda: init_state(config, rows, max(chunk, 1024) + 256))
        if kind == "prefill":
            fn, args = runner.prefill, (jax.ShapeDtypeStruct((rows, chunk), jnp.int32),
                                        jax.ShapeDtypeStruct((rows,), jnp.int32))
        else:
            fn, args = runner.decode, (jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), bool))
        events.clear()
        began = time.perf_counter()
        lowered = fn.lower(params, state, *args)
        lower_s = time.perf_counter() - began
        text = lowered.as_text()
        began = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - began
        optimized = compiled.as_text() or ""
        record = {"variant": variant, "stage": bucket, "lower_s": lower_s, "compile_s": compile_s,
                  "mosaic_custom_calls": text.count("mosaic_gpu"), "hlo_chars": len(text),
                  # what XLA made of it: Triton GEMM fusions (each one a Triton compile), cuBLAS calls, fusions
                  "optimized_hlo": {key: optimized.count(pattern) for key, pattern in (
                      ("triton_gemm", '"__triton_gemm"'), ("triton_fusions", '"__triton'),
                      ("cublas", "__cublas"), ("fusions", " fusion("), ("while", " while("))},
                  "events": {k: round(v, 3) for k, v in events.items()}}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def child(variant: str, buckets: list[str], out: str, config_path: str) -> None:
    """One variant in this process; appends one JSON line per finished stage to `out`."""
    import jax
    import jax.monitoring
    import jax.numpy as jnp
    import numpy as np
    from bench.common import random_model
    from dsv4jax.config import load_config
    from dsv4jax.run import Runner
    from dsv4jax.serve.engine import Engine, EngineConfig

    events: dict[str, float] = {}

    def listen(name, seconds, **_):
        events[name] = events.get(name, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(listen)

    def emit(record):
        record = {"variant": variant, **record}
        print(json.dumps(record), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")

    config = load_config(config_path, dtype="bfloat16")
    start = time.perf_counter()
    model = random_model(config, "flash-slice")
    emit({"stage": "build_model", "seconds": time.perf_counter() - start})
    runner = Runner(model.graphdef, kernels=variant.partition(":")[0])
    engines = {}
    for bucket in buckets:
        kind, _, shape = bucket.partition(":")
        steps = 1 if kind == "decode-mtp" else 0
        if steps not in engines:
            engines[steps] = Engine(model, EngineConfig(
                max_running_requests=8, max_model_len=1024, page_tokens=256, prefill_chunk=512,
                prefill_buckets=(512,), max_prefill_rows=1, prefill_row_buckets=(1,), decode_buckets=(8,),
                speculative_steps=steps, prompt_logprobs=False), runner=runner)
        engine = engines[steps]
        rows, _, chunk = shape.partition("x")
        events.clear()
        began = time.perf_counter()
        lowered = engine.lower("decode" if kind.startswith("decode") else "prefill", int(rows),
                               int(chunk) if chunk else None)
        lower_s = time.perf_counter() - began
        text = lowered.as_text()
        began = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - began
        record = {"stage": bucket, "lower_s": lower_s, "compile_s": compile_s,
                  "mosaic_custom_calls": text.count("mosaic_gpu"), "hlo_chars": len(text),
                  "events": {k: round(v, 3) for k, v in events.items()}}
        # First call (a Mosaic GPU kernel may finish compiling when first run), then a second for comparison.
        rest = jax.tree.map(lambda info: np.zeros(info.shape, info.dtype), lowered.args_info[0][2:])
        for name in ("first_call_s", "second_call_s"):
            caches = jax.tree.map(jnp.copy, engine.caches)  # the step donates its caches
            began = time.perf_counter()
            jax.block_until_ready(compiled(engine.params, caches, *rest))
            record[name] = time.perf_counter() - began
        emit(record)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+",
                        default=["reference:autotune0", "auto:autotune0", "reference:default", "auto:default"],
                        help="KERNELS:FLAGS pairs; FLAGS one of " + ", ".join(FLAGS))
    parser.add_argument("--buckets", nargs="+", default=list(BUCKETS))
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "deepseek-v4-flash-slice.json"))
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--abstract", action="store_true",
                        help="runner-level buckets (prefill:RxC, decode:R) from abstract parameters: compile only")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --abstract: only the config's first LAYERS layers (and its MTP layer)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="with --abstract: a config change (JSON value), e.g. hc_sinkhorn_iters=2; repeatable")
    parser.add_argument("--pass-times", action="store_true", help="log XLA's HLO pass timers; slowest passes per bucket")
    parser.add_argument("--name", default=None, help="results name (default compile-profile-<device>)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.abstract:
            abstract_child(args.child, args.buckets, args.child_out, args.config, args.layers, tuple(args.set))
        else:
            child(args.child, args.buckets, args.child_out, args.config)
        return

    os.makedirs(args.out_dir, exist_ok=True)
    lines = os.path.join(args.out_dir, "compile-profile.jsonl")
    open(lines, "w").close()
    pending, running, finished = list(args.variants), [], {}
    began = time.perf_counter()
    while pending or running:
        while pending and len(running) < args.parallel:
            variant = pending.pop(0)
            flags = variant.partition(":")[2]
            env = dict(os.environ, **(PASS_LOGGING if args.pass_times else {}),
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FLAGS[flags or 'default']}".strip(),
                       XLA_PYTHON_CLIENT_PREALLOCATE="false")
            log = open(os.path.join(args.out_dir, f"compile-{variant.replace(':', '-')}.log"), "w")
            process = subprocess.Popen([sys.executable, __file__, "--child", variant, "--child-out", lines,
                                        "--config", args.config, "--buckets", *args.buckets,
                                        *(["--abstract"] if args.abstract else []),
                                        *(["--layers", str(args.layers)] if args.layers is not None else []),
                                        *(f"--set={o}" for o in args.set)], env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((variant, process, time.perf_counter()))
        time.sleep(1)
        for item in list(running):
            variant, process, start = item
            if process.poll() is not None or time.perf_counter() - start > args.timeout:
                if process.poll() is None:
                    process.kill()
                    finished[variant] = f"killed at {args.timeout:.0f} s"
                else:
                    finished[variant] = f"exit {process.returncode} after {time.perf_counter() - start:.0f} s"
                running.remove(item)
    records = [json.loads(line) for line in open(lines)]
    if args.pass_times:
        records += [{"variant": v, "stage": "pass_times", "buckets": pass_times(
            os.path.join(args.out_dir, f"compile-{v.replace(':', '-')}.log"))} for v in args.variants]
    from bench.common import device_slug, write_results
    write_results(args.name or f"compile-profile-{device_slug()}", {"variants": args.variants, "buckets": args.buckets,
                                                       "config": os.path.basename(args.config), "flags": FLAGS, "parallel": args.parallel,
                                                       "abstract": args.abstract, "pass_times": args.pass_times, "layers": args.layers, "set": args.set,
                                                       "timeout_s": args.timeout},
                  records + [{"variant": v, "stage": "process", "status": s} for v, s in finished.items()])
    print(f"\n{'variant':28s} {'stage':16s} {'lower s':>8s} {'compile s':>10s} {'backend s':>10s} mosaic {'1st call':>8s} {'2nd call':>8s}")
    for r in records:
        if "compile_s" in r:
            backend = r["events"].get("/jax/core/compile/backend_compile_duration", float("nan"))
            print(f"{r['variant']:28s} {r['stage']:16s} {r['lower_s']:8.1f} {r['compile_s']:10.1f} {backend:10.1f} "
                  f"{r['mosaic_custom_calls']:6d} {r.get('first_call_s', float('nan')):8.2f} "
                  f"{r.get('second_call_s', float('nan')):8.3f}")
        elif r["stage"] == "pass_times":
            for bucket in r["buckets"]:
                slowest = ", ".join(f"{p['pass']} {p['seconds']:.1f} s" for p in bucket["slowest"][:3])
                print(f"{r['variant']:28s} {bucket['stage']:16s} HLO passes {bucket['hlo_passes_s']:.1f} s: {slowest}")
        else:
            print(f"{r['variant']:28s} {r['stage']:16s} {r.get('seconds', 0):8.1f}")
    for v, s in finished.items():
        print(f"{v:28s} {s}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
