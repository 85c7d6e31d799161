"""Where the device time of one forward goes: a profiled prefill of the `flash-slice` config, its kernels grouped by
the model's named scopes (layer, then attention / compressor / indexer / sparse_attention / moe / mhc / logits).

    python3 bench/profile_forward.py [--length 4096] [--implementation auto] [--config configs/...json]

Writes bench/results/profile-forward-<device>-<implementation>-<length>.json: total kernel time per run, time per
component (summed over layers) and per layer, and the longest kernels. Kernel events come from `jax.profiler`
(no extra tools); each is named by its HLO instruction, whose `op_name` metadata carries the scopes.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.common import device_slug, kernel_events, trace_every_kernel, write_results  # noqa: E402
from bench.model_forward import CONFIG, build_model, jitted  # noqa: E402
from dsv4jax.model import init_state  # noqa: E402

# The scope names the model sets (dsv4jax/model/*.py) and the kernel entry points' named calls.
COMPONENTS = ("sparse_attention", "indexer_topk", "indexer", "compressor", "output", "attention", "routed_experts",
              "shared_expert", "gate", "moe", "mhc", "logits")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jax name stack). A fusion without metadata of its own
    takes that of its fused computation (the root's, else the first instruction's that has one)."""
    names, calls, computation_names = {}, {}, {}
    computation, root, first = None, None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation starts
            computation, root, first = line.split()[0].lstrip("%"), None, None
            if computation == "ENTRY":
                computation = line.split()[1].lstrip("%")
            continue
        if line.startswith("}") and computation:
            computation_names[computation] = root or first
            computation = None
            continue
        match = re.match(r'\s*(ROOT\s+)?%?([\w.\-]+) = ', line)
        if not match:
            continue
        op_name = re.search(r'op_name="([^"]+)"', line)
        if op_name:
            names[match.group(2)] = op_name.group(1)
            first = first or op_name.group(1)
            if match.group(1):
                root = op_name.group(1)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        if called:
            calls[match.group(2)] = called.group(1)
    for instruction, called in calls.items():
        if instruction not in names and computation_names.get(called):
            names[instruction] = computation_names[called]
    return names


def classify(op_name: str) -> tuple[str, str]:
    """(layer, component) of an op from its name stack, e.g. 'jit(call)/group1/layer2/attention/indexer/...'. The
    layers of a scanned group share one program: their ops are attributed to the group and unit position
    ('group2/position1', ARCHITECTURE §3.1)."""
    parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
    layer = next((p for p in parts if re.fullmatch(r"layer\d+", p)), None)
    if layer is None:
        group = next((p for p in parts if re.fullmatch(r"group\d+", p)), None)
        position = next((p for p in parts if re.fullmatch(r"position\d+", p)), None)
        layer = "/".join(p for p in (group, position) if p) or "-"
    component = next((c for c in COMPONENTS if c in parts), "other")
    return layer, component


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--implementation", default="auto", choices=["auto", "reference", "pallas"])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    trace_every_kernel()  # before the backend starts, below

    config, graphdef, params, count, _ = build_model(args.config)
    ids = jax.random.randint(jax.random.key(0), (1, args.length), 0, config.vocab_size)
    num_new = jnp.array([args.length], jnp.int32)
    state = init_state(config, 1, args.length + 64)
    prefill = jitted(lambda r, p, s, i, n: r.prefill_fn(p, s, i, n), graphdef, args.implementation)
    compiled = prefill.lower(params, state, ids, num_new).compile()
    names = op_names(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(params, state, ids, num_new))
    trace_dir = tempfile.mkdtemp(prefix="profile-forward-")
    wall = []
    with jax.profiler.trace(trace_dir):
        for _ in range(args.runs):
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, state, ids, num_new))
            wall.append(time.perf_counter() - start)

    by_component, by_layer, by_kernel = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0.0
    for kernel, hlo_op, ns in kernel_events(trace_dir):
        # events without an HLO op (copies, runtime work) count as "unattributed"
        layer, component = classify(names.get(hlo_op, "")) if hlo_op else ("-", "unattributed")
        ms = ns / 1e6 / args.runs
        total += ms
        by_component[component] += ms
        by_layer[layer] += ms
        by_kernel[(hlo_op, layer, component)] += ms
    rows = [{"component": c, "ms": ms, "share": ms / total} for c, ms in by_component.most_common()]
    wall_ms = sorted(wall)[len(wall) // 2] * 1e3
    print(f"prefill {args.length} tokens, {args.implementation}: {total:.2f} ms of device events per run, "
          f"{wall_ms:.2f} ms wall (median, under the profiler)")
    for row in rows:
        print(f"  {row['component']:18s} {row['ms']:9.2f} ms  {100 * row['share']:5.1f}%")
    top = [{"hlo_op": op, "layer": layer, "component": c, "ms": ms} for (op, layer, c), ms in by_kernel.most_common(25)]
    for row in top[:12]:
        print(f"  {row['ms']:8.3f} ms  {row['layer']:7s} {row['component']:16s} {row['hlo_op']}")
    name = os.path.splitext(os.path.basename(args.config))[0]
    path = write_results(f"profile-forward-{device_slug()}-{args.implementation}-{args.length}",
                         {"config": name, "tokens": args.length, "implementation": args.implementation,
                          "parameters": count, "runs": args.runs},
                         rows, {"kernel_ms_per_run": total, "wall_ms_per_run": wall_ms,
                                "by_layer": dict(by_layer.most_common()),
                                "top_kernels": top})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
