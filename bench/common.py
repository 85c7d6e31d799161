"""Shared benchmark plumbing: timing, the two measured ceilings, and result files with provenance.

Every benchmark writes `bench/results/<name>.json` holding the device, jax version, git commit, its config and
figures. Timings are medians over repeated runs after warm-up, each synchronised with `block_until_ready`.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    device = jax.devices()[0]
    return getattr(device, "device_kind", device.platform)


def device_slug() -> str:
    return device_name().lower().replace("nvidia ", "").replace(" ", "-")


def git_commit() -> str:
    """The commit the run was made from: DSV4JAX_COMMIT (set by the caller: the GPU machine gets a copy of the
    working tree without .git), else `git rev-parse HEAD` here."""
    if os.environ.get("DSV4JAX_COMMIT"):
        return os.environ["DSV4JAX_COMMIT"]
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        # Result files a run rewrites as it goes do not make the code it ran dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except OSError:
        return "unknown"


def rel_l2(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_seconds(fn, *args, warmup: int = 3, iters: int = 20) -> float:
    """Median wall time of fn(*args) (already jitted), each run synchronised."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_ceilings(matmul_size: int = 8192, copy_bytes: int = 2 << 30) -> dict:
    """The matmul ceiling (bf16 n³ through XLA) and the copy bandwidth (bytes read + written), measured now."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (matmul_size, matmul_size), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (matmul_size, matmul_size), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)
    t_matmul = median_seconds(matmul, a, b)
    x = jnp.ones((copy_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda v: v * 2)
    t_copy = median_seconds(copy, x)
    return {"matmul_tflops": 2 * matmul_size ** 3 / t_matmul / 1e12,
            "copy_tbps": 2 * copy_bytes / t_copy / 1e12}


def roofline(flops: float, bytes_moved: float, ceilings: dict) -> dict:
    """Floor time from the lower of the two ceilings, and what fraction of it a measured time reaches."""
    t_compute = flops / (ceilings["matmul_tflops"] * 1e12)
    t_memory = bytes_moved / (ceilings["copy_tbps"] * 1e12)
    return {"floor_s": max(t_compute, t_memory), "bound": "compute" if t_compute >= t_memory else "memory"}


def kernel_events(trace_dir: str):
    """(kernel name, hlo_op, duration in ns) of every device kernel in the trace (host thunks on a CPU backend)."""
    from jax.profiler import ProfileData

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    on_host = not planes
    if on_host:
        planes = [p for p in data.planes if p.name == "/host:CPU"]
    for plane in planes:
        for line in plane.lines:
            if not on_host and not line.name.startswith("Stream"):
                continue  # derived lines (modules, ops, steps) would count kernels twice
            for event in line.events:
                stats = {key: value for key, value in event.stats}
                if on_host and "hlo_op" not in stats:
                    continue  # the host plane also holds Python and thread-pool events
                yield event.name, stats.get("hlo_op", ""), event.duration_ns


def trace_every_kernel() -> None:
    """Turn off XLA's GPU command buffers (CUDA graphs), which a trace shows as one event per graph. Call before the
    backend starts (before the first computation)."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="


def device_ms(fn, *args, runs: int = 5) -> dict:
    """Device time per run of fn(*args) (jitted) from a `jax.profiler` trace, in ms: the total of the call's kernels
    and the time per kernel name. Unlike wall time, it leaves out dispatch and synchronisation (~0.1-0.2 ms per call
    on our H100 host), which dominate sub-millisecond calls; a kernel inside a jitted model pays none of it."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - start > 0.5:
        runs = min(runs, 2)
    trace_dir = tempfile.mkdtemp(prefix="device-ms-")
    with jax.profiler.trace(trace_dir):
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
    by_kernel = collections.Counter()
    for name, _, ns in kernel_events(trace_dir):
        by_kernel[name] += ns / 1e6 / runs
    return {"total_ms": sum(by_kernel.values()), "kernels_ms": dict(by_kernel.most_common(8))}


def write_results(name: str, config: dict, records: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "device": device_name(), "jax": jax.__version__, "commit": git_commit(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config, "results": records, **(extra or {})}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def plain_init(name: str, shape) -> tuple[str, float]:
    """The model's initialiser for an unquantised tensor (init.py, mhc.py, attention.py, compressor.py, moe.py), by
    official name (`hc_attn_fn`) or parameter path (`hc_attn.fn`): (kind, std)."""
    if name.endswith("norm.weight"):
        return "ones", 0.0
    rules = ((r"hc_(attn|ffn|head)[._]fn$", "normal", 0.02), (r"hc_(attn|ffn|head)[._]base$", "normal", 0.1),
             (r"hc_(attn|ffn|head)[._]scale$", "one_plus", 0.1), (r"attn_sink$", "normal", 1.0),
             (r"\.ape$", "normal", 0.5), (r"gate\.bias$", "normal", 0.1), (r"^embed\.weight$", "normal", 1.0))
    for pattern, init, std in rules:
        if re.search(pattern, name):
            return init, std
    if len(shape) >= 2:
        return "normal", shape[-1] ** -0.5  # fan_in_normal (the head too: D^-0.5)
    print(f"warning: no initialiser known for {name} {tuple(shape)}; drawing N(0, 0.1)", file=sys.stderr)
    return "normal", 0.1


@functools.cache
def _drawer(shape, dtype, kind: str, experts: int):
    """One jitted program per distinct leaf (shape, dtype, kind): stacked layers share a handful."""
    def draw(key, std):
        if kind == "hash":  # tid2eid [.., V, k]: k distinct experts per token
            noise = jax.random.uniform(key, (*shape[:-1], experts))
            return jnp.argsort(noise, axis=-1)[..., :shape[-1]].astype(dtype)
        if kind == "ones":
            return jnp.ones(shape, dtype)
        values = std * jax.random.normal(key, shape, jnp.float32)
        return (values + 1.0 if kind == "one_plus" else values).astype(dtype)

    return jax.jit(draw)


def random_params(config, seed: int = 0):
    """(graphdef, params) of `config` with random weights drawn on the device leaf by leaf, with the model's own
    distributions: a few small programs, however deep the model (an unrolled init of 43 layers compiles for minutes).
    """
    from flax import nnx

    from dsv4jax.checkpoint.names import path_key
    from dsv4jax.model import DeepseekV4

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(seed))))
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(abstract))))
    leaves = []
    start = time.perf_counter()
    for index, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        if index % 100 == 0:
            print(f"random_params: {index} leaves drawn, {_drawer.cache_info().currsize} programs, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        name, target = path_key(path), var.get_value()
        kind, std = ("hash", 0.0) if jnp.issubdtype(target.dtype, jnp.integer) else plain_init(name, target.shape)
        draw = _drawer(tuple(target.shape), jnp.dtype(target.dtype), kind, config.n_routed_experts)
        leaves.append((path, var.replace(draw(next(keys), std))))
    params = nnx.from_flat_state(leaves)
    jax.block_until_ready(params)
    return graphdef, params


def random_model(config, name: str, seed: int = 0):
    """A dsv4jax Model of `config` (a ModelConfig) with random weights drawn on the device (`random_params`; the
    host-side init that `dsv4jax.load` uses for a bare config is slow at V4-Flash widths)."""
    from flax import nnx

    from dsv4jax.api import Model

    graphdef, params = random_params(config, seed)
    return Model(nnx.merge(graphdef, params), name=name)
