"""Serving benchmark over HTTP on 127.0.0.1: output throughput, time to first token (TTFT) and time per output token
(TPOT) of `python -m dsv4jax.serve` at concurrency 1, 8 and 32. Writes bench/results/serving-<device>.json.

Each level runs a closed loop: `concurrency` clients, each sending its next streaming completion as soon as the
last one ends, with token-id prompts of exactly `--input-len` tokens and `--output-len` generated tokens
(`ignore_eos`). TTFT is request start to the first generated token; TPOT is (latency − TTFT) / (tokens − 1).

    python3 bench/serving.py                                   # starts the server on the default model
    python3 bench/serving.py --model DIR --server-args "--max-running-requests 32 --speculative-steps 1"
    python3 bench/serving.py --url http://127.0.0.1:8000       # a server already running

`--scenario prefix` (prefix caching, SERVING §D.8), per concurrency level: TTFT of prompts that each start
with a fresh `--system-len`-token system prompt (uncached), then of prompts sharing one cached system prompt, then
`--turns` turns of a multi-turn chat per client (system + earlier turns + a new user message; stand-in replies).
`--scenario capacity` (pages on demand, SERVING §D.7): for each of `--capacity-variants` a server with that
`--page-allocation` and `--server-args` (give it a fixed `--num-pages`) gets `--capacity-requests` requests of
`--input-len` tokens at once; the most requests it runs at once is read from /server_info while they run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx2  # noqa: E402

from bench.common import RESULTS, git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, extra: list[str], timeout: float) -> tuple[subprocess.Popen, str, float]:
    """Starts the server and waits until /health answers; returns the process, its URL and the seconds that took
    (loading plus warm-up compilation, which the compilation cache shortens on a second start)."""
    port = _free_port()
    began = time.perf_counter()
    command = [sys.executable, "-m", "dsv4jax.serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    if model:
        command += ["--model", model]
    print("starting:", shlex.join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(command, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it was healthy")
        try:
            if httpx2.get(base + "/health", timeout=2).status_code == 200:
                return process, base, time.perf_counter() - began
        except httpx2.TransportError:
            pass
        time.sleep(1)
    process.terminate()
    raise SystemExit(f"the server was not healthy after {timeout:.0f} s")


async def one_request(http: httpx2.AsyncClient, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    start = time.perf_counter()
    first, tokens, cached = None, 0, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code} {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            usage = json.loads(line[6:]).get("usage") or {}
            count = usage.get("completion_tokens", 0)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
            if count and first is None:
                first = time.perf_counter()
            tokens = max(tokens, count)
    end = time.perf_counter()
    if first is None:
        return {"error": "no token arrived"}
    return {"ttft": first - start, "latency": end - start, "tokens": tokens, "cached_tokens": cached,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def summarise(values) -> dict | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))], "max": values[-1]}


async def run_prefix_level(base: str, model: str, concurrency: int, system_len: int, user_len: int, turns: int,
                           output_len: int, vocab: int, seed: int) -> dict:
    """Uncached (a fresh system prompt each), cached (one shared system prompt, cached first) and multi-turn TTFT."""
    rng = random.Random(seed)

    def tokens(n):
        return [rng.randrange(3, vocab) for _ in range(n)]

    limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx2.AsyncClient(base_url=base, timeout=3600, limits=limits) as http:
        async def batch(prompts):
            return await asyncio.gather(*(one_request(http, model, p, output_len) for p in prompts))

        uncached = await batch([tokens(system_len + user_len) for _ in range(concurrency)])
        system = tokens(system_len)
        await one_request(http, model, system + tokens(user_len), output_len)  # caches the system prompt
        cached = await batch([system + tokens(user_len) for _ in range(concurrency)])
        histories = [list(system) for _ in range(concurrency)]
        by_turn = []
        for _ in range(turns):
            prompts = [h + tokens(user_len) for h in histories]
            by_turn.append(await batch(prompts))
            histories = [p + tokens(output_len) for p in prompts]  # the reply, as the next turn's history

    def phase(results):
        done = [r for r in results if "error" not in r]
        return {"completed": len(done), "errors": [r["error"] for r in results if "error" in r][:3],
                "ttft_s": summarise(r["ttft"] for r in done),
                "cached_tokens": summarise(r["cached_tokens"] for r in done)}

    record = {"concurrency": concurrency, "system_len": system_len, "user_len": user_len,
              "uncached": phase(uncached), "cached": phase(cached), "turns": [phase(t) for t in by_turn]}
    if record["uncached"]["ttft_s"] and record["cached"]["ttft_s"]:
        record["cached_over_uncached_ttft_median"] = (record["cached"]["ttft_s"]["median"]
                                                      / record["uncached"]["ttft_s"]["median"])
    return record


async def run_capacity(base: str, model: str, requests: int, input_len: int, output_len: int, vocab: int,
                       seed: int) -> dict:
    """`requests` requests at once; the most the engine runs at once, polled from /server_info."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(requests)]
    most, pages_used = 0, 0
    limits = httpx2.Limits(max_connections=requests + 4, max_keepalive_connections=requests + 4)
    async with httpx2.AsyncClient(base_url=base, timeout=3600, limits=limits) as http:
        tasks = [asyncio.create_task(one_request(http, model, p, output_len)) for p in prompts]
        while not all(t.done() for t in tasks):
            stats = (await http.get("/server_info")).json().get("stats") or {}
            most, pages_used = max(most, stats.get("running", 0)), max(pages_used, stats.get("pages_used", 0))
            await asyncio.sleep(0.05)
        results = [t.result() for t in tasks]
        after = (await http.get("/server_info")).json().get("stats") or {}
    return {"requests": requests, "input_len": input_len, "output_len": output_len, "most_running": most,
            "most_pages_used": pages_used, "pages_total": after.get("pages_total"),
            "preempted": after.get("preempted"), "completed": sum("error" not in r for r in results),
            "errors": [r["error"] for r in results if "error" in r][:3]}


async def run_level(base: str, model: str, concurrency: int, num_requests: int, input_len: int, output_len: int,
                    vocab: int, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(num_requests)]
    queue = list(range(num_requests))
    results = []
    limits = httpx2.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx2.AsyncClient(base_url=base, timeout=3600, limits=limits) as http:
        async def client():
            while queue:
                index = queue.pop()
                results.append(await one_request(http, model, prompts[index], output_len))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]

    def summary(key):
        values = sorted(r[key] for r in done if r.get(key) is not None)
        if not values:
            return None
        return {"mean": statistics.fmean(values), "median": statistics.median(values),
                "p90": values[min(len(values) - 1, int(0.9 * len(values)))], "max": values[-1]}

    output_tokens = sum(r["tokens"] for r in done)
    return {"concurrency": concurrency, "requests": num_requests, "completed": len(done), "errors": errors[:5],
            "wall_s": wall, "output_tokens": output_tokens, "output_tokens_per_s": output_tokens / wall,
            "total_tokens_per_s": (output_tokens + input_len * len(done)) / wall,
            "requests_per_s": len(done) / wall, "ttft_s": summary("ttft"), "tpot_s": summary("tpot"),
            "latency_s": summary("latency")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; default: start one")
    parser.add_argument("--model", default=None, help="checkpoint directory for the started server")
    parser.add_argument("--server-args", default="", help="more arguments for `python -m dsv4jax.serve`")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests per level = this × concurrency")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=1800)
    parser.add_argument("--name", default=None, help="result name (default serving-<device>)")
    parser.add_argument("--scenario", choices=["throughput", "prefix", "capacity"], default="throughput")
    parser.add_argument("--system-len", type=int, default=2048, help="prefix: tokens of the system prompt")
    parser.add_argument("--user-len", type=int, default=64, help="prefix: tokens of each user message")
    parser.add_argument("--turns", type=int, default=4, help="prefix: turns of the multi-turn chat")
    parser.add_argument("--capacity-variants", default="reserve,on_demand", help="capacity: --page-allocation values")
    parser.add_argument("--capacity-requests", type=int, default=64)
    args = parser.parse_args(argv)
    if args.scenario == "capacity":
        return capacity(args)

    levels = [int(c) for c in args.concurrency.split(",")]
    process, startup_s = None, None
    if args.url:
        base = args.url.rstrip("/")
    else:
        extra = shlex.split(args.server_args)
        if "--max-running-requests" not in extra:
            extra += ["--max-running-requests", str(max(levels))]
        if "--max-model-len" not in extra:
            extra += ["--max-model-len", str(max_model_len(args))]
        process, base, startup_s = start_server(args.model, extra, args.startup_timeout)
        print(f"server healthy after {startup_s:.1f} s", flush=True)
    try:
        info = httpx2.get(base + "/server_info", timeout=30).json()
        vocab = int(info["vocab_size"])
        model = info["model"]
        asyncio.run(run_level(base, model, 1, 1, args.input_len, args.output_len, vocab, args.seed))  # warm
        records = []
        for concurrency in levels:
            if args.scenario == "prefix":
                record = asyncio.run(run_prefix_level(base, model, concurrency, args.system_len, args.user_len,
                                                      args.turns, args.output_len, vocab, args.seed + concurrency))
                records.append(record)
                print(f"concurrency {concurrency:3d}: TTFT median uncached "
                      f"{record['uncached']['ttft_s']['median'] * 1e3:.1f} ms, cached "
                      f"{record['cached']['ttft_s']['median'] * 1e3:.1f} ms "
                      f"({record.get('cached_over_uncached_ttft_median', float('nan')):.2f}x); by turn "
                      + ", ".join(f"{t['ttft_s']['median'] * 1e3:.1f}" for t in record["turns"] if t["ttft_s"]),
                      flush=True)
                continue
            count = max(args.min_requests, args.requests_per_client * concurrency)
            record = asyncio.run(run_level(base, model, concurrency, count, args.input_len, args.output_len, vocab,
                                           args.seed + concurrency))
            records.append(record)
            ttft, tpot = record["ttft_s"] or {}, record["tpot_s"] or {}
            print(f"concurrency {concurrency:3d}: {record['output_tokens_per_s']:9.1f} out tok/s  "
                  f"TTFT median {ttft.get('median', float('nan')) * 1e3:8.1f} ms  "
                  f"TPOT median {tpot.get('median', float('nan')) * 1e3:7.2f} ms  "
                  f"({record['completed']}/{record['requests']} ok)", flush=True)
        after = httpx2.get(base + "/server_info", timeout=30).json()
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)

    device = info["device"]
    name = args.name or "serving-" + ("prefix-" if args.scenario == "prefix" else "") + device_slug_of(device)
    payload = {"name": name, "device": device, "device_count": info.get("device_count"), "jax": info["jax"],
               "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "config": {"model": model, "input_len": args.input_len, "output_len": args.output_len,
                          "concurrency": levels, "requests_per_client": args.requests_per_client,
                          "scenario": args.scenario, "system_len": args.system_len, "user_len": args.user_len,
                          "turns": args.turns,
                          "server_args": args.server_args, "engine_config": info.get("engine_config"),
                          "max_model_len": info.get("max_model_len")},
               "server_startup_s": startup_s, "results": records,
               "server_stats_after": after.get("stats"),
               "avg_spec_accept_length": after.get("avg_spec_accept_length")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def device_slug_of(device: str) -> str:
    return device.lower().replace("nvidia ", "").replace(" ", "-")


def max_model_len(args) -> int:
    if args.scenario == "prefix":
        return args.system_len + (args.turns + 1) * (args.user_len + args.output_len) + 64
    return args.input_len + args.output_len + 64


def capacity(args) -> int:
    """One server per page-allocation variant, the same requests and cache budget (`--server-args`)."""
    records, info = [], None
    for variant in args.capacity_variants.split(","):
        extra = shlex.split(args.server_args) + ["--page-allocation", variant]
        if "--max-running-requests" not in extra:
            extra += ["--max-running-requests", str(args.capacity_requests)]
        if "--max-model-len" not in extra:
            extra += ["--max-model-len", str(max_model_len(args))]
        process, base, startup_s = start_server(args.model, extra, args.startup_timeout)
        try:
            info = httpx2.get(base + "/server_info", timeout=30).json()
            record = asyncio.run(run_capacity(base, info["model"], args.capacity_requests, args.input_len,
                                              args.output_len, int(info["vocab_size"]), args.seed))
        finally:
            process.terminate()
            process.wait(60)
        records.append({"page_allocation": variant, "server_startup_s": startup_s, **record})
        print(f"{variant}: at most {record['most_running']} of {record['requests']} requests running at once "
              f"({record['most_pages_used']}/{record['pages_total']} pages, {record['preempted']} preemptions, "
              f"{record['completed']} completed)", flush=True)
    name = args.name or "serving-capacity-" + device_slug_of(info["device"])
    payload = {"name": name, "device": info["device"], "jax": info["jax"], "commit": git_commit(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "config": {"model": info["model"], "input_len": args.input_len, "output_len": args.output_len,
                          "server_args": args.server_args, "variants": args.capacity_variants},
               "results": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
