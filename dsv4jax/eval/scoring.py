"""Per-token log-probabilities of a chunk, the quantity every evaluation adds up."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv4jax.run import Runner


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(runner: Runner, params, state, ids, num_new, targets):
    """A chunk ids [B,S] (num_new [B] real) on top of `state`: (log p(targets) [B,S] fp32, whether each target is
    the argmax [B,S], the new state)."""
    hidden, _, state = runner.target(params, state, ids, num_new)
    logprobs = jax.nn.log_softmax(runner.logits(params, hidden), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logprobs, axis=-1) == targets, state
