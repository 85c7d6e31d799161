"""MoE all-to-all mode (PARALLELISM §3.2, DeepEP's role): tokens stay on their device; every (token, expert)
pair travels to the device owning the expert, is computed there, and its weighted output travels back.

The expert group is the mesh axes splitting the routed-expert axis (cp × ep). Where tokens are replicated over
one of those axes (ep; cp during decode), the replicas first split the tokens between them so each token is
dispatched once, and all-gather the outputs afterwards (as SGLang does across attention-TP ranks before DeepEP,
§4 "SGLANG_DSV4_FIX_TP_ATTN_A2A_SCATTER"). Intermediate-axis (tp) shards each compute a partial for the rows
they receive, summed by a `psum` at the end. The shared expert, whose intermediate axis is split over every MoE
axis, goes through the gather path.

Exchange: on GPU `jax.lax.ragged_all_to_all` sends each peer exactly its pairs (sorted by owner). XLA:CPU has no
ragged_all_to_all, so on CPU a dense `all_to_all` sends each peer a fixed-capacity block with one slot per pair
(zero weight where the pair is not for that peer): the same arithmetic with G× the traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4jax.sharding.moe import _shard_index, reduce_scatter_rows


def _group(c):
    """(token-replicated expert axes and their sizes, expert group size)."""
    sizes = dict(zip(c.expert_axes, c.expert_sizes))
    replicated = tuple(a for a in c.expert_axes if a not in c.gather_axes)
    group = 1
    for n in c.expert_sizes:
        group *= n
    return replicated, tuple(sizes[a] for a in replicated), group


def moe_all_to_all(moe, x: jax.Array, ids: jax.Array, c) -> jax.Array:
    """x [B,S,D] local tokens, ids [B,S] -> the MoE output [B,S,D] in x.dtype (see module docstring)."""
    flat, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
    tokens = flat.shape[0]
    replicated, replicated_sizes, group = _group(c)
    copies = 1
    for n in replicated_sizes:
        copies *= n
    pad = -tokens % copies
    if copies > 1:  # each replica dispatches its share of the tokens
        flat = jnp.pad(flat, ((0, pad), (0, 0)))
        flat_ids = jnp.pad(flat_ids, (0, pad))
        share = flat.shape[0] // copies
        start = _shard_index(replicated, replicated_sizes) * share
        flat = jax.lax.dynamic_slice_in_dim(flat, start, share)
        flat_ids = jax.lax.dynamic_slice_in_dim(flat_ids, start, share)

    experts, weights = moe.gate(flat, flat_ids)
    local_count = moe.experts.w1.shape[0]
    exchange = _ragged_exchange if jax.default_backend() == "gpu" else _dense_exchange
    routed = exchange(moe, flat, experts, weights, local_count, group, c.expert_axes)

    mlp_axes = tuple(a for a in c.reduce_axes + c.gather_axes if a not in c.expert_axes)
    if mlp_axes:  # intermediate-axis partial sums
        routed = jax.lax.psum(routed, mlp_axes)
    if copies > 1:
        routed = jax.lax.all_gather(routed, replicated, axis=0, tiled=True)[:tokens]
    out = routed
    if moe.shared_experts is not None:
        out = out + _shared_gathered(moe, x, c)
    return out.astype(x.dtype).reshape(x.shape)


def _shared_gathered(moe, x, c):
    flat = x.reshape(-1, x.shape[-1])
    if c.gather_axes:
        flat = jax.lax.all_gather(flat, c.gather_axes, axis=0, tiled=True)
    partial = moe.shared_experts(flat).astype(jnp.float32)
    return reduce_scatter_rows(partial, c.gather_axes, c.reduce_axes)


def _dense_exchange(moe, x, experts, weights, local_count, group, axes):
    """[T,D] tokens and their [T,k] routing -> Σ_k weight·expert output [T,D] fp32, via dense all_to_all."""
    tokens, k = experts.shape
    pair_x = jnp.repeat(x, k, axis=0)  # [P, D], pair p = (token p // k, choice p % k)
    owner, local = (experts // local_count).reshape(-1), (experts % local_count).reshape(-1)
    for_peer = owner[None, :] == jnp.arange(group)[:, None]  # [G, P]
    # Every peer gets every pair; those not for it carry expert id local_count, which drops them there.
    send_x = jnp.broadcast_to(pair_x[None], (group, *pair_x.shape))
    send_expert = jnp.where(for_peer, local[None], local_count)
    send_weight = jnp.broadcast_to(weights.reshape(-1)[None], for_peer.shape)

    def to_peers(a):
        return jax.lax.all_to_all(a, axes, 0, 0, tiled=True)

    recv_x, recv_expert, recv_weight = to_peers(send_x), to_peers(send_expert), to_peers(send_weight)
    rows = recv_x.reshape(-1, x.shape[-1])
    out = moe.experts(rows, recv_expert.reshape(-1, 1), recv_weight.reshape(-1, 1))  # [G·P, D] fp32
    back = to_peers(out.reshape(group, -1, x.shape[-1]))  # block g: my pairs as computed by owner g
    return back.sum(axis=0).reshape(tokens, k, -1).sum(axis=1)


def _ragged_exchange(moe, x, experts, weights, local_count, group, axes):
    """As `_dense_exchange`, sending each owner exactly its pairs with `jax.lax.ragged_all_to_all` (GPU)."""
    tokens, k = experts.shape
    pairs = tokens * k
    owner, local = (experts // local_count).reshape(-1), (experts % local_count).reshape(-1)
    order = jnp.argsort(owner, stable=True)
    send_x = jnp.repeat(x, k, axis=0)[order]
    send_expert, send_weight = local[order], weights.reshape(-1)[order]
    counts = jnp.bincount(owner, length=group).astype(jnp.int32)  # my pairs per owner
    matrix = jax.lax.all_gather(counts, axes, axis=0, tiled=False)  # [G src, G dst]
    me = _axes_index(axes)
    send_offsets = jnp.cumsum(counts) - counts
    recv_counts = matrix[:, me]
    recv_offsets = jnp.cumsum(recv_counts) - recv_counts  # where each source's rows sit in my buffer
    remote_offsets = (jnp.cumsum(matrix, axis=0) - matrix)[me]  # where my rows sit in each owner's buffer
    capacity = pairs * group  # every pair of every peer could choose my experts

    def dispatch(a):
        out = jnp.zeros((capacity, *a.shape[1:]), a.dtype)
        return jax.lax.ragged_all_to_all(a, out, send_offsets, counts, remote_offsets, recv_counts, axis_name=axes)

    rows, row_expert, row_weight = dispatch(send_x), dispatch(send_expert), dispatch(send_weight)
    valid = jnp.arange(capacity) < jnp.sum(recv_counts)
    # The buffer holds room for every pair of every peer; rows past the received ones are dropped (no expert).
    out = moe.experts(rows, jnp.where(valid, row_expert, local_count)[:, None],
                      jnp.where(valid, row_weight, 0.0)[:, None])
    # Return: my buffer's block from source j goes back to j's sorted buffer at its send offset for me.
    home_offsets = (jnp.cumsum(matrix, axis=1) - matrix)[:, me]
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((pairs, out.shape[-1]), out.dtype), recv_offsets, recv_counts,
                                     home_offsets, counts, axis_name=axes)
    unsorted = jnp.zeros_like(back).at[order].set(back)
    return unsorted.reshape(tokens, k, -1).sum(axis=1)


def _axes_index(axes):
    index = jnp.int32(0)
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index
