"""All kernel benchmarks in one call: each op's `benchmark()` (checks on the GPU, then times the Pallas kernel
against the XLA reference with both ceilings measured in the same run, by device time), gathered into
bench/results/kernels-<device>.json. Each op also writes its own file.

    python3 bench/kernels.py [sparse_attention indexer_topk moe_gmm]
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_slug, trace_every_kernel, write_results  # noqa: E402

OPS = ("sparse_attention", "indexer_topk", "moe_gmm")


def main(ops=OPS) -> None:
    trace_every_kernel()  # the benchmarks time by device (profiler trace)
    records = []
    for op in ops:
        try:
            module = importlib.import_module(f"bench.kernels_{op}")
            records += [dict(record, op=op) for record in module.benchmark()]
        except Exception as error:  # one op failing must not lose the others' figures
            traceback.print_exc()
            records.append({"op": op, "error": f"{type(error).__name__}: {str(error)[:500]}"})
        # after every op, so a call cut short by its time limit keeps the ops it finished
        path = write_results(f"kernels-{device_slug()}", {"ops": list(ops)}, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:] or OPS)
