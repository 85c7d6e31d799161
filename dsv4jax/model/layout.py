"""Where the tokens of one call sit: the hook through which context parallelism enters the model.

The model always computes *local* queries, but the K=V rows, the compressor inputs and the window/compressor
state are per whole chunk. A `TokenLayout` says which positions the local tokens have and how to bring
per-token values of the local tokens back to the whole chunk in token order. The default layout is the
identity: every call holds its whole chunk in order, so single-device code is unchanged. The
context-parallel and mesh-aware layouts live in `dsv4jax/sharding/` (collectives only there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4jax.model.moe import ONE_DEVICE, Collectives
from dsv4jax.pallas import KERNEL_CHOICES


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Identity layout: local tokens = the whole chunk, in token order; the MoE runs on them directly.

    `kernels` is the implementation every kernel op of this call runs ("auto": the Pallas kernel on a GPU where it
    supports the shapes, else the reference; "reference"; "pallas": the kernel, an error where unsupported). It
    travels with the call, so two runners tracing at once in threads can each choose their own.
    """

    kernels: str = "auto"

    def __post_init__(self):
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={self.kernels!r}; choose one of {', '.join(KERNEL_CHOICES)}")

    def chunk_length(self, local_length: int) -> int:
        """Tokens in the whole chunk, given the local token count."""
        return local_length

    def positions(self, start: jax.Array, local_length: int) -> jax.Array:
        """Absolute positions [B, S_local] of the local tokens of a chunk starting at `start` [B]."""
        return start[:, None] + jnp.arange(local_length)

    def gather_chunk(self, x: jax.Array) -> jax.Array:
        """Per-token values of the local tokens [B, S_local, ...] -> the whole chunk [B, S, ...] in token order."""
        return x

    @property
    def moe_collectives(self) -> Collectives:
        """How the MoE reaches tokens and experts on other devices (model/moe.py): here, none (one device)."""
        return ONE_DEVICE


IDENTITY = TokenLayout()
