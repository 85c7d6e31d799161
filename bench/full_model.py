"""The full V4-Flash model over 8 GPUs, written to bench/results/<name>.json:

1. write a random checkpoint in the official format (FP8 e4m3 linears with 128×128 UE8M0 block scales, packed FP4
   routed experts with 1×32 scales, bf16/fp32 elsewhere; config.json + model-*.safetensors + index), file by file;
2. load it sharded over every device (the rules table: experts over cp×ep, the rest replicated);
3. the serving engine over the mesh (speculative_steps=1, MTP): an untimed warm-up request, then a prefill of
   `--prompt` random tokens and `--decode-steps` decode steps; time to first token, decode tokens/s, mean
   acceptance length.

    python3 bench/full_model.py --kind nvidia-h200-x8            # 43 layers, ep=8, 4k prompt, 64 decode steps

Both engine executables are compiled in a background thread from abstract sharded parameters as soon as the plan
exists, so compiling overlaps writing and loading. The results file is rewritten after every phase (and copied to
$OUT when set), so a run stopped at its time limit still returns the phases it finished.

Why not the library's writer for the full model: `save_checkpoint` needs the whole model in host memory. Loading
uses the library's `load_sharded`, which streams: each device gets only the packed FP8/FP4 codes and scales of its
shards, dequantised on the device, with a few parameters in flight on the host (`--loader host`: the whole model on
the host first, as `read_host_params` + `shard_host_params`; ~580 GB in bf16 for V4-Flash, small models only).
`--check` (default: small models only) verifies that the loaded params equal the host path's bit for bit and
compares the first token's logits over the mesh with the one-device model, in bf16 and in fp32.

Random values: FP8 codes have exponents 2^-1..2^0 and random sign/mantissa (never the NaN code), FP4 codes are
uniform random bytes (every E2M1 code is finite), with one power-of-two scale per tensor giving the fan-in RMS of
the model's initialiser; the other tensors follow the model's initialisers (dsv4jax/model/*.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

# The XLA GPU pool defaults to 75% of each GPU: the full model's shards (~85 GB at ep=8) need more headroom.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import device_slug, plain_init, write_results  # noqa: E402
from dsv4jax import quant  # noqa: E402
from dsv4jax.checkpoint.loader import read_host_params  # noqa: E402
from dsv4jax.checkpoint.names import checkpoint_layout, flat_values, official_names  # noqa: E402
from dsv4jax.checkpoint.safetensors_io import DTYPES, INDEX_FILENAME  # noqa: E402
from dsv4jax.checkpoint.writer import FP8_LINEAR, FP32_TENSOR, ROUTED_EXPERT  # noqa: E402
from dsv4jax.config import load_config, save_config  # noqa: E402
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from dsv4jax.sharding.params import abstract_model, device_bytes, load_sharded, shard_host_params  # noqa: E402
from dsv4jax.sharding.rules import param_shardings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FLASH = ROOT / "configs" / "deepseek-v4-flash.json"
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# ------------------------------------------------------------------------------------------------------------------
# the checkpoint plan: every official tensor, its on-disk dtype/shape, how its values are drawn and its file

FP8_CODE_RMS = 1.1588  # RMS of the codes drawn below: |v| in [0.5, 2) with e4m3's 8 mantissa steps
FP4_CODE_RMS = float(np.sqrt(np.mean(quant.E2M1_LUT ** 2)))  # uniform random bytes: every E2M1 code equally likely


@dataclasses.dataclass
class Tensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    init: str  # fp8 | fp4 | scale | normal | one_plus | ones | hash
    std: float = 0.0
    fill: int = 0  # the scale byte (UE8M0) for init == "scale"
    experts: int = 0  # for init == "hash": n_routed_experts

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _e8m0_byte(std: float, code_rms: float) -> int:
    return 127 + int(round(math.log2(std / code_rms)))


def plan_checkpoint(config) -> tuple[list[tuple[str, list[Tensor]]], nnx.GraphDef, nnx.State]:
    """[(file name, tensors)] in the official naming, as `save_checkpoint(quantize=True)` would write them."""
    graphdef, abstract = abstract_model(config)
    groups: dict[str, list[Tensor]] = {}
    per_layer = checkpoint_layout(config, flat_values(abstract),
                                  lambda stacked, _: jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype))
    for key, value in per_layer.items():
        for name, expert in official_names(key, value.shape[0] if value.shape else 0):
            shape = tuple(value.shape if expert is None else value.shape[1:])
            match = re.match(r"(layers|mtp)\.(\d+)\.", name)
            # One file per layer; the embedding and the head (drawn in bf16, the slowest) one file each.
            top = name.split(".")[0] if name.startswith(("embed.", "head.")) else "top"
            group = groups.setdefault(f"{match[1]}-{int(match[2]):03d}" if match else top, [])
            base = name[:-len("weight")]
            if FP8_LINEAR.search(name):
                rows, cols = shape
                group.append(Tensor(name, "F8_E4M3", shape, "fp8"))
                group.append(Tensor(base + "scale", "F8_E8M0", (-(-rows // 128), -(-cols // 128)), "scale",
                                    fill=_e8m0_byte(cols ** -0.5, FP8_CODE_RMS)))
            elif ROUTED_EXPERT.search(name):
                rows, cols = shape
                group.append(Tensor(name, "I8", (rows, cols // 2), "fp4"))
                group.append(Tensor(base + "scale", "F8_E8M0", (rows, -(-cols // 32)), "scale",
                                    fill=_e8m0_byte(cols ** -0.5, FP4_CODE_RMS)))
            elif np.dtype(value.dtype).kind in "iu":
                group.append(Tensor(name, "I32", shape, "hash", experts=config.n_routed_experts))
            else:
                init, std = plain_init(name, shape)
                group.append(Tensor(name, "F32" if FP32_TENSOR.search(name) else "BF16", shape, init, std))
    order = sorted(groups, key=lambda g: (g.startswith("layers"), g.startswith("mtp"), g))
    names = [f"model-{i + 1:05d}-of-{len(order):05d}.safetensors" for i in range(len(order))]
    return list(zip(names, (groups[g] for g in order))), graphdef, abstract


# ------------------------------------------------------------------------------------------------------------------
# writing: one thread per file, values drawn block by block (numpy releases the GIL while drawing and writing)

BLOCK_ELEMENTS = 1 << 24


def _blocks(tensor: Tensor, rng: np.random.Generator):
    count = math.prod(tensor.shape)
    if tensor.init == "hash":  # tid2eid: k distinct experts per token, rows drawn in blocks
        vocab, k = tensor.shape
        step = max(1, BLOCK_ELEMENTS // tensor.experts)
        for start in range(0, vocab, step):
            noise = rng.random((min(step, vocab - start), tensor.experts), dtype=np.float32)
            yield np.ascontiguousarray(np.argpartition(noise, k - 1, axis=1)[:, :k].astype(np.int32))
        return
    for start in range(0, count, BLOCK_ELEMENTS):
        n = min(BLOCK_ELEMENTS, count - start)
        if tensor.init == "fp4":
            yield rng.integers(0, 256, n, dtype=np.uint8)
        elif tensor.init == "fp8":  # sign and mantissa random, exponent field 0110/0111: never 0x7F/0xFF (NaN)
            codes = rng.integers(0, 256, n, dtype=np.uint8)
            codes &= 0x8F
            codes |= 0x30
            yield codes
        elif tensor.init == "scale":
            yield np.full(n, tensor.fill, np.uint8)
        elif tensor.init == "ones":
            yield np.ones(n, DTYPES[tensor.dtype])
        else:
            values = rng.standard_normal(n, dtype=np.float32)
            values *= np.float32(tensor.std)
            if tensor.init == "one_plus":
                values += np.float32(1.0)
            yield values.astype(DTYPES[tensor.dtype])


def write_safetensors(path: Path, tensors: list[Tensor], seed: int, counter: list) -> int:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.Generator(np.random.SFC64(seed))
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)
        for t in tensors:
            written = 0
            for block in _blocks(t, rng):
                file.write(block)
                written += block.nbytes
                counter[0] += block.nbytes  # progress only (races just blur the figure)
            assert written == t.nbytes, (t.name, written, t.nbytes)
    os.replace(temporary, path)
    return offset


def write_checkpoint(directory: Path, config, files, threads: int, seed: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_FILENAME).unlink(missing_ok=True)  # written last: a checkpoint is complete once it exists
    planned = {name for name, _ in files}
    for stale in directory.glob("model-*-of-*.safetensors"):
        if stale.name not in planned:
            stale.unlink()
    save_config(config.replace(weight_block_size=(128, 128), expert_dtype="fp4"), directory / "config.json")
    total = sum(t.nbytes for _, tensors in files for t in tensors)
    counter, start = [0], time.perf_counter()
    with futures.ThreadPoolExecutor(threads) as pool:
        # The largest files first so that the last round is short.
        jobs = [pool.submit(write_safetensors, directory / name, tensors, seed * 100003 + i, counter)
                for i, (name, tensors) in sorted(enumerate(files), key=lambda f: -sum(t.nbytes for t in f[1][1]))]
        while True:
            done, pending = futures.wait(jobs, timeout=15)
            elapsed = time.perf_counter() - start
            log(f"  written {gb(counter[0])} of {gb(total)} ({counter[0] / elapsed / 1e9:.2f} GB/s)")
            if not pending:
                break
        for job in jobs:
            job.result()
    weight_map = {t.name: name for name, tensors in files for t in tensors}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILENAME).write_text(json.dumps(index, indent=1))
    seconds = time.perf_counter() - start
    return {"checkpoint_bytes": total, "files": len(files), "write_s": seconds, "write_gb_per_s": total / seconds / 1e9}


def complete_checkpoint(directory: Path, files) -> bool:
    """A checkpoint written earlier by this script with the same plan (for --reuse)."""
    try:
        index = json.loads((directory / INDEX_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    expected = {t.name: name for name, tensors in files for t in tensors}
    return index.get("weight_map") == expected and all((directory / name).is_file() for name, _ in files)


# ------------------------------------------------------------------------------------------------------------------
# the engine: built from abstract sharded params so that compiling does not wait for the weights

class ModelStub:
    """What `Engine` reads of a `dsv4jax.api.Model`."""

    def __init__(self, config, graphdef, params):
        from dsv4jax.tokenizer import load_tokenizer

        self.config, self.graphdef, self.params = config, graphdef, params
        self.tokenizer = load_tokenizer(None, config.vocab_size)

    def encode(self, prompt):
        return [int(t) for t in prompt]


def build_engine(config, graphdef, abstract_sharded, mesh, device_mesh, engine_config, kernels: str):
    """An engine on a runner over the mesh with abstract params (ShapeDtypeStructs with their rules-table
    shardings), so that it compiles while the weights load; `engine.params` is set once they are there."""
    from dsv4jax.run import Runner
    from dsv4jax.serve.engine import Engine

    runner = Runner(graphdef, mesh, list(device_mesh.devices.flat), kernels=kernels)
    return Engine(ModelStub(config, graphdef, abstract_sharded), engine_config, runner=runner)


def compile_engine(engine, times: dict) -> None:
    """Both executables through `engine.warmup` (lowered one after the other, compiled at once); each stage's
    seconds land in `times` as it ends."""

    def report(record):
        kind = record["bucket"].split("-")[0]
        stage = "compile" if "compile_s" in record else "lower"
        times[f"{stage}_{kind}_s"] = record[f"{stage}_s"]
        log(f"  {'compiled' if stage == 'compile' else 'lowered'} {kind} in {record[f'{stage}_s']:.1f} s")

    engine.warmup(threads=2, report=report)


def run_request(engine, prompt: list[int], decode_steps: int, max_tokens: int) -> dict:
    """Submit one request; its first step (prefill, then one decode step in the same engine step), then
    `decode_steps` timed decode steps."""
    from dsv4jax.serve.sampling import SamplingParams

    before = dict(engine.counters)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    start = time.perf_counter()
    rid = engine.submit(prompt, sampling)
    tokens, logprobs = [], []
    while not tokens:
        for out in engine.step():
            tokens += out.token_ids
            logprobs += out.logprobs
    first_step_s = time.perf_counter() - start
    first_tokens = len(tokens)
    step_times = []
    for _ in range(decode_steps):
        if not engine.has_unfinished():
            break
        began = time.perf_counter()
        for out in engine.step():
            tokens += out.token_ids
            logprobs += out.logprobs
        step_times.append(time.perf_counter() - began)
    decode_s = sum(step_times)
    while engine.has_unfinished():  # release the slot
        engine.abort(rid)
        engine.step()
    rounds = engine.counters["speculative_rounds"] - before["speculative_rounds"]
    accepted = engine.counters["accepted_tokens"] - before["accepted_tokens"]
    decoded = len(tokens) - first_tokens
    median = float(np.median(step_times)) if step_times else None
    return {"prompt_tokens": len(prompt), "first_step_s": first_step_s,
            "prefill_s_estimate": first_step_s - median if median is not None else None,
            "decode_steps": len(step_times), "decode_s": decode_s, "decode_tokens": decoded,
            "output_tokens_per_s": decoded / decode_s if decode_s else None,
            "median_step_ms": 1e3 * median if median is not None else None,
            "mean_acceptance_length": (accepted + rounds) / rounds if rounds else None,
            "first_token": tokens[0], "tokens": tokens[:16], "logprobs": [round(x, 3) for x in logprobs[:16]],
            "logprobs_finite": bool(np.isfinite(logprobs).all())}


# ------------------------------------------------------------------------------------------------------------------
# correctness (small models): the loaded params against the host path, the mesh against one device

def check(directory: Path, params, mesh, device_mesh, prompt: list[int], first_token: int | None) -> dict:
    """bf16: the loaded params equal the host path's (`read_host_params` + `shard_host_params`) bit for bit;
    first-token logits over the mesh vs one device. fp32 (the same checkpoint loaded sharded in fp32): the same
    logits comparison without bf16 rounding."""
    from dsv4jax.checkpoint.loader import load_model
    from dsv4jax.model import init_state
    from dsv4jax.run import Runner

    result = {}
    config, graphdef, host = read_host_params(directory, "bfloat16", progress=False)
    reference = shard_host_params(host, mesh, device_mesh)
    del host
    mine, theirs = jax.tree.leaves(params), jax.tree.leaves(reference)
    same = [np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8)) and a.sharding == b.sharding
            for a, b in zip(mine, theirs)]
    result["params_equal_host_path"] = all(same) and len(mine) == len(theirs)
    result["params_differing"] = int(len(same) - sum(same))
    del reference
    ids = jnp.asarray([prompt], jnp.int32)
    num_new = jnp.asarray([len(prompt)], jnp.int32)
    max_len = -(-(len(prompt) + 1) // 256) * 256

    def first_logits(dtype, sharded_params, sharded_graphdef):
        cfg = config.replace(dtype=dtype)
        single_graphdef, single_params = nnx.split(load_model(directory, dtype=dtype, progress=False))
        one, _, _ = Runner(single_graphdef).prefill(single_params, init_state(cfg, 1, max_len), ids, num_new)
        runner = Runner(sharded_graphdef, mesh, device_mesh.devices.flat)
        many, _, _ = runner.prefill(sharded_params, init_state(cfg, 1, max_len), ids, num_new)
        return np.asarray(one, np.float32)[0], np.asarray(many, np.float32)[0]

    one, many = first_logits("bfloat16", params, graphdef)
    result["first_token_logits_rel_l2_mesh_vs_one_device_bf16"] = rel_l2(many, one)
    result["logits_finite"] = bool(np.isfinite(many).all())
    result["argmax_equal_bf16"] = int(many.argmax()) == int(one.argmax())
    if first_token is not None:
        result["engine_first_token_equals_one_device_argmax"] = first_token == int(one.argmax())
    _, graphdef32, params32 = load_sharded(directory, mesh, device_mesh, "float32", progress=False, threads=2)
    one, many = first_logits("float32", params32, graphdef32)
    result["first_token_logits_rel_l2_mesh_vs_one_device_fp32"] = rel_l2(many, one)
    return result


# ------------------------------------------------------------------------------------------------------------------

def choose_directory(requested: str | None, needed: int) -> Path:
    if requested:
        return Path(requested)
    candidates = [Path("/dev/shm"), Path(tempfile.gettempdir()), ROOT / "tmp"]
    for base in candidates:
        try:
            if base.is_dir() and shutil.disk_usage(base).free > needed * 1.05 + (2 << 30):
                return base / "dsv4jax-full-model"
        except OSError:
            continue
    free = {str(c): gb(shutil.disk_usage(c).free) for c in candidates if c.is_dir()}
    raise SystemExit(f"no directory has room for the {gb(needed)} checkpoint (free: {free}); use --layers N or "
                     f"--out-dir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(FLASH))
    parser.add_argument("--layers", type=int, default=None, help="main layers (default: the config's, 43 for Flash)")
    parser.add_argument("--experts", type=int, default=None, help="routed experts (default: the config's; fewer "
                                                                     "only to try the script on a small host)")
    parser.add_argument("--mesh", default=None, help="mesh spec, e.g. ep=8 or cp=2,ep=4 (default: ep=<devices>)")
    parser.add_argument("--moe-mode", default="gather", choices=("gather", "all_to_all"))
    parser.add_argument("--cp-mode", default="round_robin", choices=("round_robin", "zigzag"))
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens (one prefill chunk)")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--out-dir", default=None, help="checkpoint directory (default: /dev/shm, else the temp dir, "
                                                        "else tmp/ in the repository, whichever has room)")
    parser.add_argument("--reuse", action="store_true", help="keep a complete checkpoint already in --out-dir")
    parser.add_argument("--keep", action="store_true", help="do not delete the checkpoint at the end")
    parser.add_argument("--write-threads", type=int, default=min(48, os.cpu_count() or 1))
    parser.add_argument("--load-threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--loader", default="stream", choices=("stream", "host"),
                        help="stream: load_sharded (packed tensors, dequantised on the devices); host: "
                             "read_host_params + shard_host_params (the whole model on the host, small models only)")
    parser.add_argument("--check", default="auto", choices=("auto", "on", "off"),
                        help="auto: on when the model is below 4 GB in bf16")
    parser.add_argument("--kernels", default="auto", choices=("auto", "reference", "pallas"),
                        help="dsv4jax.pallas implementation for the engine's executables")
    parser.add_argument("--compile-only", action="store_true", help="plan and compile, no checkpoint (estimates)")
    parser.add_argument("--kind", default=None, help="the device tool's kind, for the results name")
    parser.add_argument("--name", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n = jax.device_count()
    kind = args.kind or f"{device_slug()}-x{n}"
    name = args.name or f"multi-gpu-{kind}-full-model"
    mesh = parse_mesh_spec(args.mesh or f"ep={n}", moe_mode=args.moe_mode, cp_mode=args.cp_mode)
    device_mesh = make_mesh(mesh)
    config = load_config(args.config, dtype="bfloat16")
    if args.layers is not None:
        mtp_ratios = config.compress_ratios[config.num_hidden_layers:]
        config = config.replace(num_hidden_layers=args.layers, num_hash_layers=min(config.num_hash_layers, args.layers),
                                compress_ratios=tuple(config.compress_ratios[:args.layers]) + tuple(mtp_ratios))
    if args.experts is not None:
        config = config.replace(n_routed_experts=args.experts)
    mesh.check_model(config)

    phases, summary, records = {}, {"status": "planning"}, []
    run_config = {**vars(args), "mesh": args.mesh or f"ep={n}", "devices": n, "layers": config.num_hidden_layers,
                  "mtp_layers": config.num_mtp_layers,
                  "routed_experts": config.n_routed_experts}

    def save(status: str) -> None:
        summary["status"] = status
        path = write_results(name, run_config, records, {"phases": phases, "summary": summary})
        if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():
            shutil.copy(path, os.environ["OUT"])

    def run_phases() -> None:
        log(f"{n} × {jax.devices()[0].device_kind}, mesh {mesh.shape} ({args.moe_mode}), {config.num_hidden_layers} "
            f"layers + {config.num_mtp_layers} MTP")
        began = time.perf_counter()
        files, graphdef, abstract = plan_checkpoint(config)
        shardings = param_shardings(abstract, mesh, device_mesh)
        abstract_sharded = jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                                        sharding=s.get_value())),
            abstract, shardings, is_leaf=_is_var)
        leaves = [(v.get_value(), s.get_value()) for v, s in zip(jax.tree.leaves(abstract, is_leaf=_is_var),
                                                               jax.tree.leaves(shardings, is_leaf=_is_var))]
        parameters = sum(math.prod(a.shape) for a, _ in leaves)
        model_bytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a, _ in leaves)
        per_device = sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in leaves)
        checkpoint_bytes = sum(t.nbytes for _, tensors in files for t in tensors)
        memory = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        summary.update(parameters=parameters, model_bytes=model_bytes, planned_param_bytes_per_device=per_device,
                       checkpoint_bytes=checkpoint_bytes, checkpoint_files=len(files), device_memory_bytes=memory)
        phases["plan_s"] = time.perf_counter() - began
        log(f"plan: {parameters / 1e9:.3f} B parameters ({gb(model_bytes)} in bf16/fp32), checkpoint "
            f"{gb(checkpoint_bytes)} in {len(files)} files, {gb(per_device)} of parameters per device"
            + (f" (device memory {gb(memory)})" if memory else ""))
        if memory and per_device > memory:
            save("does not fit")
            raise SystemExit(f"{gb(per_device)} per device exceeds the {gb(memory)} each device has: use more devices "
                             f"on the expert axis or --layers")
        save("planned")

        # Engine executables: compiled in the background from the abstract params.
        max_tokens = 2 * (args.decode_steps + 2) + 2
        page = 256
        from dsv4jax.serve.engine import EngineConfig

        engine_config = EngineConfig(
            max_running_requests=1, max_model_len=-(-(args.prompt + max_tokens + 8) // page) * page, page_tokens=page,
            prefill_chunk=args.prompt, prefill_buckets=(args.prompt,), max_prefill_rows=1, decode_buckets=(1,),
            prefill_row_buckets=(1,), speculative_steps=1, prompt_logprobs=False)
        engine = build_engine(config, graphdef, abstract_sharded, mesh, device_mesh, engine_config, args.kernels)
        compile_times, failed = {}, {}

        def compile_all():
            began = time.perf_counter()
            try:
                compile_engine(engine, compile_times)
            except BaseException as error:  # noqa: BLE001  (reported by the main thread)
                failed["error"] = error
            compile_times["compile_total_s"] = time.perf_counter() - began

        compiler = threading.Thread(target=compile_all, daemon=True)
        compiler.start()
        log("compiling prefill and decode in the background")
        if args.compile_only:
            compiler.join()
            phases.update(compile_times)
            if "error" in failed:
                raise failed["error"]
            save("compiled (compile-only)")
            log(f"compile-only done: {compile_times}")
            return

        # Write.
        directory = choose_directory(args.out_dir, checkpoint_bytes)
        run_config["checkpoint_dir"] = str(directory)
        summary["checkpoint_dir_free_bytes_before"] = shutil.disk_usage(directory.parent if not directory.exists()
                                                                        else directory).free
        if args.reuse and complete_checkpoint(directory, files):
            log(f"reusing the checkpoint in {directory}")
        else:
            log(f"writing {gb(checkpoint_bytes)} to {directory} with {args.write_threads} threads")
            written = write_checkpoint(directory, config, files, args.write_threads, args.seed)
            phases["write_s"] = written["write_s"]
            summary["write_gb_per_s"] = written["write_gb_per_s"]
            log(f"written in {written['write_s']:.1f} s ({written['write_gb_per_s']:.2f} GB/s)")
            save("written")

        # Load.
        log(f"loading sharded ({args.loader})")
        began = time.perf_counter()
        loaded_config = load_config(directory, dtype="bfloat16")
        assert loaded_config.replace(weight_block_size=None, expert_dtype=None) == config.replace(
            weight_block_size=None, expert_dtype=None), "config.json does not round-trip"
        if args.loader == "host":
            _, _, host = read_host_params(directory, "bfloat16", progress=False)
            params = shard_host_params(host, mesh, device_mesh)
            del host
        else:
            _, _, params = load_sharded(directory, mesh, device_mesh, "bfloat16", progress=False,
                                        threads=args.load_threads)
        jax.block_until_ready(params)
        phases["load_s"] = time.perf_counter() - began
        held = [device_bytes(params, d) for d in jax.devices()]
        summary.update(param_bytes_per_device_max=max(held), param_bytes_per_device_min=min(held))
        log(f"loaded in {phases['load_s']:.1f} s; parameters per device {gb(min(held))}–{gb(max(held))}")
        save("loaded")

        # Compile (waits for the background thread).
        began = time.perf_counter()
        while compiler.is_alive():
            compiler.join(timeout=30)
            if compiler.is_alive():
                phases.update(compile_times)
                save(f"compiling ({time.perf_counter() - began:.0f} s after loading)")
                log(f"  still compiling ({compile_times})")
        phases.update(compile_times)
        phases["compile_wait_after_load_s"] = time.perf_counter() - began
        if "error" in failed:
            save("compile failed")
            raise failed["error"]
        engine.params = params  # the executables were compiled for these shardings
        log(f"compiled ({compile_times}); waited {phases['compile_wait_after_load_s']:.1f} s after loading")
        save("compiled")

        # Prefill + decode: one untimed warm-up request (first executions), then the measured one.
        rng = np.random.default_rng(args.seed)
        vocab = config.vocab_size
        warm = run_request(engine, rng.integers(3, vocab, size=args.prompt).tolist(), 2, max_tokens)
        records.append({"part": "warm-up", **warm})
        phases["warmup_request_s"] = warm["first_step_s"] + warm["decode_s"]
        log(f"warm-up: first step {warm['first_step_s']:.2f} s")
        save("warmed up")
        prompt = rng.integers(3, vocab, size=args.prompt).tolist()
        measured = run_request(engine, prompt, args.decode_steps, max_tokens)
        records.append({"part": "measured", **measured})
        phases["prefill_first_step_s"] = measured["first_step_s"]
        phases["decode_s"] = measured["decode_s"]
        summary.update(time_to_first_token_s=measured["first_step_s"],
                       prefill_s_estimate=measured["prefill_s_estimate"],
                       output_tokens_per_s=measured["output_tokens_per_s"], median_step_ms=measured["median_step_ms"],
                       mean_acceptance_length=measured["mean_acceptance_length"], engine_stats=engine.stats())
        log(f"measured: TTFT {measured['first_step_s']:.3f} s, {measured['decode_tokens']} tokens in "
            f"{measured['decode_steps']} steps, {measured['output_tokens_per_s']:.1f} tokens/s, acceptance length "
            f"{measured['mean_acceptance_length']}")
        save("measured")

        if args.check == "on" or (args.check == "auto" and model_bytes < 4e9):
            began = time.perf_counter()
            summary["correctness"] = check(directory, params, mesh, device_mesh, prompt, measured["first_token"])
            phases["check_s"] = time.perf_counter() - began
            log(f"check: {summary['correctness']}")
        if not args.keep and not args.reuse and not args.out_dir:
            shutil.rmtree(directory, ignore_errors=True)
        phases["total_s"] = time.perf_counter() - T0
        save("done")
        log(f"done in {phases['total_s']:.1f} s")

    try:
        run_phases()
    except BaseException as error:  # noqa: BLE001  (recorded in the results, then raised)
        summary["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        save(f"failed after: {summary['status']}")
        raise


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


if __name__ == "__main__":
    main()
