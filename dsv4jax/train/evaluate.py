"""Held-out figures of a trained model: next-token loss over fixed windows (the training loss's own measure), and
the greedy acceptance of one MTP draft step.

Acceptance, teacher-forced: at position t the MTP module drafts token t+2 from the main streams at t and the
true token t+1 (ARCHITECTURE §12.1); the draft is accepted when it equals the target's greedy choice at t+1
(argmax of the main logits there). Positions t = 0 … L−2 of each window count. With one draft step, the mean
accepted length per target step is 1 + rate.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.run import Runner


def windows(tokens: np.ndarray, seq_len: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows [N, seq_len + 1] (each window's last token is the next one's first)."""
    count = (len(tokens) - 1) // seq_len
    if limit is not None:
        count = min(count, limit)
    return np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _window_stats(runner: Runner, config, params, batch):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    size, length = inputs.shape
    hidden, streams, _ = runner.target(params, init_state(config, size, length), inputs, None)
    logprobs = jax.nn.log_softmax(runner.logits(params, hidden), axis=-1)
    nll = -jnp.sum(jnp.take_along_axis(logprobs, targets[..., None], axis=-1))
    greedy = jnp.argmax(logprobs, axis=-1)  # at p: the target's choice for token p+1
    if not config.num_mtp_layers:
        return nll, jnp.zeros((), jnp.int32)
    mtp_hidden, _, _ = runner.mtp(params, init_state(config, size, length, mtp=True), streams, targets, None)
    draft = jnp.argmax(runner.logits(params, mtp_hidden), axis=-1)  # at t: the draft of token t+2
    return nll, jnp.sum(draft[:, :-1] == greedy[:, 1:])


def evaluate(model: DeepseekV4, tokens: np.ndarray, seq_len: int, batch_size: int = 16,
             limit: int | None = None, kernels: str = "auto") -> dict:
    """Mean NLL / perplexity over windows of seq_len (whole batches of them), and the 1-step MTP acceptance;
    `kernels` as in `dsv4jax.run.Runner`."""
    data = windows(tokens, seq_len, limit)
    if len(data) > batch_size:  # whole batches only: one compiled shape
        data = data[:len(data) // batch_size * batch_size]
    return evaluate_windows(model, data, batch_size, kernels)


def evaluate_windows(model: DeepseekV4, data: np.ndarray, batch_size: int = 16, kernels: str = "auto") -> dict:
    """`evaluate` on given windows [N, L+1]."""
    graphdef, params = nnx.split(model)
    runner = Runner(graphdef, kernels=kernels)
    seq_len = data.shape[1] - 1
    total_nll, accepted = 0.0, 0
    for start in range(0, len(data), batch_size):
        nll, hits = _window_stats(runner, model.config, params, jnp.asarray(data[start:start + batch_size]))
        total_nll += float(nll)
        accepted += int(hits)
    scored = data.shape[0] * seq_len
    result = {"windows": int(data.shape[0]), "seq_len": seq_len, "tokens": int(scored),
              "loss": total_nll / scored, "perplexity": math.exp(total_nll / scored)}
    if model.config.num_mtp_layers:
        drafts = data.shape[0] * (seq_len - 1)
        result["mtp_acceptance"] = {"draft_steps": 1, "drafts": int(drafts), "accepted": accepted,
                                    "rate": accepted / drafts, "mean_accepted_length": 1 + accepted / drafts}
    return result
