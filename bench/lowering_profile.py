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

from bench.common import RESULTS, random_model  # noqa: E402
from bench.engine import CONFIG, engine_config  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.serve.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", nargs="+", default=["decode:32", "decode:128", "prefill:8x512"])
    parser.add_argument("--tag", default="now", help="suffix of the profile files")
    args = parser.parse_args()
    start = time.perf_counter()
    model = random_model(load_config(CONFIG, dtype="bfloat16"), "flash-slice")
    print(f"model built in {time.perf_counter() - start:.1f} s", flush=True)
    buckets = []
    for spec in args.buckets:
        kind, size = spec.split(":")
        rows, _, chunk = size.partition("x")
        buckets.append((kind, int(rows), int(chunk) if chunk else None))
    engine = Engine(model, engine_config([rows for kind, rows, _ in buckets if kind == "decode"], 0))
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
