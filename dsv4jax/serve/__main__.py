"""`python -m dsv4jax.serve`: the OpenAI-compatible server (SERVING §D).

    python -m dsv4jax.serve                       # the repository's default model on 127.0.0.1:8000
    python -m dsv4jax.serve --model DIR --max-model-len 8192 --max-running-requests 16 --speculative-steps 1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from dsv4jax import compilation_cache

log = logging.getLogger("dsv4jax.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dsv4jax.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory with config.json, safetensors and "
                        "tokenizer.json (official or HF naming); default: the repository's default model")
    parser.add_argument("--served-model-name", default=None, help="the name in /v1/models and responses "
                        "(default: the model's own name)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="activation and weight dtype (default: float32 on CPUs, where it is faster than bfloat16 "
                        "and batch-invariant to ~1e-6; the checkpoint's dtype elsewhere; SERVING §D.6)")
    parser.add_argument("--deterministic", action="store_true",
                        help="one shape per step kind, so a request's tokens and logprobs never depend on what else "
                        "is in the batch, in any dtype (costs padding: SERVING §D.6)")
    parser.add_argument("--mesh", default=None, help="device mesh such as dp=1,cp=1,tp=1,ep=1 (omitted axes are 1)")
    parser.add_argument("--cp-mode", choices=["round-robin", "zigzag"], default="round-robin",
                        help="context-parallel token split for prefill")
    parser.add_argument("--kernels", choices=["auto", "reference", "pallas"], default="auto",
                        help="kernel implementation: Pallas kernels on GPUs where supported (auto), the pure-JAX "
                        "references, or the kernels everywhere (an error where unsupported)")
    parser.add_argument("--speculative-steps", type=int, default=0, help="MTP draft tokens per step (0: off, 1-3)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="prompt + generated tokens of one request")
    parser.add_argument("--max-running-requests", type=int, default=8, help="requests decoding at once")
    parser.add_argument("--max-waiting-requests", type=int, default=256,
                        help="requests that may wait beyond the free running slots; past that the server answers "
                        "503 (busy), and a batch larger than running + waiting slots 400 (never fits)")
    parser.add_argument("--page-tokens", type=int, default=256, help="positions per cache page")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="cache pages in the pool (default: every running request at --max-model-len)")
    parser.add_argument("--page-allocation", choices=["on_demand", "reserve"], default="on_demand",
                        help="on_demand: pages as sequences grow, the newest request preempted and recomputed when "
                        "none is free; reserve: every page a request can need at admission")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="do not keep prompt pages and ring snapshots for later requests with the same prefix")
    parser.add_argument("--prefix-cache-snapshots", type=int, default=None,
                        help="ring snapshot slots of the prefix cache on the device (default: 4 per running request)")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="most prompt tokens per request per step")
    parser.add_argument("--max-prefill-rows", type=int, default=None, help="requests prefilled together in one step")
    parser.add_argument("--prefill-buckets", default=None, help="prefill chunk lengths to compile, comma-separated "
                        "(fewer buckets: faster start, more padding)")
    parser.add_argument("--decode-buckets", default=None, help="decode batch sizes to compile, comma-separated "
                        "(default: powers of two up to --max-running-requests)")
    parser.add_argument("--default-chat-template-kwargs", default=None,
                        help='chat defaults as JSON, e.g. \'{"thinking": true}\' (SERVING §D.2)')
    compilation_cache.add_argument(parser)
    parser.add_argument("--warmup", choices=["background", "full", "none"], default="background",
                        help="compiling the shape buckets (SERVING §D.4): serve at once and compile them behind "
                        "the first requests, the ones those need first (background); compile every one before "
                        "serving (full: no request ever waits on a compile); or only as requests need them (none)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_const", const="none", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def default_dtype() -> str | None:
    """float32 on CPUs (measured faster there than bfloat16, and batch-invariant: bench/batch_invariance.py);
    None (the checkpoint's dtype) on accelerators."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else None


def check_mesh(spec: str | None, cp_mode: str):
    """The mesh of --mesh/--cp-mode, checked against the devices before anything loads."""
    import jax

    from dsv4jax.sharding import MeshError, parse_mesh_spec

    if spec is None:
        return None
    mesh = parse_mesh_spec(spec, cp_mode=cp_mode.replace("-", "_"))
    if mesh.dp != 1:
        raise MeshError(f"--mesh {spec}: the serving engine keeps every sequence on every rank; use dp=1 and spread "
                        f"the model with cp, tp and ep")
    if mesh.size not in (1, jax.device_count()):  # size 1: one device
        raise MeshError(f"--mesh {spec} needs {mesh.size} devices but {jax.device_count()} are present; make the "
                        f"product of the axis sizes equal {jax.device_count()}")
    return mesh


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        template_defaults = json.loads(args.default_chat_template_kwargs or "{}")
        if not isinstance(template_defaults, dict) or set(template_defaults) - {"thinking"}:
            raise ValueError("only {\"thinking\": true|false} is supported")
    except ValueError as error:
        print(f"error: --default-chat-template-kwargs: {error}", file=sys.stderr)
        return 2

    import uvicorn

    import dsv4jax
    from dsv4jax.checkpoint.errors import CheckpointError
    from dsv4jax.serve.app import build_app
    from dsv4jax.serve.async_engine import AsyncEngine
    from dsv4jax.serve.engine import Engine, EngineConfig
    from dsv4jax.serve.metrics import ServerMetrics
    from dsv4jax.sharding import MeshError

    try:
        mesh = check_mesh(args.mesh, args.cp_mode)
        compilation_cache.enable(args.compilation_cache)
        start = time.perf_counter()
        print(f"loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
        model = dsv4jax.load(args.model, dtype=args.dtype or default_dtype(), progress=True)
        tuning = {}
        if args.max_prefill_rows is not None:
            tuning["max_prefill_rows"] = args.max_prefill_rows
        for name in ("prefill_buckets", "decode_buckets"):
            if getattr(args, name):
                tuning[name] = tuple(int(b) for b in getattr(args, name).split(","))
        config = EngineConfig(max_running_requests=args.max_running_requests, max_model_len=args.max_model_len,
                              page_tokens=args.page_tokens, num_pages=args.num_pages,
                              page_allocation=args.page_allocation, prefix_cache=args.prefix_cache,
                              prefix_cache_snapshots=args.prefix_cache_snapshots, prefill_chunk=args.prefill_chunk,
                              speculative_steps=args.speculative_steps,
                              max_waiting_requests=args.max_waiting_requests, deterministic=args.deterministic,
                              **tuning)
        runner = model.runner(mesh if mesh is not None and mesh.size > 1 else None, kernels=args.kernels)
        engine = Engine(model, config, runner=runner)
        print(f"loaded {model.name} in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

        def report(record):
            stage = f"compiled in {record['compile_s']:.1f}s" if "compile_s" in record else \
                f"lowered in {record['lower_s']:.1f}s, compiling"
            print(f"  {record['bucket']}: {stage}", file=sys.stderr, flush=True)

        if args.warmup == "full":
            start = time.perf_counter()
            print("compiling every shape bucket (warm-up) ...", file=sys.stderr, flush=True)
            compiled = engine.warmup(report=report)
            print(f"warm-up done in {time.perf_counter() - start:.1f}s ({len(compiled)} shape buckets)",
                  file=sys.stderr, flush=True)
    except (dsv4jax.ConfigError, CheckpointError, MeshError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics).start()
    if args.warmup == "background":
        print(f"compiling {len(engine.bucket_keys())} shape buckets behind the first requests (warm-up)",
              file=sys.stderr, flush=True)
        engine.warmup_in_background(report=report)
    names = [args.served_model_name] if args.served_model_name else [model.name]
    app = build_app(async_engine, model, served_names=names, max_model_len=args.max_model_len,
                    default_thinking=bool(template_defaults.get("thinking", False)))
    print(f"serving {names[0]!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        async_engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
