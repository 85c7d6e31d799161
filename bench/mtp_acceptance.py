"""MTP speculative-decoding acceptance of a trained model (default `models/dsv4-tiny`) on held-out text, through
the serving engine, greedy, fp32; runs on CPU in a few minutes. Writes bench/results/mtp-acceptance-<model>.json.

    python3 bench/mtp_acceptance.py [--model models/dsv4-tiny] [--heldout tmp/gpu-corpus/heldout.npy]
                                    [--prompts 16] [--prompt 256] [--tokens 64] [--speculative 0 1 2 3]

Prompts: `--prompts` windows of `--prompt` held-out tokens at evenly spaced offsets, taken as they are (the
training batches and the held-out evaluation slice the token stream without a BOS, dsv4jax/train/loop.py
`batch_at`, dsv4jax/train/evaluate.py `windows`). All prompts go to one engine together; each gets `--tokens`
greedy tokens (ignore_eos) with speculative_steps = 0, 1, 2, 3, a fresh engine per value.

Per steps value, from the engine's counters (as bench/engine.py): mean acceptance length = tokens committed per
verify round = (accepted + rounds) / rounds, and acceptance rate = accepted / drafted. Speculation must leave the
greedy output unchanged, so the outputs of 1–3 steps are compared with those of 0 steps, prompt by prompt. The
counters include the last round of each request, whose accepted drafts may run past max_tokens and be dropped;
`kept_tokens_per_round` (decode tokens kept / rounds) leaves those out.

Two teacher-forced figures sit beside them (a full forward, no engine), the measure `python -m dsv4jax.train
--export` reports as "mtp_acceptance": at position t the MTP head drafts token t+2 from the main streams at t and
the *given* token t+1; a hit is the draft equal to the target's argmax at t+1. Every position counts, whether or
not the previous draft was right. In free generation the engine instead drafts a chain of k tokens from the
model's *own* tokens (draft i from drafts 1..i−1) and keeps only the leading run of hits: drafts after the first
miss count as drafted, never as accepted, and the next round starts after the kept tokens, so positions inside
an accepted run get no 1-step draft of their own. Hence:
- `teacher_forced_heldout`: on the prompt windows of held-out text (the training CLI's figure on these windows;
  its figure over its own 512-token windows is copied from --train-summary when that file exists);
- `teacher_forced_own_output`: on prompt + the plain greedy output, counting only the generated span. Here the
  given token t+1 is the model's own greedy choice, so this is the per-position rate behind the engine's 1-step
  acceptance (the two differ only in which positions are sampled). It also checks the engine's plain greedy
  tokens against the full forward's argmax (`forward_argmax_agreement`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import dsv4jax  # noqa: E402
from bench.common import write_results  # noqa: E402
from dsv4jax.model import init_state  # noqa: E402
from dsv4jax.serve.engine import Engine, EngineConfig  # noqa: E402
from dsv4jax.serve.sampling import SamplingParams  # noqa: E402
from dsv4jax.train.evaluate import evaluate_windows  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt_offsets(length: int, count: int, prompt: int) -> list[int]:
    """Evenly spaced starts, each leaving room for the window and its next token (for the teacher-forced score)."""
    return np.linspace(0, length - prompt - 1, count).astype(int).tolist()


def generate(model, prompts: list[list[int]], tokens: int, steps: int) -> tuple[list[list[int]], dict, float]:
    """All prompts through one fresh engine: (outputs, counter deltas, seconds of generation after compiling)."""
    rows, length = len(prompts), max(map(len, prompts))
    engine = Engine(model, EngineConfig(
        max_running_requests=rows, max_model_len=length + tokens, page_tokens=128, prefill_chunk=length,
        prefill_buckets=(length,), max_prefill_rows=rows, prefill_row_buckets=(rows,), decode_buckets=(rows,),
        speculative_steps=steps, prompt_logprobs=False))
    engine.warmup()  # compile first, so the timing below is generation only
    before = dict(engine.counters)
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    seconds = time.perf_counter() - start
    return [c.token_ids for c in outputs], {k: v - before[k] for k, v in engine.counters.items()}, seconds


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forced(graphdef, params, ids):
    """Full forward over ids [b, S]: the target's argmax at each position (its choice for the next token) and the
    MTP draft at each position t (of token t+2, given token t+1 = ids[t+1]), as in dsv4jax.train.evaluate."""
    model = nnx.merge(graphdef, params)
    size, length = ids.shape
    following = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)  # last one feeds no counted draft
    hidden, streams, _ = model(ids, init_state(model.config, size, length))
    mtp_hidden, _, _ = model.mtp_forward(streams, following, init_state(model.config, size, length, mtp=True))
    return jnp.argmax(model.logits(hidden), axis=-1), jnp.argmax(model.logits(mtp_hidden), axis=-1)


def own_output_score(model, prompts: list[list[int]], outputs: list[list[int]]) -> dict:
    """Teacher-forced figures on prompt + plain greedy output, over the generated span only."""
    seqs = np.asarray([p + o for p, o in zip(prompts, outputs)], np.int32)
    plen = len(prompts[0])
    graphdef, params = nnx.split(model.module)
    greedy, draft = jax.device_get(_forced(graphdef, params, jnp.asarray(seqs)))
    # Generated tokens are seqs[:, P:]; the forward's choice for token p+1 is greedy[:, p].
    agree = greedy[:, plen - 1:-1] == seqs[:, plen:]
    # The first engine round drafts token P+1 at t = P−1 from the first generated token; the last countable
    # draft is of the last generated token.
    hits = draft[:, plen - 1:-2] == greedy[:, plen:-1]
    return {"forward_argmax_agreement": float(agree.mean()), "forward_argmax_mismatches": int((~agree).sum()),
            "drafts": int(hits.size), "accepted": int(hits.sum()), "rate": float(hits.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "dsv4-tiny"))
    parser.add_argument("--heldout", default=os.path.join(ROOT, "tmp", "gpu-corpus", "heldout.npy"))
    parser.add_argument("--train-summary", default=os.path.join(ROOT, "tmp", "train-run", "summary.json"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--speculative", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    assert args.speculative[0] == 0, "the first value must be 0: the plain greedy output the others are checked on"

    began = time.perf_counter()
    model = dsv4jax.load(args.model, dtype="float32", progress=False)
    heldout = np.load(args.heldout).astype(np.int32)
    starts = prompt_offsets(len(heldout), args.prompts, args.prompt)
    prompts = [heldout[s:s + args.prompt].tolist() for s in starts]
    name = args.name or f"mtp-acceptance-{os.path.basename(os.path.normpath(args.model))}"
    config = {**vars(args), "offsets": starts, "heldout_tokens": len(heldout), "bos": False}

    windows = np.stack([heldout[s:s + args.prompt + 1] for s in starts])
    heldout_score = evaluate_windows(model.module, windows, batch_size=len(windows))
    extra = {"teacher_forced_heldout": {k: heldout_score[k] for k in ("windows", "seq_len", "loss", "perplexity")}
             | heldout_score["mtp_acceptance"]}
    if os.path.exists(args.train_summary):
        summary = json.loads(open(args.train_summary).read())
        extra["training_cli_heldout"] = {"source": args.train_summary, "windows": summary["heldout"]["windows"],
                                         "seq_len": summary["heldout"]["seq_len"],
                                         **summary["heldout"].get("mtp_acceptance", {})}

    records, plain = [], None
    for steps in args.speculative:
        outputs, counters, seconds = generate(model, prompts, args.tokens, steps)
        if plain is None:
            plain = outputs
            extra["teacher_forced_own_output"] = own_output_score(model, prompts, plain)
        rounds, accepted, drafted = (counters[k] for k in ("speculative_rounds", "accepted_tokens", "drafted_tokens"))
        # The first position where each prompt's output leaves the plain greedy one (None: identical).
        first_diff = [None if o == p else next((i for i, (a, b) in enumerate(zip(o, p)) if a != b),
                                               min(len(o), len(p))) for o, p in zip(outputs, plain)]
        mismatched = [i for i, d in enumerate(first_diff) if d is not None]
        records.append({
            "speculative_steps": steps, "prompts": len(prompts), "output_tokens": sum(map(len, outputs)),
            "rounds": rounds, "drafted_tokens": drafted, "accepted_tokens": accepted,
            "mean_acceptance_length": (accepted + rounds) / rounds if rounds else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            # Without what the last rounds accepted past max_tokens: decode tokens kept per round.
            "kept_tokens_per_round": (sum(map(len, outputs)) - len(prompts)) / rounds if rounds else None,
            "same_as_plain_greedy": not mismatched, "mismatched_prompts": len(mismatched),
            "first_mismatch": {str(i): first_diff[i] for i in mismatched}, "generate_s": seconds})
        print({k: v for k, v in records[-1].items() if k != "first_mismatch"}, flush=True)
        write_results(name, config, records, extra)

    print(f"\n{args.prompts} prompts × {args.prompt} held-out tokens, {args.tokens} greedy tokens each, fp32, "
          f"{jax.devices()[0].platform}; {time.perf_counter() - began:.0f} s in all")
    print(f"{'steps':>5} {'accept len':>10} {'kept/round':>10} {'accept rate':>11} {'tokens':>6} {'rounds':>6} "
          f"{'= plain greedy':>15}")
    for r in records:
        length = f"{r['mean_acceptance_length']:.3f}" if r["rounds"] else "-"
        kept = f"{r['kept_tokens_per_round']:.3f}" if r["rounds"] else "-"
        rate = f"{r['acceptance_rate']:.3f}" if r["drafted_tokens"] else "-"
        same = "yes" if r["same_as_plain_greedy"] else f"no ({r['mismatched_prompts']} prompts)"
        print(f"{r['speculative_steps']:>5} {length:>10} {kept:>10} {rate:>11} {r['output_tokens']:>6} "
              f"{r['rounds']:>6} {same:>15}")
    own, forced = extra["teacher_forced_own_output"], extra["teacher_forced_heldout"]
    print(f"teacher-forced 1-step rate: own greedy output {own['rate']:.3f} ({own['drafts']} drafts), held-out "
          f"prompts {forced['rate']:.3f}" + (f", training CLI {extra['training_cli_heldout']['rate']:.3f}"
                                             if "training_cli_heldout" in extra else ""))
    print(f"engine plain greedy vs full-forward argmax: {own['forward_argmax_agreement']:.4f} "
          f"({own['forward_argmax_mismatches']} mismatches)")
    print(f"wrote {os.path.join('bench', 'results', name + '.json')}")


if __name__ == "__main__":
    main()
