"""MoE all-to-all mode (PARALLELISM §3.2, DeepEP's role): tokens stay on their device; every (token, expert)
pair travels to the device owning the expert, is computed there, and its weighted output travels back.

The expert group is the mesh axes splitting the routed-expert axis (cp × ep). Where tokens are replicated over
one of those axes (ep; cp during decode), the replicas first split the tokens between them so each token is
dispatched once, and all-gather the outputs afterwards (as SGLang does across attention-TP ranks before DeepEP,
PARALLELISM §4 "SGLANG_DSV4_FIX_TP_ATTN_A2A_SCATTER"). Intermediate-axis (tp) shards each compute a partial for the rows
they receive, summed by a `psum` at the end. The shared expert, whose intermediate axis is split over every MoE
axis, goes through the gather path. The MoE composes these steps (`dsv4jax.model.moe.MoE`); they are array functions
here, wired up by `dsv4jax.sharding.moe.MoECollective`, and the routed experts arrive as a `compute` function.

Exchange: on GPU `jax.lax.ragged_all_to_all` sends each peer exactly its pairs (sorted by owner). XLA:CPU has no
ragged_all_to_all, so on CPU a dense `all_to_all` sends each peer a fixed-capacity block with one slot per pair
(the drop id where the pair is not for that peer, `ExpertPlacement`): the same arithmetic with G× the traffic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _shard_index(axes: tuple[str, ...], sizes: tuple[int, ...]) -> jax.Array:
    """Linear index of this device along `axes` (major first), as PartitionSpec((axes...)) lays shards out."""
    index = jnp.int32(0)
    for axis, size in zip(axes, sizes):
        index = index * size + jax.lax.axis_index(axis)
    return index


def _product(sizes) -> int:
    n = 1
    for size in sizes:
        n *= size
    return n


def split_replicas(x: jax.Array, ids: jax.Array, axes: tuple[str, ...], sizes: tuple[int, ...]):
    """Tokens [T, D] and ids [T] replicated over `axes` -> this replica's share, so each token is dispatched once
    (padded to a multiple of the replica count)."""
    copies = _product(sizes)
    if copies == 1:
        return x, ids
    pad = -x.shape[0] % copies
    x, ids = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(ids, (0, pad))
    share = x.shape[0] // copies
    start = _shard_index(axes, sizes) * share
    return jax.lax.dynamic_slice_in_dim(x, start, share), jax.lax.dynamic_slice_in_dim(ids, start, share)


def merge_replicas(routed: jax.Array, tokens: int, axes: tuple[str, ...], sizes: tuple[int, ...],
                   mlp_axes: tuple[str, ...]) -> jax.Array:
    """Each replica's routed share [T/copies, D] -> all `tokens` rows, summed over the intermediate-axis shards."""
    if mlp_axes:
        routed = jax.lax.psum(routed, mlp_axes)
    if _product(sizes) > 1:
        routed = jax.lax.all_gather(routed, axes, axis=0, tiled=True)[:tokens]
    return routed


def exchange_pairs(x, experts, weights, placement, compute, axes: tuple[str, ...], sizes: tuple[int, ...]):
    """[T, D] tokens, their routing [T, k] (global expert ids, weights) -> Σ_k weight·expert output [T, D] fp32,
    each pair computed by its expert's owner along `axes`; compute(rows, local ids, weights) runs the experts."""
    exchange = _ragged_exchange if jax.default_backend() == "gpu" else _dense_exchange
    return exchange(x, experts, weights, placement, compute, _product(sizes), axes)


def _dense_exchange(x, experts, weights, placement, compute, group, axes):
    """`exchange_pairs` via dense all_to_all: every peer gets a slot for every pair."""
    tokens, k = experts.shape
    pair_x = jnp.repeat(x, k, axis=0)  # [P, D], pair p = (token p // k, choice p % k)
    owner, local = placement.owner(experts).reshape(-1), placement.local(experts).reshape(-1)
    for_peer = owner[None, :] == jnp.arange(group)[:, None]  # [G, P]
    # Every peer gets every pair; those not for it carry the drop id.
    send_x = jnp.broadcast_to(pair_x[None], (group, *pair_x.shape))
    send_expert = placement.keep(for_peer, local[None])
    send_weight = jnp.broadcast_to(weights.reshape(-1)[None], for_peer.shape)

    def to_peers(a):
        return jax.lax.all_to_all(a, axes, 0, 0, tiled=True)

    recv_x, recv_expert, recv_weight = to_peers(send_x), to_peers(send_expert), to_peers(send_weight)
    rows = recv_x.reshape(-1, x.shape[-1])
    out = compute(rows, recv_expert.reshape(-1, 1), recv_weight.reshape(-1, 1))  # [G·P, D] fp32
    back = to_peers(out.reshape(group, -1, x.shape[-1]))  # block g: my pairs as computed by owner g
    return back.sum(axis=0).reshape(tokens, k, -1).sum(axis=1)


def _ragged_exchange(x, experts, weights, placement, compute, group, axes):
    """`exchange_pairs` sending each owner exactly its pairs with `jax.lax.ragged_all_to_all` (GPU)."""
    tokens, k = experts.shape
    pairs = tokens * k
    owner, local = placement.owner(experts).reshape(-1), placement.local(experts).reshape(-1)
    order = jnp.argsort(owner, stable=True)
    send_x = jnp.repeat(x, k, axis=0)[order]
    send_expert, send_weight = local[order], weights.reshape(-1)[order]
    counts = jnp.bincount(owner, length=group).astype(jnp.int32)  # my pairs per owner
    matrix = jax.lax.all_gather(counts, axes, axis=0, tiled=False)  # [G src, G dst]
    me = _shard_index(axes, tuple(jax.lax.axis_size(a) for a in axes))
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
    # The buffer holds room for every pair of every peer; rows past the received ones are dropped.
    out = compute(rows, placement.keep(valid, row_expert)[:, None], jnp.where(valid, row_weight, 0.0)[:, None])
    # Return: my buffer's block from source j goes back to j's sorted buffer at its send offset for me.
    home_offsets = (jnp.cumsum(matrix, axis=1) - matrix)[:, me]
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((pairs, out.shape[-1]), out.dtype), recv_offsets, recv_counts,
                                     home_offsets, counts, axis_name=axes)
    unsorted = jnp.zeros_like(back).at[order].set(back)
    return unsorted.reshape(tokens, k, -1).sum(axis=1)
