"""All kernel benchmarks in one call: each op's `benchmark()` (checks on the GPU, then times the Pallas kernel
against the XLA reference with both ceilings measured in the same run, by device time), gathered into
bench/results/kernels-<device>.json. Each op also writes its own file.

    python3 bench/kernels.py [sparse_attention indexer_topk moe_gmm]

Naming fewer ops (when all of them do not fit one device call) replaces those ops' records in the combined file and
keeps the others; every record carries the commit and date of the run that made it.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import RESULTS, device_slug, git_commit, trace_every_kernel, write_results  # noqa: E402

OPS = ("sparse_attention", "indexer_topk", "moe_gmm")


def main(ops=OPS) -> None:
    trace_every_kernel()  # the benchmarks time by device (profiler trace)
    name = f"kernels-{device_slug()}"
    kept = earlier_records(name, ops)
    run = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    records = []
    for op in ops:
        try:
            module = importlib.import_module(f"bench.kernels_{op}")
            records += [dict(record, op=op, **run) for record in module.benchmark()]
        except Exception as error:  # one op failing must not lose the others' figures
            traceback.print_exc()
            records.append({"op": op, "error": f"{type(error).__name__}: {str(error)[:500]}", **run})
        # after every op, so a call cut short by its time limit keeps the ops it finished
        path = write_results(name, {"ops": sorted({r["op"] for r in kept} | set(ops))}, kept + records)
    print(f"wrote {path}")


def earlier_records(name: str, ops) -> list[dict]:
    """The combined file's records of the ops not run now (none if the file is absent)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    return [dict(record, commit=record.get("commit", earlier["commit"]), date=record.get("date", earlier["date"]))
            for record in earlier["results"] if record.get("op") not in ops]


if __name__ == "__main__":
    main(sys.argv[1:] or OPS)
