"""The MoE sub-layer when tokens and MoE weights are spread over the mesh (PARALLELISM §3, §4).

Inside `shard_map` each device holds its tokens (split over dp, and over cp during a prefill) and a shard of the
MoE weights: routed experts [E/(cp·ep)] with the intermediate axis split over tp (and dp under DP attention),
the shared expert's intermediate axis split over every MoE axis. Partial sums of all shards add up to the MoE.

Gather mode (§3.1 non-DeepEP, §4 DP attention + TP MoE):
  tokens and their ids are all-gathered over the token-split axes that also split the weights (`gather_axes`),
  every device adds the partial sums of its expert/intermediate shard, then `psum_scatter` over `gather_axes`
  returns each device the fully reduced rows of its own tokens, and `psum` over the remaining weight axes
  (`reduce_axes`, whose devices hold the same tokens) completes the sum. Each partial sum is reduced exactly
  once, and never sliced before it is reduced (SGLang #27191). The ids go through the same all-gather as the
  tokens, so hash routing sees the ids of the gathered rows in the same rank-major order (SGLang #24947).
  Rows of all dp ranks have the same padded shape (`data.pad_batch`), i.e. SGLang's MAX_LEN padding.

All-to-all mode (§3.2 DeepEP): tokens stay put; each (token, expert) pair is sent to the expert's owner and the
weighted outputs come back. On GPU with `jax.lax.ragged_all_to_all`; XLA:CPU has no ragged_all_to_all, so on CPU
the same exchange uses a dense `all_to_all` with one fixed-capacity slot per pair.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4jax.sharding.mesh import MeshConfig


def _shard_index(axes: tuple[str, ...], sizes: tuple[int, ...]) -> jax.Array:
    """Linear index of this device along `axes` (major first), as PartitionSpec((axes...)) lays shards out."""
    index = jnp.int32(0)
    for axis, size in zip(axes, sizes):
        index = index * size + jax.lax.axis_index(axis)
    return index


def moe_partial(moe, x: jax.Array, ids: jax.Array, expert_axes: tuple[str, ...], expert_sizes: tuple[int, ...]):
    """fp32 partial MoE output of this device's weight shards for tokens x [T, D] with ids [T].

    Routing is global (the router is replicated); choices of experts owned elsewhere are dropped here (expert id
    local_count), so that each device computes only its own experts' pairs.
    """
    experts, weights = moe.gate(x, ids)
    local_count = moe.experts.w1.shape[0]
    local = experts - _shard_index(expert_axes, expert_sizes) * local_count
    mine = (local >= 0) & (local < local_count)
    out = moe.experts(x, jnp.where(mine, local, local_count), weights)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x).astype(jnp.float32)  # its own intermediate slice: a partial sum too
    return out


def reduce_scatter_rows(partial: jax.Array, gather_axes: tuple[str, ...], reduce_axes: tuple[str, ...]) -> jax.Array:
    """Partial sums for all gathered rows -> this device's own rows, fully reduced (reduce, then keep mine)."""
    if gather_axes:
        partial = jax.lax.psum_scatter(partial, gather_axes, scatter_dimension=0, tiled=True)
    if reduce_axes:
        partial = jax.lax.psum(partial, reduce_axes)
    return partial


@dataclasses.dataclass(frozen=True)
class MoECollective:
    """How the MoE reaches all of its weight shards for the tokens of one call."""

    gather_axes: tuple[str, ...]  # axes splitting both tokens and MoE weights
    reduce_axes: tuple[str, ...]  # axes splitting MoE weights only (tokens replicated)
    expert_axes: tuple[str, ...]  # axes splitting the routed-expert axis, major first
    expert_sizes: tuple[int, ...]
    mode: str = "gather"

    @staticmethod
    def for_tokens(mesh: MeshConfig, token_axes: tuple[str, ...]) -> "MoECollective":
        """token_axes: the mesh axes over which this call's tokens differ (prefill: dp, cp; decode: dp)."""
        weights = mesh.moe_weight_axes
        return MoECollective(gather_axes=tuple(a for a in weights if a in token_axes),
                             reduce_axes=tuple(a for a in weights if a not in token_axes),
                             expert_axes=mesh.expert_axes,
                             expert_sizes=tuple(getattr(mesh, a) for a in mesh.expert_axes),
                             mode=mesh.moe_mode)

    def __call__(self, moe, x: jax.Array, ids: jax.Array) -> jax.Array:
        """x [B,S,D] local tokens (after ffn_norm), ids [B,S] -> [B,S,D] in x.dtype."""
        if self.mode == "all_to_all" and self.expert_axes:
            from dsv4jax.sharding.all_to_all import moe_all_to_all
            return moe_all_to_all(moe, x, ids, self)
        flat, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
        if self.gather_axes:  # rank-major rows; the ids travel with their tokens (#24947)
            flat = jax.lax.all_gather(flat, self.gather_axes, axis=0, tiled=True)
            flat_ids = jax.lax.all_gather(flat_ids, self.gather_axes, axis=0, tiled=True)
        partial = moe_partial(moe, flat, flat_ids, self.expert_axes, self.expert_sizes)
        out = reduce_scatter_rows(partial, self.gather_axes, self.reduce_axes)  # #27191: reduce before slicing
        return out.astype(x.dtype).reshape(x.shape)
