"""The `TokenLayout` the model sees inside `shard_map`: a context-parallel split (or none) plus the MoE collective."""

from __future__ import annotations

import dataclasses

import jax

from dsv4jax.model.layout import TokenLayout
from dsv4jax.model.moe import Collectives
from dsv4jax.sharding.context import SequenceSplit
from dsv4jax.sharding.mesh import MeshConfig
from dsv4jax.sharding.moe import MoECollective


@dataclasses.dataclass(frozen=True)
class ShardedLayout(TokenLayout):
    split: SequenceSplit | None = None  # None: every cp rank holds the whole chunk (decode, PARALLELISM §1)
    collective: MoECollective | None = None

    @staticmethod
    def prefill(mesh: MeshConfig, chunk: int, kernels: str = "auto") -> "ShardedLayout":
        split = SequenceSplit(mesh.cp_mode, mesh.cp, chunk) if mesh.cp > 1 else None
        tokens = ("dp", "cp") if split else ("dp",)
        return ShardedLayout(kernels, split, MoECollective.for_tokens(mesh, tokens))

    @staticmethod
    def replicated(mesh: MeshConfig, kernels: str = "auto") -> "ShardedLayout":
        """Decode, MTP draft steps: split over dp only."""
        return ShardedLayout(kernels, None, MoECollective.for_tokens(mesh, ("dp",)))

    def chunk_length(self, local_length: int) -> int:
        return self.split.chunk if self.split else local_length

    def positions(self, start: jax.Array, local_length: int) -> jax.Array:
        return self.split.positions(start) if self.split else super().positions(start, local_length)

    def gather_chunk(self, x: jax.Array) -> jax.Array:
        return self.split.gather(x) if self.split else x

    @property
    def moe_collectives(self) -> Collectives:
        return self.collective if self.collective is not None else super().moe_collectives
