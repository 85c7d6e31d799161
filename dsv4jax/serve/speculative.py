"""MTP speculative decoding (PARALLELISM §5): an EAGLE-style top-1 chain of k drafts from the MTP head,
one target forward that verifies the k+1 tokens, acceptance, and the MTP draft-extend over what was accepted.

Invariants between steps, per sequence of committed length L (the target has processed positions < L, and
`pending` = x_L is sampled but not yet processed): the MTP module has processed the pairs (h_t, x_{t+1}) for
t < L−1, and `last_streams` holds the target streams h_{L−1}. A step then
1. drafts d_1..d_k: MTP at position L−1 on (h_{L−1}, x_L), then at L, L+1, … on its own output streams and the
   previous draft (the chain's first position uses only true inputs, so it is kept);
2. verifies [x_L, d_1..d_k] at positions L..L+k in one target forward (per-token context lengths follow from
   the positions, ARCHITECTURE §8.3: nothing is shaped per batch);
3. accepts a leading run of a drafts and emits a+1 tokens (the drafts and one token from the target);
4. draft-extends: the MTP processes (h_t, x_{t+1}) for t = L..L+a−1 with the verify streams, restoring the
   invariant at L' = L+1+a.
Rejected positions were written into rings with `speculative_steps` slots of slack and into rows that only
later positions can see, and the step simply records L' as the slot's length (`EngineCaches.lengths`):
committed state is never touched.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4jax.serve import sampling
from dsv4jax.serve.cache import EngineCaches, gather_slots, scatter_slots
from dsv4jax.serve.sampling import SamplingRows
from dsv4jax.run import Runner
from dsv4jax.serve.steps import Batch, advance, emitted, from_device, penalty_rows, record_tokens


def _sample_probs(probs: jax.Array, keys: jax.Array) -> jax.Array:
    """One sample per row of probs [b, V] (rows need not be normalised). Gumbel-max on log-probabilities."""
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, probs.shape[-1:], jnp.float32))(keys)
    return jnp.argmax(jnp.log(probs) + gumbel, axis=-1).astype(jnp.int32)


def accept(drafts: jax.Array, draft_probs: jax.Array, target_probs: jax.Array, rows: SamplingRows,
           first_position: jax.Array):
    """Speculative acceptance that leaves the output distribution exactly the target's.

    drafts [b, k] sampled from draft_probs [b, k, V]; target_probs [b, k+1, V] the target's distribution at
    each verified position; the token after d_i is at position first_position + i. Draft d_{i+1} is kept with
    probability min(1, p_i(d)/q_i(d)); at the first rejection the token comes from the residual
    max(p − q, 0), and if all k are kept, from p_k. Greedy rows have one-hot p and q, so this reduces to
    "keep while the draft equals the target's argmax". Returns (tokens [b, k+1], accepted count a [b]);
    tokens[:, :a+1] are emitted.
    """
    k = drafts.shape[1]
    positions = first_position[:, None] + jnp.arange(k + 1)
    p_draft = jnp.take_along_axis(target_probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(lambda p: jax.vmap(lambda key: jax.random.uniform(key))(
        sampling.position_keys(rows, p, sampling.ACCEPT)), in_axes=1, out_axes=1)(positions[:, :k])
    keep = uniform * q_draft < p_draft
    accepted = jnp.sum(jnp.cumprod(keep.astype(jnp.int32), axis=1), axis=1)  # leading run

    p_at = jnp.take_along_axis(target_probs, accepted[:, None, None], axis=1)[:, 0]
    q_at = jnp.take_along_axis(jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1),
                               accepted[:, None, None], axis=1)[:, 0]  # zeros after the last draft: p_k itself
    residual = jnp.maximum(p_at - q_at, 0.0)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_at)
    at = jnp.take_along_axis(positions, accepted[:, None], axis=1)[:, 0]
    last = _sample_probs(residual, sampling.position_keys(rows, at, sampling.RESIDUAL))
    tokens = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    tokens = jnp.where(jnp.arange(k + 1) == accepted[:, None], last[:, None], tokens)
    return tokens, accepted


def speculative_step(runner: Runner, params, caches: EngineCaches, batch: Batch, active, steps: int):
    """One round for each active row from its pending x_L (the caches hold it, and L). Returns caches and the
    emitted tokens (a+1 each)."""
    ids, batch = from_device(caches, batch)
    slots, starts, rows = batch.slots, batch.starts, batch.sampling
    one = active.astype(jnp.int32)
    batch_index = jnp.arange(ids.shape[0])
    counts, seen = penalty_rows(caches, slots)

    def distribution(logits, counts, seen):
        filtered = sampling.filtered_logits(sampling.apply_penalties(logits, rows, counts, seen), rows)
        return filtered, sampling.distribution(filtered, rows)

    # 1. Draft chain.
    mtp_state = gather_slots(caches.mtp, slots, starts - 1, batch.tables)
    streams, token = caches.last_streams[slots][:, None], ids
    drafts, draft_probs, history = [], [], [(counts, seen)]
    for i in range(steps):
        hidden, streams, mtp_state = runner.mtp(params, mtp_state, streams, token[:, None], one, prefill=False)
        filtered, probs = distribution(runner.logits(params, hidden[:, 0]), counts, seen)
        token = sampling.choose(filtered, rows, sampling.position_keys(rows, starts + 1 + i, sampling.DRAFT))
        drafts.append(token)
        draft_probs.append(probs)
        counts = counts.at[batch_index, token].add(1)
        seen = seen.at[batch_index, token].set(True)
        history.append((counts, seen))
    drafts = jnp.stack(drafts, axis=1)

    # 2. Verify the k+1 tokens in one target forward.
    state = gather_slots(caches.target, slots, starts, batch.tables)
    verify_ids = jnp.concatenate([ids[:, None], drafts], axis=1)
    hidden, target_streams, state = runner.target(params, state, verify_ids, one * (steps + 1), prefill=False)
    caches = dataclasses.replace(caches, target=scatter_slots(caches.target, state, slots))
    logits = runner.logits(params, hidden)  # [b, k+1, V]
    target_probs = jnp.stack([distribution(logits[:, i], *history[i])[1] for i in range(steps + 1)], axis=1)

    # 3. Accept.
    tokens, accepted = accept(drafts, jnp.stack(draft_probs, axis=1), target_probs, rows, starts + 1)
    count = (accepted + 1) * one
    caches = record_tokens(caches, slots, tokens, jnp.arange(steps + 1) < count[:, None])

    # 4. Draft-extend over the accepted positions L..L+a−1, from the chain's state (its writes past L−1 are
    # invisible once the length is reset to L).
    mtp_state = dataclasses.replace(mtp_state, lengths=starts)
    _, _, mtp_state = runner.mtp(params, mtp_state, target_streams[:, :steps], tokens[:, :steps], accepted * one,
                                prefill=False)
    last_streams = jnp.take_along_axis(target_streams, accepted[:, None, None, None], axis=1)[:, 0]
    caches = dataclasses.replace(caches, mtp=scatter_slots(caches.mtp, mtp_state, slots),
                                 last_streams=caches.last_streams.at[slots].set(
                                     jnp.where(active[:, None, None], last_streams, caches.last_streams[slots])))
    caches = advance(caches, slots, starts, tokens, count)
    return caches, emitted(logits, tokens, count)
