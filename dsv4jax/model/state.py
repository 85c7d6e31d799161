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
                               rows=jnp.zeros((batch, max_len // ratio, dim), dtype))


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
    def max_len(self) -> int:
        """Token capacity of the compressed-row buffers (sliding-only stacks have no limit)."""
        for layer in self.layers:
            if layer.compressor is not None:
                ratio = layer.compressor.kv.shape[1] // (2 if layer.indexer is not None else 1)
                return layer.compressor.rows.shape[1] * ratio
        return 1 << 62


def init_state(config: ModelConfig, batch: int, max_len: int, mtp: bool = False) -> DecodeState:
    """Empty state for `batch` sequences of up to `max_len` tokens (main layers, or the MTP layer)."""
    dtype = jnp.dtype(config.dtype)
    layer_ids = [config.mtp_layer] if mtp else range(config.num_hidden_layers)
    return DecodeState(lengths=jnp.zeros((batch,), jnp.int32),
                       layers=tuple(LayerState.zeros(config, i, batch, max_len, dtype) for i in layer_ids))
