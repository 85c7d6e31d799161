"""Decode-time state of ARCHITECTURE §11, for a batch of sequences, as a pytree of fixed-shape arrays.

Everything is indexed by absolute position, so the same forward function serves full prefill, chunked
prefill, one-token decode and speculative verify:
- the raw K=V window is a ring of at least `sliding_window` slots, position p in slot p mod ring;
- a compressor keeps the fp32 projections (kv and gate + ape) of its last positions in a ring of at least
  coff·m slots (position p in slot p mod ring): the partial window, and for CSA also the previous complete
  window whose A-halves the next row needs (ARCHITECTURE §8.2, ARCHITECTURE §11);
- emitted compressed rows (main and indexer) live at row j of a buffer: dense per sequence, or `PagedRows`
  (a page pool shared by all sequences and a page table per sequence, for the serving engine).
Which slots hold real data follows from `lengths` alone, so fresh state needs no sentinel values.

Rings longer than the minimum by `ring_margin` slots make speculative decoding safe: a verify chunk of up to
margin + 1 tokens writes positions that may be rejected, and with the margin those writes never overwrite a
slot that the next accepted position still reads, so rolling back is just resetting `lengths`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv4jax.config import ModelConfig


def pytree_dataclass(cls):
    """A frozen dataclass registered as a pytree (its fields are the leaves)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@pytree_dataclass
class PagedRows:
    """Compressed rows in fixed-size pages: row j of sequence b is pool[table[b, j // r], j % r]."""

    pool: jax.Array  # [num_pages, rows_per_page, d_c]; page 0 is scratch, never handed out
    table: jax.Array  # [B, pages_per_sequence] int32 page ids (0 where unallocated)

    @property
    def dtype(self):
        return self.pool.dtype

    def view(self) -> jax.Array:
        """The rows of each sequence as a dense [B, pages·r, d_c] array (rows on unallocated pages are junk
        that no query can see: visibility follows from positions)."""
        pages = self.pool[self.table]  # [B, P, r, d_c]
        return pages.reshape(pages.shape[0], -1, pages.shape[-1])

    @property
    def rows_per_sequence(self) -> int:
        return self.table.shape[1] * self.pool.shape[1]

    def take(self, rows: jax.Array) -> jax.Array:
        """Rows `rows` [B, ...] (−1: any row) of each sequence -> [B, ..., d_c], read from the pool directly."""
        per_page = self.pool.shape[1]
        rows = jnp.maximum(rows, 0)
        flat_rows = rows.reshape(rows.shape[0], -1)
        page = jnp.take_along_axis(self.table, jnp.minimum(flat_rows // per_page, self.table.shape[1] - 1), axis=1)
        flat = (page * per_page + flat_rows % per_page).reshape(rows.shape)
        return self.pool.reshape(-1, self.pool.shape[-1])[flat]

    def write(self, rows: jax.Array, valid: jax.Array, values: jax.Array) -> "PagedRows":
        """pool[row rows[b, i] of sequence b] = values[b, i] where valid."""
        num_pages, per_page, dim = self.pool.shape
        page = jnp.take_along_axis(self.table, jnp.clip(rows // per_page, 0, self.table.shape[1] - 1), axis=1)
        flat = jnp.where(valid, page * per_page + rows % per_page, num_pages * per_page)  # out of range: dropped
        pool = self.pool.reshape(-1, dim).at[flat.reshape(-1)].set(
            values.reshape(-1, dim).astype(self.pool.dtype), mode="drop")
        return PagedRows(pool=pool.reshape(self.pool.shape), table=self.table)


def row_view(rows: jax.Array | PagedRows) -> jax.Array:
    """[B, R, d_c] rows of each sequence, whichever way they are stored."""
    return rows.view() if isinstance(rows, PagedRows) else rows


def row_write(rows: jax.Array | PagedRows, index: jax.Array, valid: jax.Array, values: jax.Array):
    """Store values [B, C, d_c] at row index [B, C] where valid (others dropped)."""
    if isinstance(rows, PagedRows):
        return rows.write(index, valid, values)
    batch = jnp.arange(rows.shape[0])[:, None]
    index = jnp.where(valid, index, rows.shape[1])
    return rows.at[batch, index].set(values.astype(rows.dtype), mode="drop")


@pytree_dataclass
class CompressorState:
    kv: jax.Array  # [B, ring ≥ coff·m, coff·d_c] fp32 projections of the last `ring` positions
    gate: jax.Array  # [B, ring, coff·d_c] fp32 gate logits (+ ape) of the same positions
    rows: jax.Array | PagedRows  # emitted rows, row j at index j: [B, max_len // m, d_c] or paged

    @staticmethod
    def zeros(batch: int, ratio: int, dim: int, max_len: int, dtype, ring_margin: int = 0) -> "CompressorState":
        coff = 2 if ratio == 4 else 1
        ring = (batch, coff * ratio + ring_margin, coff * dim)
        return CompressorState(kv=jnp.zeros(ring, jnp.float32), gate=jnp.zeros(ring, jnp.float32),
                               rows=jnp.zeros((batch, max(1, max_len // ratio), dim), dtype))  # ≥ 1: empty axes break gradients


@pytree_dataclass
class LayerState:
    window: jax.Array  # [B, ring ≥ w, head_dim] raw K=V ring
    compressor: CompressorState | None  # CSA and HCA layers
    indexer: CompressorState | None  # CSA layers: the indexer's own compressor and key rows

    @staticmethod
    def zeros(config: ModelConfig, layer: int, batch: int, max_len: int, dtype, ring_margin: int = 0) -> "LayerState":
        ratio = config.compress_ratio(layer)
        window = jnp.zeros((batch, config.sliding_window + ring_margin, config.head_dim), dtype)
        compressor = (CompressorState.zeros(batch, ratio, config.head_dim, max_len, dtype, ring_margin)
                      if ratio else None)
        indexer = (CompressorState.zeros(batch, ratio, config.index_head_dim, max_len, dtype, ring_margin)
                   if ratio == 4 else None)
        return LayerState(window=window, compressor=compressor, indexer=indexer)


@pytree_dataclass
class DecodeState:
    """State of a stack of layers (the main model's, or the MTP module's) for a batch of sequences."""

    lengths: jax.Array  # [B] int32: tokens already processed per sequence (= next position)
    layers: tuple[LayerState, ...]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def init_state(config: ModelConfig, batch: int, max_len: int, mtp: bool = False,
               ring_margin: int = 0) -> DecodeState:
    """Empty state for `batch` sequences of up to `max_len` tokens (main layers, or the MTP layer);
    `ring_margin` extra ring slots allow verify chunks of ring_margin + 1 speculative tokens."""
    dtype = jnp.dtype(config.dtype)
    layer_ids = [config.mtp_layer] if mtp else range(config.num_hidden_layers)
    return DecodeState(lengths=jnp.zeros((batch,), jnp.int32),
                       layers=tuple(LayerState.zeros(config, i, batch, max_len, dtype, ring_margin)
                                    for i in layer_ids))
