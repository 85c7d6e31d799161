"""Cold start of `python -m dsv4jax.serve`: seconds from launch until /health answers and until a first greedy
completion returns, with an empty compilation cache, for each `--warmup` mode (SERVING §D.4).

    python3 bench/cold_start.py [--modes background full] [-- extra server arguments]

Writes bench/results/cold-start-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx2  # noqa: E402

from bench.common import device_slug, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cold_start(mode: str, server_args: list[str], timeout: float = 900.0) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache:
        began = time.perf_counter()
        server = subprocess.Popen([sys.executable, "-m", "dsv4jax.serve", "--port", str(port), "--warmup", mode,
                                   "--compilation-cache", cache, *server_args], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while True:
                if server.poll() is not None or time.perf_counter() - began > timeout:
                    raise RuntimeError(f"the server (--warmup {mode}) exited or never answered /health")
                try:
                    if httpx2.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                time.sleep(0.2)
            health_s = time.perf_counter() - began
            response = httpx2.post(base + "/v1/completions", timeout=timeout, json={
                "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0})
            first_s = time.perf_counter() - began
            response.raise_for_status()
            text = response.json()["choices"][0]["text"]
        finally:
            server.terminate()
            server.wait(30)
    return {"warmup": mode, "health_s": health_s, "first_completion_s": first_s, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["background", "full"])
    parser.add_argument("--name", default=None)
    args, server_args = parser.parse_known_args()
    server_args = [a for a in server_args if a != "--"]
    records = []
    for mode in args.modes:
        records.append(cold_start(mode, server_args))
        print(records[-1], flush=True)
        write_results(args.name or f"cold-start-{device_slug()}", {**vars(args), "server_args": server_args},
                      records)


if __name__ == "__main__":
    main()
