"""Runs on several GPUs of one host (4 and 8 GPUs), written to bench/results/multi-gpu-<kind>.json:

1. context-parallel prefill of long prompts (`flash-slice`: V4-Flash widths, 4 layers, 32 experts, bf16, random
   weights) for each cp size and split mode: time to first token, and logits against the smallest cp that ran
   for the same prompt (cp=1 where it fits);
2. the MoE layer with V4-Flash widths (256 experts, top-6, D=4096, I=2048, bf16) expert-parallel over all GPUs
   (mesh ep=N) in the gather/reduce-scatter and the all-to-all (`ragged_all_to_all`) modes: output against the
   single-device layer, and the time of each at 1k, 8k and 32k tokens (`--moe-modes gather_all_pairs` adds the
   gather mode as it was before other devices' pairs were dropped).

    python3 bench/multi_gpu.py --kind nvidia-h200-x4 [--cp 1 2 4] [--lengths 131072] [--long 524288]
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
from jax.sharding import PartitionSpec as P  # noqa: E402

from bench.common import device_ms, median_seconds, trace_every_kernel, write_results  # noqa: E402
from bench.context_parallel import CONFIG, run_context_parallel  # noqa: E402
from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model.moe import MoE  # noqa: E402
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from dsv4jax.sharding.moe import MoECollective, _shard_index, reduce_scatter_rows  # noqa: E402
from dsv4jax.sharding.rules import param_shardings, param_specs  # noqa: E402

FLASH = os.path.join(os.path.dirname(CONFIG), "deepseek-v4-flash.json")


def _all_pairs_body(graphdef, collective):
    """The gather mode as it was before pairs of other devices' experts were dropped: local expert 0 computed them
    all with weight 0. A baseline for the same run, tokens replicated over ep (so the sum is over ep)."""
    def body(params, x, ids):
        moe = nnx.merge(graphdef, params)
        flat, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
        experts, weights = moe.gate(flat, flat_ids)
        local_count = moe.experts.w1.shape[0]
        local = experts - _shard_index(collective.expert_axes, collective.expert_sizes) * local_count
        mine = (local >= 0) & (local < local_count)
        partial = moe.experts(flat, jnp.where(mine, local, 0), jnp.where(mine, weights, 0.0))
        partial = partial + moe.shared_experts(flat).astype(jnp.float32)
        return reduce_scatter_rows(partial, collective.gather_axes, collective.reduce_axes).astype(x.dtype).reshape(
            x.shape)
    return body


def expert_parallel(path: str, token_counts, repeats: int, modes=("gather", "all_to_all"),
                    profile: bool = False) -> list[dict]:
    config = load_config(path, dtype="bfloat16")
    layer = config.num_hash_layers  # the first score-routed layer
    n = jax.device_count()
    moe = nnx.jit(lambda: MoE(config, layer, jnp.bfloat16, nnx.Rngs(0)))()
    graphdef, params = nnx.split(moe)
    single = jax.jit(lambda params, x, ids: nnx.merge(graphdef, params)(x, ids))
    records = []
    for mode in modes:
        mesh = parse_mesh_spec(f"ep={n}", moe_mode="gather" if mode == "gather_all_pairs" else mode)
        device_mesh = make_mesh(mesh)
        sharded = jax.device_put(params, param_shardings(params, mesh, device_mesh))
        collective = MoECollective.for_tokens(mesh, ())  # tokens replicated over ep (as in decode)

        def body(params, x, ids):
            return collective(nnx.merge(graphdef, params), x, ids)

        if mode == "gather_all_pairs":
            body = _all_pairs_body(graphdef, collective)

        mapped = jax.jit(jax.shard_map(body, mesh=device_mesh, in_specs=(param_specs(params, mesh), P(), P()),
                                       out_specs=P(), check_vma=False))
        for tokens in token_counts:
            key = jax.random.key(tokens)
            x = jax.random.normal(key, (1, tokens, config.hidden_size), jnp.bfloat16)
            ids = jax.random.randint(jax.random.fold_in(key, 1), (1, tokens), 0, config.vocab_size)
            record = {"part": "expert_parallel", "mesh": f"ep={n}", "mode": mode, "tokens": tokens}
            try:
                expected = np.asarray(single(params, x, ids), np.float32)
                out = np.asarray(mapped(sharded, x, ids), np.float32)
                record["rel_l2_vs_single_device"] = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
                record["seconds"] = median_seconds(mapped, sharded, x, ids, warmup=1, iters=repeats)
                record["single_device_seconds"] = median_seconds(single, params, x, ids, warmup=1, iters=repeats)
                if profile:  # where the time goes: device time per kernel name, summed over the GPUs
                    record["device_ms_all_gpus"] = device_ms(mapped, sharded, x, ids, runs=2)
            except Exception as error:  # noqa: BLE001  (recorded)
                record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            print(record, flush=True)
            records.append(record)
        del sharded
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True, help="the device tool's kind, for the results file name")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="*", default=[131072], help="none: skip the cp part")
    parser.add_argument("--long", type=int, nargs="*", default=[524288], help="prompts run without cp=1")
    parser.add_argument("--modes", nargs="+", default=["round_robin", "zigzag"])
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--moe-tokens", type=int, nargs="*", default=[1024, 8192, 32768])
    parser.add_argument("--moe-modes", nargs="+", default=["gather", "all_to_all"],
                        help="also gather_all_pairs: the gather mode before dropped pairs, as a baseline")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--moe-config", default=FLASH)
    parser.add_argument("--moe-profile", action="store_true", help="record each MoE case's kernels (device time)")
    args = parser.parse_args()
    if args.moe_profile:
        trace_every_kernel()
    config = load_config(args.config, dtype="bfloat16")
    records, reference = [], {}
    name = f"multi-gpu-{args.kind}"

    def save():
        write_results(name, {"config": os.path.basename(args.config), **vars(args)}, records)

    start = time.perf_counter()
    records += expert_parallel(args.moe_config, args.moe_tokens, args.repeats, args.moe_modes, args.moe_profile)
    save()
    def sizes(cps, mode):
        # The smallest cp is the reference: it runs once (under the first mode) unless it is the only size;
        # every later run is checked against the first for its length.
        return [c for c in cps if c > min(cps) or mode == args.modes[0] or len(cps) == 1]

    for lengths, cps in ((args.lengths, args.cp), (args.long, [c for c in args.cp if c > 1])):
        for mode in args.modes if lengths else ():
            records += run_context_parallel(config, sizes(cps, mode), lengths, mode, args.chunk, args.repeats, "auto",
                                            reference)
            save()
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
