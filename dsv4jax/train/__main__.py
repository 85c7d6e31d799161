"""`python -m dsv4jax.train --config CONFIG --data CORPUS_DIR --out RUN_DIR [--steps N | --time-budget S]
[--export MODEL_DIR --quantize]`.

CORPUS_DIR holds train.txt / heldout.txt (see `dsv4jax.train.corpus`; built there if missing), then
tokenizer.json and the token arrays train.npy / heldout.npy (made once; a directory holding only those three
is enough). Checkpoints go to RUN_DIR/checkpoints (a rerun resumes), the loss history to RUN_DIR/history.jsonl,
the figures to RUN_DIR/summary.json. --export writes the trained model in the official checkpoint format with its
tokenizer, then scores that exported checkpoint (as loaded back) on the held-out split: loss, perplexity and the
1-step MTP acceptance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from dsv4jax import compilation_cache


def _tokens(corpus: Path, vocab_size: int, include_tests: bool) -> tuple[np.ndarray, np.ndarray]:
    from dsv4jax.tokenizer import JsonTokenizer
    from dsv4jax.train.bpe import train_tokenizer
    from dsv4jax.train.corpus import build_corpus

    arrays = [corpus / "train.npy", corpus / "heldout.npy"]
    if not (all(p.exists() for p in arrays) and (corpus / "tokenizer.json").exists()):
        if not (corpus / "train.txt").exists():
            build_corpus(corpus, include_tests=include_tests)
        if not (corpus / "tokenizer.json").exists():
            train_tokenizer([corpus / "train.txt"], vocab_size, corpus / "tokenizer.json")
        tokenizer = JsonTokenizer(corpus / "tokenizer.json")
        for split, path in zip(("train", "heldout"), arrays):
            if not path.exists():
                ids = tokenizer.encode((corpus / f"{split}.txt").read_text(encoding="utf-8"))
                np.save(path, np.asarray(ids, np.uint16))
    return tuple(np.load(p).astype(np.int32) for p in arrays)


def _commit() -> str:
    """DSV4JAX_COMMIT where the caller sets it (a copy of the tree without .git), else git here."""
    import subprocess

    if os.environ.get("DSV4JAX_COMMIT"):
        return os.environ["DSV4JAX_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model config.json")
    parser.add_argument("--data", required=True, help="corpus directory")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, history, summary)")
    parser.add_argument("--steps", type=int, default=1000, help="steps (the most, with --time-budget)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training (compilation included): the step count is set to what fits")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--mtp-weight", type=float, default=0.3)
    parser.add_argument("--bias-update-rate", type=float, default=1e-3, help="γ of the MoE bias balancing")
    parser.add_argument("--qat", action="store_true", help="train through the FP8/FP4 formats (implies --quantize)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--corpus-tests", action="store_true",
                        help="when building the corpus, include the stdlib's test suite and tools")
    parser.add_argument("--kernels", default="reference", choices=("reference", "auto"),
                        help="kernel implementation (the Pallas kernels have no backward pass)")
    parser.add_argument("--log-every", type=int, default=0, help="print a line every N steps (0: progress bar)")
    parser.add_argument("--export", default=None, help="write the trained model here (official format)")
    parser.add_argument("--quantize", action="store_true", help="export FP8 linears and FP4 experts (ARCHITECTURE §10.1)")
    parser.add_argument("--eval-windows", type=int, default=None, help="at most this many held-out windows")
    parser.add_argument("--jax-config", action="append", default=[], metavar="NAME=VALUE",
                        help="jax.config option, e.g. jax_ragged_dot_use_ragged_dot_instruction=false (repeatable)")
    compilation_cache.add_argument(parser)
    args = parser.parse_args(argv)

    launched = time.perf_counter()
    import jax

    try:
        compilation_cache.enable(args.compilation_cache)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    for option in args.jax_config:
        name, _, value = option.partition("=")
        jax.config.update(name, {"true": True, "false": False}.get(value.lower(), value))

    from dsv4jax.config import ConfigError, load_config
    from dsv4jax.train.loop import Trainer, TrainConfig, batch_at, train

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    corpus, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens, heldout_tokens = _tokens(corpus, config.vocab_size, args.corpus_tests)
    settings = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                           min_learning_rate_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                           mtp_weight=args.mtp_weight, bias_update_rate=args.bias_update_rate, qat=args.qat,
                           seed=args.seed, checkpoint_every=args.checkpoint_every, kernels=args.kernels)
    trainer = Trainer(config, settings)

    def log(row):
        history_file.write(json.dumps(row) + "\n")
        if args.log_every and (row["step"] % args.log_every == 0 or row["step"] == 1):
            print(f"[{time.perf_counter() - launched:.0f}s] step {row['step']}/{trainer.train.steps} loss {row['main_loss']:.4f} mtp {row['mtp_loss']:.4f} "
                  f"maxvio {row['max_violation']:.3f} lr {row['learning_rate']:.2e} "
                  f"tok/s {row['tokens_per_s']:.0f}", flush=True)

    start = time.perf_counter()
    if args.log_every:  # the first step line comes after compilation
        print(f"[{start - launched:.0f}s] {len(train_tokens)} training tokens; building the train state", flush=True)
    with open(out / "history.jsonl", "a") as history_file:
        state, history = train(trainer, train_tokens, out / "checkpoints", progress=not args.log_every, log=log,
                               time_budget=args.time_budget,
                               announce=(lambda text: print(f"[{time.perf_counter() - launched:.0f}s] {text}",
                                                            flush=True)) if args.log_every else None)
    seconds = time.perf_counter() - start
    steps = int(state["step"])
    tail = history[-20:]
    summary = {
        "config": args.config, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "commit": _commit(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "parameters": int(sum(np.prod(p.shape) for p in jax.tree.leaves(state["params"]))),
        "train": {**dataclasses.asdict(trainer.train), "time_budget": args.time_budget},
        "corpus": {**(json.loads((corpus / "manifest.json").read_text()) if (corpus / "manifest.json").exists()
                      else {}), "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(heldout_tokens))},
        "steps": steps, "steps_this_run": len(history),
        "tokens_seen": steps * args.batch_size * args.seq_len,
        "seconds": seconds,
        "tokens_per_s_median": statistics.median(h["tokens_per_s"] for h in history[1:]) if len(history) > 1
        else None,
        "final_train_loss": statistics.mean(h["main_loss"] for h in tail) if tail else None,
        "final_mtp_loss": statistics.mean(h["mtp_loss"] for h in tail) if tail else None,
        "final_max_violation": statistics.mean(h["max_violation"] for h in tail) if tail else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.export:
        from dsv4jax.checkpoint.loader import load_model
        from dsv4jax.checkpoint.writer import save_checkpoint
        from dsv4jax.tokenizer import write_hf_tokenizer
        from dsv4jax.train.evaluate import evaluate, evaluate_windows

        export = Path(args.export)
        quantize = args.quantize or args.qat
        save_checkpoint(trainer.model(state), export, quantize=quantize)
        # tokenizer.json with BOS in its post-processor, and tokenizer_config.json: Hugging Face tokenizers loaded
        # from the export count tokens as the server does (SERVING §E).
        write_hf_tokenizer(corpus / "tokenizer.json", export, config.bos_token_id, config.eos_token_id,
                           config.max_position_embeddings)
        summary["export"] = {"path": str(export), "quantized": quantize,
                             "bytes": sum(f.stat().st_size for f in export.iterdir())}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        # Score what ships: the exported checkpoint as the loader reads it, in fp32.
        shipped = load_model(export, dtype="float32", progress=False)
        if args.log_every:
            print(f"[{time.perf_counter() - launched:.0f}s] exported; scoring the shipped checkpoint", flush=True)
        begin = time.perf_counter()
        heldout = evaluate(shipped, heldout_tokens, args.seq_len, limit=args.eval_windows, kernels=args.kernels)
        sample = batch_at(train_tokens, 1 << 30, heldout["windows"], args.seq_len, args.seed)
        train_sample = evaluate_windows(shipped, sample, kernels=args.kernels)
        summary["heldout"] = heldout
        summary["heldout_loss"] = heldout["loss"]
        summary["heldout_perplexity"] = heldout["perplexity"]
        summary["train_sample"] = train_sample  # the same measure on as many training windows
        if "mtp_acceptance" in heldout:
            summary["mtp_acceptance_1step"] = heldout["mtp_acceptance"]["rate"]
        summary["eval_seconds"] = time.perf_counter() - begin
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("train", "corpus")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
