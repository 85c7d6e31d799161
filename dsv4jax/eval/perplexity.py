"""Perplexity of a token stream with its full causal context: the text goes through chunked prefill, so
every token is scored against everything before it (the window plus compressed rows), not a fixed window."""

from __future__ import annotations

import math

import numpy as np

from dsv4jax.eval.scoring import token_logprobs
from dsv4jax.model import init_state


def perplexity(model, tokens, chunk: int = 512, mesh=None, kernels: str = "auto") -> dict:
    """tokens: text or ids (text gets BOS first). Returns the scored token count, mean NLL and perplexity.
    `mesh`: None (one device) or a mesh spec (dp=1; each chunk is split over cp); `kernels` as in `Model.runner`."""
    ids = model.encode(tokens)
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    runner = model.runner(mesh, kernels)
    runner.check_batch(1)
    runner.check_chunk(chunk)
    params = runner.place_params(model.params)
    state = runner.place_state(init_state(model.config, 1, -(-len(ids) // chunk) * chunk))
    total = 0.0
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        padded = np.zeros((1, chunk), np.int32)
        padded[0, :len(piece)] = piece
        following = ids[start + 1:start + chunk + 1]  # each position predicts the next token
        targets = np.zeros((1, chunk), np.int32)
        targets[0, :len(following)] = following
        scored = np.arange(chunk)[None] < len(following)
        chosen, _, state = token_logprobs(runner, params, state, padded, np.array([len(piece)], np.int32), targets)
        total -= float(np.sum(np.asarray(chosen, np.float64)[scored]))
    count = len(ids) - 1
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}
