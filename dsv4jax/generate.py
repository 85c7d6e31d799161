"""`python -m dsv4jax.generate`: print a continuation of a prompt."""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4jax.generate", description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint directory or config.json (default: the "
                        "repository's default model)")
    parser.add_argument("--prompt", default="DeepSeek-V4 in JAX:", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    args = parser.parse_args(argv)

    import dsv4jax
    from dsv4jax.checkpoint.errors import CheckpointError

    try:
        model = dsv4jax.load(args.model, dtype=args.dtype)
        start = time.perf_counter()
        text = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (dsv4jax.ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[{model.name}] {args.prompt}{text}")
    print(f"({args.max_new_tokens} tokens in {time.perf_counter() - start:.1f}s, compilation included)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
