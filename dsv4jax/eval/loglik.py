"""Log-likelihood of continuations given contexts, the quantity lm-evaluation-harness asks for (SERVING.md §E).

Pairs are sorted into length buckets and run in fixed-size batches with right padding: every batch of a bucket
has the same shape, so each bucket compiles once, and padding rows and tokens never change a real result (the
model's state is per sequence and padded positions are never visible).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.eval.buckets import batches_by_length
from dsv4jax.model import init_state
from dsv4jax.run import forward_fn


@dataclasses.dataclass(frozen=True)
class LoglikResult:
    logprob: float  # Σ log p(continuation token | everything before it)
    is_greedy: bool  # every continuation token is the argmax at its position


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, params, state, ids, lengths, targets, scored):
    """Per row: Σ log p(targets) over `scored` positions, and whether every scored target is the argmax."""
    logits, _, _ = forward_fn(graphdef, params, state, ids, lengths)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(jnp.where(scored, chosen, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


def _pair(model, context, continuation) -> tuple[list[int], list[int]]:
    context = model.encode(context) if isinstance(context, str) or context else [model.config.bos_token_id]
    continuation = (model.tokenizer.encode(continuation) if isinstance(continuation, str)
                    else [int(t) for t in continuation])
    if not continuation:
        raise ValueError("a continuation needs at least one token")
    return context, continuation


def loglikelihood(model, pairs, batch_size: int = 8, pad_id: int = 0) -> list[LoglikResult]:
    """`pairs`: (context, continuation), each text or token ids. Results come back in the order given.

    `pad_id` fills padding rows and positions; it cannot change any result (tested)."""
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
        state = init_state(model.config, batch_size, width)
        logprob, greedy = _score(model.graphdef, model.params, state, jnp.asarray(ids), jnp.asarray(real),
                                 jnp.asarray(targets), jnp.asarray(scored))
        for row, item in enumerate(members):
            results[item] = LoglikResult(float(logprob[row]), bool(greedy[row]))
    return results
