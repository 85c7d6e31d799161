"""The serving engine on one GPU: output tokens/s and time per output token at batch 1, 8, 32 and 128, with and
without MTP speculation, for the `flash-slice` config (V4-Flash widths, 4 layers, 32 experts, random weights),
plus the mean acceptance length. Writes bench/results/engine-<device>.json.

    python3 bench/engine.py [--batches 1 8 32 128] [--speculative 0 1] [--overlap 1 0] [--prompt 512] [--tokens 64]

Per batch size B: B requests with random prompts are submitted together; once every one has its first token
(prefill done), the steps until all finish are timed. tokens/s = decode tokens / time; time per output token =
time / decode tokens per request. With random weights the MTP head almost never agrees with the model, so the
speculative rows show the cost of drafting and verifying, not its benefit (acceptance length ≈ 1).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.common import device_slug, random_model, write_results  # noqa: E402
from dsv4jax import compilation_cache  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.serve.engine import Engine, EngineConfig  # noqa: E402
from dsv4jax.serve.sampling import SamplingParams  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek-v4-flash-slice.json")


def run_batch(engine: Engine, batch: int, prompt: int, tokens: int, rng) -> dict:
    before = dict(engine.counters)
    sampling = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    start = time.perf_counter()
    ids = [engine.submit(rng.integers(3, vocab, size=prompt).tolist(), sampling) for _ in range(batch)]
    produced = dict.fromkeys(ids, 0)
    while any(v == 0 for v in produced.values()):
        for out in engine.step():
            produced[out.request_id] += len(out.token_ids)
    prefill_s = time.perf_counter() - start
    at_start = sum(produced.values())
    steps = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            produced[out.request_id] += len(out.token_ids)
        steps += 1
    decode_s = time.perf_counter() - start
    decoded = sum(produced.values()) - at_start
    rounds = engine.counters["speculative_rounds"] - before["speculative_rounds"]
    accepted = engine.counters["accepted_tokens"] - before["accepted_tokens"]
    return {"batch": batch, "prompt_tokens": prompt, "output_tokens": tokens, "prefill_all_s": prefill_s,
            "decode_steps": steps, "decode_s": decode_s, "decode_tokens": decoded,
            "output_tokens_per_s": decoded / decode_s, "time_per_output_token_ms": 1e3 * decode_s / (decoded / batch),
            "mean_acceptance_length": (accepted + rounds) / rounds if rounds else None}


def engine_config(batches, speculative_steps: int, prompt: int = 512, tokens: int = 64) -> EngineConfig:
    """The benchmark's engine: decode buckets `batches`, prefill of up to 8 prompts of `prompt` tokens at once."""
    rows = min(8, max(batches))
    return EngineConfig(max_running_requests=max(batches), max_model_len=prompt + tokens + 64, page_tokens=256,
                        prefill_chunk=prompt, prefill_buckets=(prompt,), max_prefill_rows=rows,
                        prefill_row_buckets=(rows,), decode_buckets=tuple(batches),
                        speculative_steps=speculative_steps, prompt_logprobs=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--speculative", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--overlap", type=int, nargs="+", default=[1, 0], choices=[0, 1],
                        help="EngineConfig.overlap values run side by side on the same engine and executables "
                        "(1: each step dispatched before the previous is read back, SERVING §D.5)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--compilation-cache", default="none", metavar="DIR",
                        help="persistent compilation cache (default: none, so compile times are first-start times)")
    args = parser.parse_args()
    compilation_cache.enable(args.compilation_cache)

    start = time.perf_counter()
    model = random_model(load_config(args.config, dtype="bfloat16"), os.path.basename(args.config))
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    records, rng = [], np.random.default_rng(0)
    name = args.name or f"engine-{device_slug()}"
    engines = {steps: Engine(model, engine_config(args.batches, steps, args.prompt, args.tokens))
               for steps in args.speculative}
    # Every engine's buckets compile at once (one warm-up thread per engine, its compiles in threads of their own):
    # compile time is CPU-bound and the host has the cores.
    start = time.perf_counter()
    threads = max(1, (os.cpu_count() or 2) // len(engines))
    with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
        warmups = {steps: pool.submit(engine.warmup, threads, functools.partial(print, f"  spec={steps}", flush=True))
                   for steps, engine in engines.items()}
        compile_times = {steps: future.result() for steps, future in warmups.items()}
    compile_s = time.perf_counter() - start
    compiled = {steps: engine.compiles for steps, engine in engines.items()}
    print(f"{sum(compiled.values())} executables compiled in {compile_s:.1f} s", flush=True)
    for steps, engine in engines.items():
        for batch in args.batches:
            for overlap in args.overlap:
                # Overlap changes only the host's order of dispatch and read-back, not the executables.
                engine.config = dataclasses.replace(engine.config, overlap=bool(overlap))
                record = {"speculative_steps": steps, "overlap": bool(overlap), "compile_s_all_engines": compile_s,
                          "compile_s_each": compile_times[steps],
                          **run_batch(engine, batch, args.prompt, args.tokens, rng)}
                records.append(record)
                print(record, flush=True)
                write_results(name, {"config": os.path.basename(args.config), **vars(args)}, records)
        assert engine.compiles == compiled[steps], "a batch compiled a shape warm-up did not"


if __name__ == "__main__":
    main()
