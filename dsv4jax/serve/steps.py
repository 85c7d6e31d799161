"""The engine's device steps, pure functions of (params, caches, batch, inputs) jitted once per shape bucket: a
prefill chunk, a plain decode step (speculative decoding is in speculative.py). They reach the model through the
engine's `Runner` (dsv4jax/run.py): on one device, or over a mesh.

A batch is a bucket of rows naming cache slots; padding rows name the scratch slot and process no tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from dsv4jax.model.state import pytree_dataclass
from dsv4jax.run import Runner, last_real
from dsv4jax.serve import sampling
from dsv4jax.serve.cache import EngineCaches, gather_slots, restore_snapshots, scatter_slots, take_snapshots
from dsv4jax.serve.sampling import SamplingRows


@pytree_dataclass
class Batch:
    slots: jax.Array  # [b] int32 cache slot of each row
    starts: jax.Array  # [b] int32 tokens the target has processed (prefill: the chunk's first position; decode
    # steps read them from the caches instead, see `from_device`)
    tables: jax.Array  # [b, pages_per_sequence] int32 page tables
    sampling: SamplingRows


@pytree_dataclass
class Emitted:
    """Tokens chosen by a step and their raw-model logprobs; `count` [b] of the `tokens` [b, T] are real."""

    tokens: jax.Array
    count: jax.Array
    logprobs: jax.Array  # [b, T]
    top_ids: jax.Array  # [b, T, 20]
    top_logprobs: jax.Array  # [b, T, 20]


def from_device(caches: EngineCaches, batch: Batch):
    """A decode step's inputs as the device holds them: each row's pending token, and the batch with each row's
    committed length as its start. The host may not have read the previous step back yet (SERVING §D.5)."""
    return caches.pending[batch.slots], dataclasses.replace(batch, starts=caches.lengths[batch.slots])


def advance(caches: EngineCaches, slots, starts, tokens, count) -> EngineCaches:
    """Rows that emitted `count` [b] of `tokens` [b, T] now have `starts + count` positions committed and the
    last emitted token pending; rows with count 0 are left as they were."""
    last = jnp.take_along_axis(tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    moved = count > 0
    return dataclasses.replace(
        caches, lengths=caches.lengths.at[slots].set(jnp.where(moved, starts + count, caches.lengths[slots])),
        pending=caches.pending.at[slots].set(jnp.where(moved, last, caches.pending[slots])))


def penalty_rows(caches: EngineCaches, slots):
    return caches.counts[slots], caches.seen[slots]


def record_tokens(caches: EngineCaches, slots, tokens, valid) -> EngineCaches:
    """Count emitted tokens [b, T] (where valid) for the penalties."""
    rows = jnp.broadcast_to(slots[:, None], tokens.shape)
    counts = caches.counts.at[rows, tokens].add(valid.astype(jnp.int32))
    seen = caches.seen.at[rows, jnp.where(valid, tokens, caches.seen.shape[1])].set(True, mode="drop")
    return dataclasses.replace(caches, counts=counts, seen=seen)


def sample_next(logits, batch: Batch, counts, seen, positions):
    """Penalties, filtering and the (seeded) choice of the token at `positions` [b]. logits [b, V] fp32."""
    filtered = sampling.filtered_logits(sampling.apply_penalties(logits, batch.sampling, counts, seen), batch.sampling)
    keys = sampling.position_keys(batch.sampling, positions, sampling.SAMPLE)
    return sampling.choose(filtered, batch.sampling, keys)


def emitted(logits, tokens, count) -> Emitted:
    chosen, top_ids, top_values = sampling.token_logprobs(logits, tokens)
    return Emitted(tokens=tokens, count=count, logprobs=chosen, top_ids=top_ids, top_logprobs=top_values)


def prefill_step(runner: Runner, params, caches: EngineCaches, batch: Batch, ids, num_new, next_ids,
                 final, generated_from, restore_from, snapshot_to, prompt_logprobs: bool):
    """One prompt chunk per row: ids [b, C] at positions starts + 0..C−1 (num_new real), next_ids [b, C] the
    token after each (the prompt's own; unused at a prompt's last position). Rows whose prompt ends here
    (final [b]) sample their first token. Positions from generated_from [b] on hold tokens the request generated
    before a preemption (SERVING §D.7): they count for the penalties as generated tokens. With a prefix cache
    (SERVING §D.8), rows resuming from a cached prefix first take the rings of snapshot restore_from [b], and rows
    whose chunk ends at a cached page boundary leave theirs in snapshot snapshot_to [b] (out of range: none). With an MTP state, the MTP module extends over the chunk too
    (pairs (streams_t, x_{t+1}) for every t whose next token is a prompt token, ARCHITECTURE §12.1)."""
    slots, starts = batch.slots, batch.starts
    if caches.snapshots is not None:
        caches = restore_snapshots(caches, slots, restore_from)
    state = gather_slots(caches.target, slots, starts, batch.tables)
    hidden, streams, state = runner.target(params, state, ids, num_new, prefill=True)
    caches = dataclasses.replace(caches, target=scatter_slots(caches.target, state, slots))

    # A fresh sequence starts with clean penalty rows; its prompt tokens are "seen" (repetition penalty).
    fresh = (starts == 0)[:, None]
    counts = jnp.where(fresh, 0, caches.counts[slots])
    real = jnp.arange(ids.shape[1]) < num_new[:, None]
    seen = jnp.where(fresh, False, caches.seen[slots])
    seen = seen.at[jnp.arange(ids.shape[0])[:, None], jnp.where(real, ids, seen.shape[1])].set(True, mode="drop")
    caches = dataclasses.replace(caches, counts=caches.counts.at[slots].set(counts), seen=caches.seen.at[slots].set(seen))
    generated = real & (starts[:, None] + jnp.arange(ids.shape[1]) >= generated_from[:, None])
    caches = record_tokens(caches, slots, ids, generated)
    counts, seen = penalty_rows(caches, slots)

    logits = runner.logits(params, last_real(hidden, num_new))
    token = sample_next(logits, batch, counts, seen, starts + num_new)
    first = emitted(logits[:, None], token[:, None], final.astype(jnp.int32))
    caches = record_tokens(caches, slots, token[:, None], final[:, None])
    caches = dataclasses.replace(caches, lengths=caches.lengths.at[slots].set(starts + num_new),
                                 pending=caches.pending.at[slots].set(jnp.where(final, token, caches.pending[slots])))

    prompt = None
    if prompt_logprobs:  # log p(x_{t+1} | x_≤t) for every chunk position (echo / lm-eval loglikelihood)
        prompt = emitted(runner.logits(params, hidden), next_ids, num_new)

    if caches.mtp is not None:
        mtp_state = gather_slots(caches.mtp, slots, starts, batch.tables)
        _, _, mtp_state = runner.mtp(params, mtp_state, streams, next_ids, num_new - final.astype(jnp.int32),
                                    prefill=True)
        caches = dataclasses.replace(caches, mtp=scatter_slots(caches.mtp, mtp_state, slots),
                                     last_streams=caches.last_streams.at[slots].set(last_real(streams, num_new)))
    if caches.snapshots is not None:
        caches = take_snapshots(caches, slots, snapshot_to)
    return caches, first, prompt


def decode_step(runner: Runner, params, caches: EngineCaches, batch: Batch, active):
    """One token per active row (its pending token, at its committed length; inactive rows change nothing)
    and the next token."""
    ids, batch = from_device(caches, batch)
    slots = batch.slots
    state = gather_slots(caches.target, slots, batch.starts, batch.tables)
    hidden, _, state = runner.target(params, state, ids[:, None], active.astype(jnp.int32), prefill=False)
    caches = dataclasses.replace(caches, target=scatter_slots(caches.target, state, slots))
    logits = runner.logits(params, hidden[:, 0])
    counts, seen = penalty_rows(caches, slots)
    token = sample_next(logits, batch, counts, seen, batch.starts + 1)
    caches = record_tokens(caches, slots, token[:, None], active[:, None])
    count = active.astype(jnp.int32)
    caches = advance(caches, slots, batch.starts, token[:, None], count)
    return caches, emitted(logits[:, None], token[:, None], count)
