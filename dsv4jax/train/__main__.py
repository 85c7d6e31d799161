"""`python -m dsv4jax.train --config CONFIG --data CORPUS_DIR --steps N --out RUN_DIR [--export MODEL_DIR]`.

CORPUS_DIR holds train.txt / heldout.txt (see `dsv4jax.train.corpus`; built there if missing) and, once made,
tokenizer.json and the token arrays. Checkpoints go to RUN_DIR/checkpoints (a rerun resumes), the loss history to
RUN_DIR/history.jsonl; --export writes the trained model in the official checkpoint format with its tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np


def _tokens(corpus: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    from dsv4jax.tokenizer import JsonTokenizer
    from dsv4jax.train.bpe import train_tokenizer
    from dsv4jax.train.corpus import build_corpus

    if not (corpus / "train.txt").exists():
        build_corpus(corpus)
    if not (corpus / "tokenizer.json").exists():
        train_tokenizer([corpus / "train.txt"], vocab_size, corpus / "tokenizer.json")
    tokenizer = JsonTokenizer(corpus / "tokenizer.json")
    arrays = []
    for split in ("train", "heldout"):
        path = corpus / f"{split}.npy"
        if not path.exists():
            np.save(path, np.asarray(tokenizer.encode((corpus / f"{split}.txt").read_text()), np.uint16))
        arrays.append(np.load(path).astype(np.int32))
    return arrays[0], arrays[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="model config.json")
    parser.add_argument("--data", required=True, help="corpus directory")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, history)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--mtp-weight", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", default=None, help="write the trained model here (official format)")
    args = parser.parse_args(argv)

    from dsv4jax.config import ConfigError, load_config
    from dsv4jax.eval.perplexity import perplexity
    from dsv4jax.train.loop import Trainer, TrainConfig, train

    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    corpus, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokens, heldout_tokens = _tokens(corpus, config.vocab_size)
    trainer = Trainer(config, TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                          learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                                          mtp_weight=args.mtp_weight, seed=args.seed))
    start = time.perf_counter()
    with open(out / "history.jsonl", "a") as history_file:
        state, history = train(trainer, train_tokens, out / "checkpoints",
                               log=lambda row: history_file.write(json.dumps(row) + "\n"))
    seconds = time.perf_counter() - start
    summary = {"steps": args.steps, "tokens_seen": args.steps * args.batch_size * args.seq_len, "seconds": seconds,
               "final_train_loss": history[-1]["main_loss"] if history else None}
    if args.export:
        from dsv4jax.api import Model
        from dsv4jax.checkpoint.writer import save_checkpoint

        export = Path(args.export)
        model = trainer.model(state)
        save_checkpoint(model, export)
        shutil.copy(corpus / "tokenizer.json", export / "tokenizer.json")
        wrapped = Model(model, name=export.name)
        heldout = perplexity(wrapped, heldout_tokens[:4096].tolist(), chunk=512)
        summary["heldout"] = heldout
        summary["heldout_perplexity"] = math.exp(heldout["nll"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
