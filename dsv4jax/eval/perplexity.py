"""Perplexity of a token stream with its full causal context: the text goes through chunked prefill, so
every token is scored against everything before it (the window plus compressed rows), not a fixed window."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.model import init_state
from dsv4jax.run import forward_fn


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk_nll(graphdef, params, state, ids, num_new, targets, scored):
    logits, _, state = forward_fn(graphdef, params, state, ids, num_new)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(scored, chosen, 0.0)), state


def perplexity(model, tokens, chunk: int = 512) -> dict:
    """tokens: text or ids (text gets BOS first). Returns the scored token count, mean NLL and perplexity."""
    ids = model.encode(tokens)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    state = init_state(model.config, 1, -(-len(ids) // chunk) * chunk)
    total = 0.0
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        padded = np.zeros((1, chunk), np.int32)
        padded[0, :len(piece)] = piece
        following = ids[start + 1:start + chunk + 1]  # each position predicts the next token
        targets = np.zeros((1, chunk), np.int32)
        targets[0, :len(following)] = following
        scored = np.arange(chunk)[None] < len(following)
        nll, state = _chunk_nll(model.graphdef, model.params, state, jnp.asarray(padded),
                                jnp.array([len(piece)], jnp.int32), jnp.asarray(targets), jnp.asarray(scored))
        total += float(nll)
    count = len(ids) - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}
