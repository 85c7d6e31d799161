"""Batch invariance of the serving engine, and what the deterministic mode costs (SERVING §D.6).

    python3 bench/batch_invariance.py [--model DIR] [--dtypes bfloat16 float32] [--speculative 0 1]

For each dtype × speculative steps × mode ("buckets": the default shape buckets; "deterministic": one shape per
step kind): one greedy request alone, then the same request beside companions (one longer than the prefill
chunk, one short, one medium, so the batch shapes differ); the largest |Δ logprob| of its tokens and whether its
tokens are equal. Then the time per output token at batch 1 and at the full batch (bench/engine.py's timing:
decode steps only, once every request has its first token). Writes bench/results/batch-invariance-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import dsv4jax  # noqa: E402
from bench.common import device_slug, write_results  # noqa: E402
from bench.engine import run_batch  # noqa: E402
from dsv4jax.serve.engine import Engine, EngineConfig  # noqa: E402
from dsv4jax.serve.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the repository's model)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--speculative", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--running", type=int, default=8, help="max_running_requests (the full batch)")
    parser.add_argument("--prefill-chunk", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    name = args.name or f"batch-invariance-{device_slug()}"
    rng = np.random.default_rng(0)
    records = []
    for dtype in args.dtypes:
        model = dsv4jax.load(args.model, dtype=dtype)
        vocab = model.config.vocab_size
        target = rng.integers(3, vocab, size=40).tolist()
        companions = [rng.integers(3, vocab, size=n).tolist() for n in (args.prefill_chunk + 44, 7, 120)]
        greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=0)
        for steps in args.speculative:
            for mode in ("buckets", "deterministic"):
                config = EngineConfig(max_running_requests=args.running, max_model_len=1024,
                                      prefill_chunk=args.prefill_chunk, max_prefill_rows=4,
                                      speculative_steps=steps, deterministic=mode == "deterministic")
                engine = Engine(model, config)
                began = time.perf_counter()
                engine.warmup()
                compile_s = time.perf_counter() - began
                alone = engine.generate([target], greedy)[0]
                beside = engine.generate([companions[0], target, *companions[1:]], greedy)[1]
                difference = float(np.max(np.abs(np.subtract(alone.logprobs, beside.logprobs))))
                timing = {f"batch_{b}": run_batch(engine, b, 100, args.tokens, rng) for b in (1, args.running)}
                record = {"dtype": dtype, "speculative_steps": steps, "mode": mode, "buckets": engine.compiles,
                          "compile_s": compile_s, "max_abs_logprob_difference": difference,
                          "tokens_equal": alone.token_ids == beside.token_ids,
                          **{f"time_per_output_token_ms_{k}": v["time_per_output_token_ms"]
                             for k, v in timing.items()}}
                records.append(record)
                print(record, flush=True)
                write_results(name, vars(args), records)


if __name__ == "__main__":
    main()
