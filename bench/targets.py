"""The kernel targets against the measured H100 results: each target, the figure that decides it, how far
it is, and (where not met) what limits it and which measurement shows that. Reads only result files (no GPU).

    python3 bench/targets.py [--device h100-80gb-hbm3]

Writes bench/results/kernel-targets-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, write_results  # noqa: E402


def _load(name):
    return json.loads((RESULTS / f"{name}.json").read_text())


def _find(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _copy_ceiling(records) -> float:
    """The run's copy ceiling (TB/s): its "ceilings" record, or else (runs before that record existed) the bytes
    over the floor time of a memory-bound case, which is how the floor was computed from the ceiling."""
    for r in _find(records, kind="ceilings"):
        return r["copy_tbps"]
    r = next(r for r in records if r.get("bound") == "memory" and "floor_s" in r)
    return r["bytes_read"] / r["floor_s"] / 1e12


def targets(device: str) -> list[dict]:
    combined = _load(f"kernels-{device}")  # bench/kernels.py: every op, one record per case, each with its commit
    attention, indexer, moe = ({"results": _find(combined["results"], op=op),
                                "commit": ",".join(sorted({r["commit"] for r in _find(combined["results"], op=op)}))}
                               for op in ("sparse_attention", "indexer_topk", "moe_gmm"))
    rows = []

    def add(target, case, value, goal, unit, source, limit=None):
        rows.append({"target": target, "case": case, "measured": value, "goal": goal, "unit": unit,
                     "fraction_of_goal": value / goal, "met": value >= goal, "source": source,
                     **({"limit": limit} if limit and value < goal else {})})

    src = f"kernels-{device}.json ({attention['commit']})"
    per_block = ("per-block SM work: ~1.9 µs per 32-row block whether rows come from L2 or HBM (kernel-limits-"
                 f"{device}.json: decode 2.04 µs from L2, 2.34 µs from HBM, K slope 1.77 µs; prefill 16k 1.93 µs); "
                 "350 TFLOP/s needs ≤ 1.58 µs")
    for r in _find(attention["results"], kind="prefill"):
        if r["S"] >= 16384:
            add("attention prefill ≥ 350 TFLOP/s at 16k+", r["shape"], r["kernel_tflops"], 350, "TFLOP/s", src,
                per_block)
        if "speedup_vs_xla" in r:
            add("attention ≥ 5× XLA", r["shape"], r["speedup_vs_xla"], 5, "×", src, per_block)
    copy = _copy_ceiling(attention["results"])
    for r in _find(attention["results"], kind="decode"):
        if r["B"] == 128:
            add("attention decode ≥ 1.8 TB/s", r["shape"], r["kernel_tbps"], 1.8, "TB/s", src)
        needed = r["bytes_read"] / (r["reference_s"] / 5) / 1e12
        add("attention ≥ 5× XLA", r["shape"], r["speedup_vs_xla"], 5, "×", src,
            f"memory: 5× XLA needs {needed:.2f} TB/s of rows and Q, above the run's copy ceiling ({copy:.2f} TB/s), "
            "i.e. past 100% of the issue's memory roofline"
            if needed > copy else
            f"too few CTAs to fill the GPU: the kernel alone takes {r['mosaic_kernel_s'] * 1e6:.0f} µs (one chain "
            f"of blocks per CTA), XLA {r['reference_s'] * 1e6:.0f} µs in all")

    src = f"kernels-{device}.json ({indexer['commit']})"
    for r in _find(indexer["results"], kind="time"):
        if r["label"].startswith("prefill") and r["S"] >= 16384:
            add("indexer ≥ 250 TFLOP/s at 16k+", r["label"], r["scores_tflops"], 250, "TFLOP/s", src)
        if "speedup_e2e" in r:
            floor = r["e2e_s"] * r["e2e_roofline_fraction"]
            ratio = r["xla_reference_s"] / floor
            add("indexer ≥ 5× XLA (end to end)", r["label"], r["speedup_e2e"], 5, "×", src,
                f"memory: the XLA reference takes {ratio:.1f}× the end-to-end floor ({floor * 1e3:.3f} ms), so 5× "
                f"would need {5 / ratio:.0%} of the memory roofline" if ratio < 5 else
                f"launches: scores {r['scores_s'] * 1e6:.0f} µs + lax.top_k {r['topk_only_s'] * 1e6:.0f} µs "
                f"against XLA's {r['xla_reference_s'] * 1e6:.0f} µs in all")

    src = f"kernels-{device}.json ({moe['commit']})"
    for r in _find(moe["results"], kind="time", weights="bf16"):
        if "kernel_s" not in r:
            continue
        if r["bound"] == "compute":
            add("MoE bf16 ≥ 450 TFLOP/s where compute-bound", f"{r['tokens']} tokens", r["kernel_tflops"],
                450, "TFLOP/s", src)
        else:
            add("MoE bf16 ≥ 70% of the memory roofline where memory-bound", f"{r['tokens']} tokens",
                r["kernel_roofline"], 0.70, "of roofline", src,
                "bytes moved: each 128-row tile of an expert streams the expert's weights (block-size variants: "
                "`python3 -m bench.kernels_moe_gmm 8192`)")
        if "speedup" in r:
            add("MoE ≥ 5× XLA", f"{r['tokens']} tokens", r["speedup"], 5, "×", src,
                f"memory: the XLA reference takes {r['ref_s'] / r['floor_s']:.1f}× the floor, so 5× would need "
                f"{5 * r['floor_s'] / r['ref_s']:.0%} of the roofline; the kernel runs at "
                f"{r['kernel_roofline']:.0%}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="h100-80gb-hbm3")
    args = parser.parse_args()
    rows = targets(args.device)
    print("| target | case | measured | of goal | met | limit |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['case']} | {r['measured']:.3g} {r['unit']} | {r['fraction_of_goal']:.0%} | "
              f"{'yes' if r['met'] else 'no'} | {r.get('limit', '')} |")
    print("wrote", write_results(f"kernel-targets-{args.device}", {"from": "result files of the device"}, rows))


if __name__ == "__main__":
    main()
