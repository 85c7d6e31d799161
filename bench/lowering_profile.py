"""Where the seconds of lowering one engine bucket go (Python side, before XLA compiles): cProfile of
`Engine.lower` for `flash-slice` buckets with "auto" kernels. Writes, per bucket, the profile's top entries to
bench/results/profiles/lowering-<kind>-<rows>-<tag>.txt and prints the lowering seconds.

    python3 bench/lowering_profile.py [--buckets decode:32 decode:128 prefill:8x512] [--tag now]

On jax 0.11.2 most of it was Mosaic GPU layout inference for the attention kernel (profiles/…-before.txt).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import RESULTS  # noqa: E402
from bench.engine import CONFIG  # noqa: E402
from dsv4jax.api import Model  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model import DeepseekV4  # noqa: E402
from dsv4jax.serve.engine import Engine, EngineConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", nargs="+", default=["decode:32", "decode:128", "prefill:8x512"])
    parser.add_argument("--tag", default="now", help="suffix of the profile files")
    args = parser.parse_args()
    config = load_config(CONFIG, dtype="bfloat16")
    start = time.perf_counter()
    model = Model(nnx.jit(lambda: DeepseekV4(config, nnx.Rngs(0)))(), name="flash-slice")
    jax.block_until_ready(model.params)
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    buckets = []
    for spec in args.buckets:
        kind, size = spec.split(":")
        rows, _, chunk = size.partition("x")
        buckets.append((kind, int(rows), int(chunk) if chunk else None))
    engine = Engine(model, EngineConfig(
        max_running_requests=max(r for k, r, _ in buckets if k == "decode"), max_model_len=640, page_tokens=256,
        prefill_chunk=512, prefill_buckets=(512,), max_prefill_rows=8, prefill_row_buckets=(8,),
        decode_buckets=tuple(r for k, r, _ in buckets if k == "decode"), speculative_steps=0, prompt_logprobs=False))
    folder = RESULTS / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    for kind, rows, chunk in buckets:
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        engine.lower(kind, rows, chunk)
        profile.disable()
        print(f"{kind} {rows}x{chunk or 1}: lowered in {time.perf_counter() - start:.1f} s", flush=True)
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
        (folder / f"lowering-{kind}-{rows}-{args.tag}.txt").write_text(text.getvalue())


if __name__ == "__main__":
    main()
