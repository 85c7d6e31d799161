"""Log-likelihood of continuations given contexts, the quantity lm-evaluation-harness asks for (SERVING §E).

Pairs are sorted into length buckets and run in fixed-size batches with right padding: every batch of a bucket
has the same shape, so each bucket compiles once, and padding rows and tokens never change a real result (the
model's state is per sequence and padded positions are never visible).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsv4jax.eval.buckets import batches_by_length
from dsv4jax.eval.scoring import token_logprobs
from dsv4jax.model import init_state


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    logprob: float  # Σ log p(continuation token | everything before it)
    is_greedy: bool  # every continuation token is the argmax at its position


def _pair(model, context, continuation) -> tuple[list[int], list[int]]:
    context = model.encode(context) if isinstance(context, str) or context else [model.config.bos_token_id]
    continuation = (model.tokenizer.encode(continuation) if isinstance(continuation, str)
                    else [int(t) for t in continuation])
    if not continuation:
        raise ValueError("a continuation needs at least one token")
    return context, continuation


def loglikelihood(model, pairs, batch_size: int = 8, pad_id: int = 0, mesh=None,
                  kernels: str = "auto") -> list[LoglikResult]:
    """`pairs`: (context, continuation), each text or token ids. Results come back in the order given.

    `pad_id` fills padding rows and positions; it cannot change any result (tested). `mesh`: None (one device)
    or a mesh spec such as "cp=2,tp=2,ep=2" (batch_size a multiple of dp); `kernels` as in `Model.runner`."""
    runner = model.runner(mesh, kernels)
    runner.check_batch(batch_size)
    params = runner.place_params(model.params)
    encoded = [_pair(model, c, x) for c, x in pairs]
    lengths = [len(c) + len(x) for c, x in encoded]
    results: list[LoglikResult | None] = [None] * len(encoded)
    for width, members in batches_by_length(lengths, batch_size):
        ids = np.full((batch_size, width), pad_id, np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        scored = np.zeros((batch_size, width), bool)
        real = np.zeros((batch_size,), np.int32)
        for row, item in enumerate(members):
            context, continuation = encoded[item]
            sequence = context + continuation
            ids[row, :len(sequence)] = sequence
            # Position p predicts token p+1: the continuation's tokens are predicted from len(context)-1 on.
            targets[row, :len(sequence) - 1] = sequence[1:]
            scored[row, len(context) - 1:len(sequence) - 1] = True
            real[row] = len(sequence)
        runner.check_chunk(width, "a batch")
        state = runner.place_state(init_state(model.config, batch_size, width))
        chosen, greedy, _ = token_logprobs(runner, params, state, ids, real, targets)
        chosen, greedy = np.asarray(chosen, np.float64), np.asarray(greedy)
        for row, item in enumerate(members):
            mask = scored[row]
            results[item] = LoglikResult(float(np.sum(chosen[row][mask])), bool(np.all(greedy[row][mask])))
    return results
