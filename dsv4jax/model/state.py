"""Decode-time state of ARCHITECTURE §11, for a batch of sequences, as a pytree of fixed-shape arrays.

Everything is indexed by absolute position, so the same forward function serves full prefill, chunked
prefill and one-token decode:
- the raw K=V window is a ring of `sliding_window` slots, position p in slot p mod w;
- a compressor keeps the fp32 projections (kv and gate + ape) of its last `coff·m` positions in a ring
  (position p in slot p mod coff·m): the partial window, and for CSA also the previous complete window whose
  A-halves the next row needs (§8.2, §11);
- emitted compressed rows (main and indexer) live at row j of a buffer sized for `max_len` tokens.
Which slots hold real data follows from `lengths` alone, so fresh state needs no sentinel values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4jax.config import ModelConfig


def _pytree(cls):
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class CompressorState:
    kv: jax.Array  # [B, coff·m, coff·d_c] fp32 projections of the last coff·m positions
    gate: jax.Array  # [B, coff·m, coff·d_c] fp32 gate logits (+ ape) of the same positions
    rows: jax.Array  # [B, max_len // m, d_c] emitted rows, row j at index j

    @staticmethod
    def zeros(batch: int, ratio: int, dim: int, max_len: int, dtype) -> "CompressorState":
        coff = 2 if ratio == 4 else 1
        ring = (batch, coff * ratio, coff * dim)
        return CompressorState(kv=jnp.zeros(ring, jnp.float32), gate=jnp.zeros(ring, jnp.float32),
                               rows=jnp.zeros((batch, max(1, max_len // ratio), dim), dtype))  # ≥ 1: empty axes break gradients


@_pytree
class LayerState:
    window: jax.Array  # [B, w, head_dim] raw K=V ring
    compressor: CompressorState | None  # CSA and HCA layers
    indexer: CompressorState | None  # CSA layers: the indexer's own compressor and key rows

    @staticmethod
    def zeros(config: ModelConfig, layer: int, batch: int, max_len: int, dtype) -> "LayerState":
        ratio = config.compress_ratio(layer)
        window = jnp.zeros((batch, config.sliding_window, config.head_dim), dtype)
        compressor = CompressorState.zeros(batch, ratio, config.head_dim, max_len, dtype) if ratio else None
        indexer = CompressorState.zeros(batch, ratio, config.index_head_dim, max_len, dtype) if ratio == 4 else None
        return LayerState(window=window, compressor=compressor, indexer=indexer)


@_pytree
class DecodeState:
    """State of a stack of layers (the main model's, or the MTP module's) for a batch of sequences."""

    lengths: jax.Array  # [B] int32: tokens already processed per sequence (= next position)
    layers: tuple[LayerState, ...]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int | None:
        """Tokens per sequence the row buffers can hold (None: sliding-only, unlimited)."""
        limits = []
        for layer in self.layers:
            for compressor in (layer.compressor, layer.indexer):
                if compressor is not None:
                    coff = compressor.kv.shape[2] // compressor.rows.shape[2]  # projections are coff·d_c wide
                    ratio = compressor.kv.shape[1] // coff  # the ring holds coff·m positions
                    # Row j is emitted once position (j+1)·m − 1 is processed: R rows last until (R+1)·m − 1.
                    limits.append((compressor.rows.shape[1] + 1) * ratio - 1)
        return min(limits) if limits else None

    def check_room(self, num_new) -> None:
        """Raise if adding `num_new` [B] tokens would overflow a row buffer (rows would be silently dropped)."""
        import numpy as np

        capacity = self.capacity
        if capacity is None:
            return
        needed = int(np.max(np.asarray(self.lengths) + np.asarray(num_new)))
        if needed > capacity:
            raise ValueError(f"sequence length {needed} exceeds the state's capacity of {capacity} tokens; "
                             f"create the state with a larger max_len")


def init_state(config: ModelConfig, batch: int, max_len: int, mtp: bool = False) -> DecodeState:
    """Empty state for `batch` sequences of up to `max_len` tokens (main layers, or the MTP layer)."""
    dtype = jnp.dtype(config.dtype)
    layer_ids = [config.mtp_layer] if mtp else range(config.num_hidden_layers)
    return DecodeState(lengths=jnp.zeros((batch,), jnp.int32),
                       layers=tuple(LayerState.zeros(config, i, batch, max_len, dtype) for i in layer_ids))
