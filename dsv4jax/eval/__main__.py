"""`python -m dsv4jax.eval loglik|perplexity|generate --data FILE [--model DIR] [--out results.json]`.

loglik: JSONL of {"context": ..., "continuation": ...} (text or token-id lists) -> per-pair logprob and greedy.
perplexity: a text file (or JSON list of token ids) -> token count, mean NLL, perplexity.
generate: JSONL of {"prompt": ..., "answer": ...} or {"prompt": ..., "regex": ...} -> outputs and accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dsv4jax import compilation_cache


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["loglik", "perplexity", "generate"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    parser.add_argument("--out", default=None, help="write results here as JSON (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--mesh", default=None, help="spread over devices, e.g. cp=2,tp=2,ep=2 (default: one device)")
    parser.add_argument("--kernels", choices=["auto", "reference", "pallas"], default="auto",
                        help="kernel implementation (loglik, perplexity)")
    compilation_cache.add_argument(parser)
    args = parser.parse_args(argv)

    import dsv4jax
    from dsv4jax import eval as evaluation

    try:
        compilation_cache.enable(args.compilation_cache)
        model = dsv4jax.load(args.model, dtype=args.dtype)
        start = time.perf_counter()
        if args.task == "loglik":
            records = _jsonl(args.data)
            scored = evaluation.loglikelihood(model, [(r["context"], r["continuation"]) for r in records],
                                              batch_size=args.batch_size, mesh=args.mesh,
                                              kernels=args.kernels)
            result = {"results": [{"logprob": s.logprob, "is_greedy": s.is_greedy} for s in scored]}
        elif args.task == "perplexity":
            with open(args.data) as f:
                text = f.read()
            tokens = json.loads(text) if args.data.endswith(".json") else text
            result = evaluation.perplexity(model, tokens, chunk=args.chunk, mesh=args.mesh,
                                            kernels=args.kernels)
        else:
            records = _jsonl(args.data)
            outputs, accuracy = evaluation.evaluate_generation(model, records, args.max_new_tokens, args.batch_size,
                                                               mesh=args.mesh)
            result = {"accuracy": accuracy, "results": [{"output": o.output, "correct": o.correct} for o in outputs]}
    except (dsv4jax.ConfigError, ValueError, KeyError, OSError) as error:  # MeshError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = {"task": args.task, "model": model.name, "seconds": time.perf_counter() - start, **result}
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
