"""The MoE's collectives when tokens and MoE weights are spread over the mesh (PARALLELISM §3, PARALLELISM §4).

The MoE composes itself (`dsv4jax.model.moe.MoE`); `MoECollective` implements its `Collectives` hooks for a mesh,
as functions over arrays: it never sees the MoE's modules or weights.

Inside `shard_map` each device holds its tokens (split over dp, and over cp during a prefill) and a shard of the
MoE weights: routed experts [E/(cp·ep)] with the intermediate axis split over tp (and dp under DP attention),
the shared expert's intermediate axis split over every MoE axis. Partial sums of all shards add up to the MoE.

Gather mode (PARALLELISM §3.1 non-DeepEP, PARALLELISM §4 DP attention + TP MoE):
  tokens and their ids are all-gathered over the token-split axes that also split the weights (`gather_axes`),
  every device adds the partial sums of its expert/intermediate shard, then `psum_scatter` over `gather_axes`
  returns each device the fully reduced rows of its own tokens, and `psum` over the remaining weight axes
  (`reduce_axes`, whose devices hold the same tokens) completes the sum. Each partial sum is reduced exactly
  once, and never sliced before it is reduced (SGLang #27191). The ids go through the same all-gather as the
  tokens, so hash routing sees the ids of the gathered rows in the same rank-major order (SGLang #24947).
  Rows of all dp ranks have the same padded shape (`data.pad_batch`), i.e. SGLang's MAX_LEN padding.

All-to-all mode (PARALLELISM §3.2 DeepEP): tokens stay put; each (token, expert) pair is sent to the expert's owner and the
weighted outputs come back (dsv4jax/sharding/all_to_all.py). On GPU with `jax.lax.ragged_all_to_all`; XLA:CPU has
no ragged_all_to_all, so on CPU the same exchange uses a dense `all_to_all` with one fixed-capacity slot per pair.
"""

from __future__ import annotations

import dataclasses

import jax

from dsv4jax.model.moe import Collectives, ExpertPlacement
from dsv4jax.sharding.all_to_all import _shard_index, exchange_pairs, merge_replicas, split_replicas
from dsv4jax.sharding.mesh import MeshConfig


def reduce_scatter_rows(partial: jax.Array, gather_axes: tuple[str, ...], reduce_axes: tuple[str, ...]) -> jax.Array:
    """Partial sums for all gathered rows -> this device's own rows, fully reduced (reduce, then keep mine)."""
    if gather_axes:
        partial = jax.lax.psum_scatter(partial, gather_axes, scatter_dimension=0, tiled=True)
    if reduce_axes:
        partial = jax.lax.psum(partial, reduce_axes)
    return partial


@dataclasses.dataclass(frozen=True)
class MoECollective(Collectives):
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
        """The MoE sub-layer on the local tokens x [B,S,D] with ids [B,S] (the MoE composes; this calls it)."""
        return moe(x, ids, self)

    @property
    def exchanges_pairs(self) -> bool:
        return self.mode == "all_to_all" and bool(self.expert_axes)

    # ---- gather mode (and the shared expert of the all-to-all mode) ----------------------------------------------
    def gather(self, rows: jax.Array) -> jax.Array:
        if not self.gather_axes:
            return rows
        return jax.lax.all_gather(rows, self.gather_axes, axis=0, tiled=True)  # rank-major

    def reduce(self, partial: jax.Array) -> jax.Array:
        return reduce_scatter_rows(partial, self.gather_axes, self.reduce_axes)

    def placement(self, count: int) -> ExpertPlacement:
        if self.exchanges_pairs:  # each pair's owner receives local ids
            return ExpertPlacement(count)
        return ExpertPlacement(count, _shard_index(self.expert_axes, self.expert_sizes) * count)

    # ---- all-to-all mode ---------------------------------------------------------------------------------------
    @property
    def _replicas(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The expert axes over which this call's tokens are replicated, and their sizes."""
        sizes = dict(zip(self.expert_axes, self.expert_sizes))
        axes = tuple(a for a in self.expert_axes if a not in self.gather_axes)
        return axes, tuple(sizes[a] for a in axes)

    def dispatch(self, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return split_replicas(x, ids, *self._replicas)

    def exchange(self, x, experts, weights, placement: ExpertPlacement, compute) -> jax.Array:
        if not self.exchanges_pairs:
            return super().exchange(x, experts, weights, placement, compute)
        return exchange_pairs(x, experts, weights, placement, compute, self.expert_axes, self.expert_sizes)

    def combine(self, routed: jax.Array, tokens: int) -> jax.Array:
        mlp_axes = tuple(a for a in self.reduce_axes + self.gather_axes if a not in self.expert_axes)
        return merge_replicas(routed, tokens, *self._replicas, mlp_axes)


def moe_partial(moe, x: jax.Array, ids: jax.Array, expert_axes: tuple[str, ...], expert_sizes: tuple[int, ...]):
    """The MoE's partial output (in x.dtype) of this device's weight shards for rows x [T, D] with ids [T], left
    unreduced: the gather mode with nothing gathered and nothing reduced (tests build wrong reductions from it)."""
    return moe(x, ids, MoECollective((), (), expert_axes, expert_sizes))
