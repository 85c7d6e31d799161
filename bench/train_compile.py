"""Where the first training step's time goes on a device: building the state, then compiling the loss forward,
its gradient and the whole step separately, then a few timed steps. Every stage prints as it ends (a run killed
at its limit still says how far it got) and the figures go to a JSON file.

    python bench/train_compile.py --config configs/dsv4-tiny.json --batch-size 64 --seq-len 512 [--qat] --out F
"""

from __future__ import annotations

import argparse
import json
import time

T0 = time.perf_counter()


def say(record: dict, key: str, value) -> None:
    record[key] = value
    print(f"[{time.perf_counter() - T0:6.1f}s] {key}: {value}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/dsv4-tiny.json")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--qat", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stages", default="forward,grad,step", help="which compilations to time")
    parser.add_argument("--out", default=None)
    parser.add_argument("--jax-config", action="append", default=[], metavar="NAME=VALUE",
                        help="jax.config option, e.g. jax_ragged_dot_use_ragged_dot_instruction=false (repeatable)")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import os

    for option in args.jax_config:
        name, _, value = option.partition("=")
        jax.config.update(name, {"true": True, "false": False}.get(value.lower(), value))

    from dsv4jax.config import load_config
    from dsv4jax.train.loop import Trainer, TrainConfig

    record = {"config": args.config, "batch_size": args.batch_size, "seq_len": args.seq_len, "qat": args.qat,
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_config": args.jax_config, "commit": os.environ.get("DSV4JAX_COMMIT", "unknown")}
    say(record, "imported_s", time.perf_counter() - T0)
    trainer = Trainer(load_config(args.config), TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len,
                                                            qat=args.qat))
    start = time.perf_counter()
    state = jax.block_until_ready(trainer.init())
    say(record, "init_state_s", time.perf_counter() - start)
    batch = jnp.zeros((args.batch_size, args.seq_len + 1), jnp.int32)
    hyper = trainer.hyper(0)

    def forward(params, rest, tokens):
        return trainer.loss(params, rest, tokens)[0]

    functions = {"forward": (forward, (state["params"], state["rest"], batch)),
                 "grad": (jax.grad(forward), (state["params"], state["rest"], batch)),
                 "step": (trainer._step, (state, batch, hyper))}
    compiled = None
    for stage in args.stages.split(","):
        fn, inputs = functions[stage]
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*inputs)
        say(record, f"{stage}_lower_s", time.perf_counter() - start)
        start = time.perf_counter()
        executable = lowered.compile()
        say(record, f"{stage}_compile_s", time.perf_counter() - start)
        if stage == "step":
            compiled = executable
    if compiled is not None and args.steps:
        state, metrics = compiled(state, batch, hyper)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch, hyper)
        jax.block_until_ready(metrics)
        per_step = (time.perf_counter() - start) / args.steps
        say(record, "step_s", per_step)
        say(record, "tokens_per_s", args.batch_size * args.seq_len / per_step)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
