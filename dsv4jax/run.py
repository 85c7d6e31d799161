"""The run paths as pure functions of (graphdef, params, state, inputs), jitted once per shape.

`graphdef` comes from a single `nnx.split(model)` outside any loop; the functions merge it back inside the
trace, so the NNX modules only describe the computation. Chunked prefill is `prefill` from a non-empty state;
decode is a chunk of one token per sequence. Each jitted path has its plain function beside it (`forward_fn`, ...)
for code that composes it into a larger jitted function (evaluation, benchmarks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.model.state import DecodeState


def last_real(values: jax.Array, num_new: jax.Array) -> jax.Array:
    """values [B,S,...] -> values[b, num_new[b]−1]."""
    index = jnp.maximum(num_new - 1, 0)
    return jax.vmap(lambda v, i: v[i])(values, index)


def forward_fn(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, ids: jax.Array, num_new: jax.Array):
    """All-position fp32 logits [B,S,V], pre-head streams [B,S,n,D] and the updated state."""
    model = nnx.merge(graphdef, params)
    hidden, streams, state = model(ids, state, num_new)
    return model.logits(hidden), streams, state


def prefill_fn(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, ids: jax.Array, num_new: jax.Array):
    """A (possibly continued) prefill chunk: logits of each row's last real token [B,V], streams, state."""
    model = nnx.merge(graphdef, params)
    hidden, streams, state = model(ids, state, num_new)
    return model.logits(last_real(hidden, num_new)), streams, state


def decode_fn(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, ids: jax.Array, active: jax.Array):
    """One token per sequence, ids [B]; rows with active == False leave their state unchanged."""
    model = nnx.merge(graphdef, params)
    hidden, streams, state = model(ids[:, None], state, active.astype(jnp.int32))
    return model.logits(hidden[:, 0]), streams[:, 0], state


def mtp_forward_fn(graphdef: nnx.GraphDef, params: nnx.State, mtp_state: DecodeState, streams: jax.Array,
                next_ids: jax.Array, num_new: jax.Array):
    """The MTP module over main-model streams paired with the next tokens: fp32 logits [B,S,V], streams, state."""
    model = nnx.merge(graphdef, params)
    hidden, mtp_streams, mtp_state = model.mtp_forward(streams, next_ids, mtp_state, num_new)
    return model.logits(hidden), mtp_streams, mtp_state


_jit = functools.partial(jax.jit, static_argnames=("graphdef",))
forward = _jit(forward_fn)
prefill = _jit(prefill_fn)
decode = _jit(decode_fn)
mtp_forward = _jit(mtp_forward_fn)
