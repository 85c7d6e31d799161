"""Time to first token of a long prefill under context parallelism (PARALLELISM §1): cp=1 and cp=2 on the
`flash-slice` config (V4-Flash widths, 4 layers, 32 experts; bf16, random weights), at 16k, 64k and 128k tokens.

The prompt is prefilled in CP-split chunks of `--chunk` tokens on top of the cached prefix (chunked prefill
under CP), which bounds the activation memory; time to first token = all chunks, up to the first token's logits.
A case that fails (e.g. out of memory) is recorded with its error. Writes
bench/results/context-parallel-<device>.json (bench/common.py).

    python3 bench/context_parallel.py [--lengths 16384 65536 131072] [--cp 1 2] [--chunk 8192]
    python3 bench/context_parallel.py --config configs/test-tiny.json --lengths 512 --chunk 256 --no-write  # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import device_slug, write_results  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model import init_state  # noqa: E402
from dsv4jax.run import Runner  # noqa: E402
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from dsv4jax.sharding.params import init_sharded  # noqa: E402
from dsv4jax.sharding.rules import state_shardings  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "deepseek-v4-flash-slice.json")


def time_to_first_token(runner, params, config, mesh, device_mesh, length: int, chunk: int, repeats: int):
    ids = np.random.default_rng(length).integers(0, config.vocab_size, (1, length)).astype(np.int32)
    chunk = min(chunk, length)
    chunk += -chunk % runner.alignment
    max_len = -(-length // chunk) * chunk
    shardings = state_shardings(jax.eval_shape(lambda: init_state(config, 1, max_len)), mesh, device_mesh)
    fresh = jax.jit(lambda: init_state(config, 1, max_len), out_shardings=shardings)

    def prefill():
        state, logits = fresh(), None
        for start in range(0, length, chunk):
            piece = ids[:, start:start + chunk]
            num_new = np.array([piece.shape[1]], np.int32)
            piece = np.pad(piece, ((0, 0), (0, chunk - piece.shape[1])))
            logits, _, state = runner.prefill(params, state, piece, num_new)
        return logits

    start = time.perf_counter()
    logits = jax.block_until_ready(prefill())  # compiles the chunk shape
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(prefill())
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, np.asarray(logits, np.float32)


def run_context_parallel(config, cps, lengths, cp_mode: str, chunk: int, repeats: int, implementation: str,
                         reference_logits: dict | None = None) -> list[dict]:
    """Time to first token for each (cp, length); logits checked against the first cp size run per length
    (or against `reference_logits` [length -> (cp, logits)], which this fills)."""
    records = []
    first_logits = {} if reference_logits is None else reference_logits
    for cp in cps:
        if cp > jax.device_count():
            records.append({"cp": cp, "skipped": f"needs {cp} devices, {jax.device_count()} present"})
            continue
        mesh = parse_mesh_spec(f"cp={cp}", cp_mode=cp_mode)
        device_mesh = make_mesh(mesh, jax.devices()[:cp])
        graphdef, params = init_sharded(config, mesh, device_mesh)
        runner = Runner(graphdef, mesh, jax.devices()[:cp], kernels=implementation)
        for length in lengths:
            record = {"cp": cp, "cp_mode": cp_mode, "tokens": length, "chunk": chunk, "implementation": implementation}
            try:
                ttft, first, logits = time_to_first_token(runner, params, config, mesh, device_mesh, length, chunk,
                                                          repeats)
                record.update(ttft_s=ttft, tokens_per_s=length / ttft, first_call_s=first)
                if length in first_logits:  # same weights (same seed), same prompt: the logits must agree
                    base_cp, base = first_logits[length]
                    record[f"logits_rel_l2_vs_cp{base_cp}"] = float(np.linalg.norm(logits - base) /
                                                                    np.linalg.norm(base))
                else:
                    first_logits[length] = (cp, logits)
            except Exception as error:  # noqa: BLE001  (recorded: e.g. out of memory at 128k)
                record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(record, flush=True)
            records.append(record)
        del params, runner
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cp-mode", default="round_robin", choices=["round_robin", "zigzag"])
    parser.add_argument("--chunk", type=int, default=8192, help="tokens per CP-split prefill chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementation", default="auto", choices=["auto", "pallas", "reference"],
                        help="kernels: auto = those verified on the GPU")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--name", default=None, help="results file name (default context-parallel-<device>)")
    parser.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()

    config = load_config(args.config, dtype=args.dtype)
    records = run_context_parallel(config, args.cp, args.lengths, args.cp_mode, args.chunk, args.repeats,
                                   args.implementation)
    if not args.no_write:
        bench_config = {"config": os.path.basename(args.config), "dtype": args.dtype, "lengths": args.lengths,
                        "chunk": args.chunk, "cp": args.cp, "cp_mode": args.cp_mode}
        print(write_results(args.name or f"context-parallel-{device_slug()}", bench_config, records))


if __name__ == "__main__":
    main()
