"""Context-parallel prefill: which tokens of a chunk each cp rank holds, and how per-token values come back
(PARALLELISM §1). Batches are rectangular [B, S] (right padding, `num_new` real tokens per row), so every row's
chunk is split the same way along S; S is padded to a multiple of C (round-robin) or 2C (zigzag) first
(`data.pad_chunk`), pad tokens sit past `num_new` and never reach a cache.

- round-robin (PARALLELISM §1.1): chunk offset g is on rank g mod C; rank r holds r, r+C, r+2C, ….
- zigzag (PARALLELISM §1.2): 2C blocks of S/2C tokens; rank r holds block r then block 2C−1−r (causal work balanced).

Per-token metadata is a function of the absolute position only, so each rank needs nothing but the positions of
its tokens: `start + offset` gives the causal length (pos+1), the window (pos−w+1..pos), the visible CSA rows
⌊(pos+1)/4⌋ (the indexer's mask) and HCA rows ⌊(pos+1)/128⌋. The per-token K=V, compressor inputs and indexer
keys are all-gathered over cp (rank-major) and re-ordered to token order (`gather`), so every rank writes the
complete caches; local queries attend them (PARALLELISM §1.1 "KV is replicated").
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

ROUND_ROBIN, ZIGZAG = "round_robin", "zigzag"


def alignment(mode: str, size: int) -> int:
    """Chunk lengths split over `size` cp ranks are multiples of this: C for round-robin, 2C for zigzag (PARALLELISM §1.1,
    `get_cp_padding_align_size`); 1 without cp."""
    return 1 if size == 1 else size if mode == ROUND_ROBIN else 2 * size


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    mode: str  # ROUND_ROBIN or ZIGZAG
    size: int  # C, the cp axis size
    chunk: int  # S, the (padded) chunk length of every row
    axis: str = "cp"

    def __post_init__(self):
        if self.mode not in (ROUND_ROBIN, ZIGZAG):
            raise ValueError(f"unknown context-parallel mode {self.mode!r}")
        if self.chunk % self.align:
            raise ValueError(f"chunk length {self.chunk} is not a multiple of {self.align} ({self.mode}, "
                             f"cp={self.size}); pad it with dsv4jax.sharding.data.pad_chunk")

    @property
    def align(self) -> int:
        return alignment(self.mode, self.size)

    @property
    def local_length(self) -> int:
        return self.chunk // self.size

    def token_table(self) -> np.ndarray:
        """[C, S/C]: the chunk offsets each rank holds, in its local order."""
        c, n = self.size, self.local_length
        if self.mode == ROUND_ROBIN:
            return np.arange(c)[:, None] + c * np.arange(n)[None, :]
        block = self.chunk // (2 * c)
        ranks = np.arange(c)[:, None]
        prev, nxt = ranks * block + np.arange(block), (2 * c - 1 - ranks) * block + np.arange(block)
        return np.concatenate([prev, nxt], axis=1)

    def rank_major_order(self) -> np.ndarray:
        """[S]: the chunk offset at each slot of the rank-major layout [rank 0's tokens | rank 1's | …]."""
        return self.token_table().reshape(-1)

    def token_order(self) -> np.ndarray:
        """[S]: the rank-major slot of each chunk offset (the inverse permutation)."""
        return np.argsort(self.rank_major_order())

    # ---- outside shard_map, on whole arrays ------------------------------------------------------------------
    def to_rank_major(self, x: jax.Array) -> jax.Array:
        """x [B, S, ...] in token order -> rank-major, ready to be sharded P(dp, cp) (rank r gets its tokens)."""
        return jnp.take(x, self.rank_major_order(), axis=1)

    def from_rank_major(self, x: jax.Array) -> jax.Array:
        return jnp.take(x, self.token_order(), axis=1)

    # ---- inside shard_map ------------------------------------------------------------------------------------
    def local_offsets(self) -> jax.Array:
        """[S/C]: this rank's chunk offsets."""
        return jnp.asarray(self.token_table(), jnp.int32)[jax.lax.axis_index(self.axis)]

    def positions(self, start: jax.Array) -> jax.Array:
        """[B, S/C] absolute positions of this rank's tokens (prefix included: chunked prefill under CP)."""
        return start[:, None] + self.local_offsets()[None, :]

    def gather(self, x: jax.Array) -> jax.Array:
        """This rank's per-token values [B, S/C, ...] -> the whole chunk [B, S, ...] in token order:
        all-gather over cp (rank-major) and re-order (`cp_all_gather_rerange_output`, PARALLELISM §1.1)."""
        full = jax.lax.all_gather(x, self.axis, axis=1, tiled=True)
        return jnp.take(full, self.token_order(), axis=1)
