"""Batch log-likelihood throughput (dsv4jax.eval.loglikelihood, the lm-eval quantity) for the `flash-slice`
config (V4-Flash widths, 4 layers, 32 experts, random weights) on one GPU. Writes bench/results/eval-<device>.json.

    python3 bench/eval.py [--lengths 256 1024] [--batch-size 8] [--pairs 32]

Tokens/s counts every real token of every (context, continuation) pair; the first pass of each length (compile)
is excluded by running the same pairs twice.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.common import device_slug, random_model, write_results  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.eval.loglik import loglikelihood  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek-v4-flash-slice.json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    config = load_config(args.config, dtype="bfloat16")
    model = random_model(config, os.path.basename(args.config))
    rng = np.random.default_rng(0)
    records = []
    for length in args.lengths:
        # Contexts fill the bucket minus a short continuation, as multiple-choice tasks look.
        pairs = [(rng.integers(3, config.vocab_size, size=length - 8).tolist(),
                  rng.integers(3, config.vocab_size, size=8).tolist()) for _ in range(args.pairs)]
        start = time.perf_counter()
        first = loglikelihood(model, pairs, batch_size=args.batch_size)
        compile_and_run_s = time.perf_counter() - start
        start = time.perf_counter()
        second = loglikelihood(model, pairs, batch_size=args.batch_size)
        run_s = time.perf_counter() - start
        assert all(abs(a.logprob - b.logprob) <= 1e-3 * max(1.0, abs(a.logprob)) for a, b in zip(first, second))
        tokens = args.pairs * length
        records.append({"length": length, "batch_size": args.batch_size, "pairs": args.pairs, "tokens": tokens,
                        "seconds": run_s, "first_pass_s": compile_and_run_s, "tokens_per_s": tokens / run_s})
        print(records[-1], flush=True)
        write_results(f"eval-{device_slug()}", {"config": os.path.basename(args.config), **vars(args)}, records)


if __name__ == "__main__":
    main()
