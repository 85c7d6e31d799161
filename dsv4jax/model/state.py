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

The layers of a scanned group (ARCHITECTURE §3.1) keep their state stacked: every leaf of a `LayerState` in
`DecodeState.layers` has a leading layer axis, [layers, B, ...], and a paged pool [layers, pages, r, d_c]. Inside
the model a layer sees its own part as `LayerSlice`s: reads take that layer, writes scatter into the stack in place,
so running a group under a scan never copies its caches.
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
class LayerSlice:
    """Layer `layer` of a stack of per-layer buffers [L, ...]: what the model reads and writes as one layer's buffer."""

    stack: jax.Array  # [L, ...]
    layer: jax.Array  # int32 scalar

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype

    def read(self) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(self.stack, self.layer, 0, keepdims=False)

    def get(self, index: tuple) -> jax.Array:
        """This layer's buffer[index] (advanced indices), read from the stack directly."""
        return self.stack[(self.layer, *index)]

    def set(self, index: tuple, values: jax.Array) -> "LayerSlice":
        """buffer[index] = values in the stack (out-of-range indices dropped)."""
        stack = self.stack.at[(self.layer, *index)].set(values.astype(self.dtype), mode="drop")
        return LayerSlice(stack=stack, layer=self.layer)


@pytree_dataclass
class PagedRows:
    """Compressed rows in fixed-size pages: row j of sequence b is pool[table[b, j // r], j % r]."""

    pool: jax.Array | LayerSlice  # [num_pages, rows_per_page, d_c] per layer; page 0 is scratch, never handed out
    table: jax.Array  # [B, pages_per_sequence] int32 page ids (0 where unallocated), shared by all layers

    @property
    def dtype(self):
        return self.pool.dtype

    def view(self) -> jax.Array:
        """The rows of each sequence as a dense [B, pages·r, d_c] array (rows on unallocated pages are junk
        that no query can see: visibility follows from positions)."""
        pages = self.pool.get((self.table,))  # [B, P, r, d_c]
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
        return self.pool.get((page.reshape(rows.shape), rows % per_page))

    def write(self, rows: jax.Array, valid: jax.Array, values: jax.Array) -> "PagedRows":
        """pool[row rows[b, i] of sequence b] = values[b, i] where valid."""
        num_pages, per_page = self.pool.shape[:2]
        page = jnp.take_along_axis(self.table, jnp.clip(rows // per_page, 0, self.table.shape[1] - 1), axis=1)
        page = jnp.where(valid, page, num_pages)  # out of range: dropped
        return PagedRows(pool=self.pool.set((page, rows % per_page), values), table=self.table)


def row_view(rows: LayerSlice | PagedRows) -> jax.Array:
    """[B, R, d_c] rows of each sequence, whichever way they are stored."""
    return rows.view() if isinstance(rows, PagedRows) else rows.read()


def row_write(rows: LayerSlice | PagedRows, index: jax.Array, valid: jax.Array, values: jax.Array):
    """Store values [B, C, d_c] at row index [B, C] where valid (others dropped)."""
    if isinstance(rows, PagedRows):
        return rows.write(index, valid, values)
    return batch_scatter(rows, jnp.where(valid, index, rows.shape[1]), values)


def batch_scatter(buffer: LayerSlice, index: jax.Array, values: jax.Array) -> LayerSlice:
    """buffer[b, index[b, i]] = values[b, i]; out-of-range indices are dropped."""
    return buffer.set((jnp.arange(buffer.shape[0])[:, None], index), values)


@pytree_dataclass
class CompressorState:
    kv: jax.Array | LayerSlice  # [B, ring ≥ coff·m, coff·d_c] fp32 projections of the last `ring` positions
    gate: jax.Array | LayerSlice  # [B, ring, coff·d_c] fp32 gate logits (+ ape) of the same positions
    rows: jax.Array | LayerSlice | PagedRows  # emitted rows, row j at index j: [B, max_len // m, d_c] or paged

    @staticmethod
    def zeros(batch: int, ratio: int, dim: int, max_len: int, dtype, ring_margin: int = 0) -> "CompressorState":
        coff = 2 if ratio == 4 else 1
        ring = (batch, coff * ratio + ring_margin, coff * dim)
        return CompressorState(kv=jnp.zeros(ring, jnp.float32), gate=jnp.zeros(ring, jnp.float32),
                               rows=jnp.zeros((batch, max(1, max_len // ratio), dim), dtype))  # ≥ 1: empty axes break gradients


@pytree_dataclass
class LayerState:
    window: jax.Array | LayerSlice  # [B, ring ≥ w, head_dim] raw K=V ring
    compressor: CompressorState | None  # CSA and HCA layers
    indexer: CompressorState | None  # CSA layers: the indexer's own compressor and key rows

    def at(self, layer: jax.Array) -> "LayerState":
        """Of a stacked state (leaves [L, B, ...]): layer `layer` as LayerSlices, for the model to read and write."""
        def slice_of(buffer):
            if isinstance(buffer, PagedRows):
                return PagedRows(pool=LayerSlice(buffer.pool, layer), table=buffer.table)
            return LayerSlice(buffer, layer)

        return _map_buffers(self, slice_of)

    def stacked(self) -> "LayerState":
        """The inverse of `at`: the stacks, updated."""
        def stack_of(buffer):
            if isinstance(buffer, PagedRows):
                return PagedRows(pool=buffer.pool.stack, table=buffer.table)
            return buffer.stack

        return _map_buffers(self, stack_of)

    @staticmethod
    def zeros(config: ModelConfig, layer: int, batch: int, max_len: int, dtype, ring_margin: int = 0) -> "LayerState":
        ratio = config.compress_ratio(layer)
        window = jnp.zeros((batch, config.sliding_window + ring_margin, config.head_dim), dtype)
        compressor = (CompressorState.zeros(batch, ratio, config.head_dim, max_len, dtype, ring_margin)
                      if ratio else None)
        indexer = (CompressorState.zeros(batch, ratio, config.index_head_dim, max_len, dtype, ring_margin)
                   if ratio == 4 else None)
        return LayerState(window=window, compressor=compressor, indexer=indexer)


def _map_buffers(layer: LayerState, f) -> LayerState:
    def compressor(c: CompressorState | None):
        return None if c is None else CompressorState(kv=f(c.kv), gate=f(c.gate), rows=f(c.rows))

    return LayerState(window=f(layer.window), compressor=compressor(layer.compressor),
                      indexer=compressor(layer.indexer))


@pytree_dataclass
class DecodeState:
    """State of a stack of layers (the main model's, or the MTP module's) for a batch of sequences."""

    lengths: jax.Array  # [B] int32: tokens already processed per sequence (= next position)
    # One stacked LayerState per (group, position in the unit), in group order (ARCHITECTURE §3.1); the MTP
    # module's: one, of one layer.
    layers: tuple[LayerState, ...]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]


def state_stacks(config: ModelConfig, mtp: bool = False) -> list[list[int]]:
    """The layers whose state each entry of `DecodeState.layers` stacks, in stack order."""
    if mtp:
        return [[config.mtp_layer]]
    return [[group.layer(r, j) for r in range(group.repeats)]
            for group in config.layer_groups() for j in range(group.period)]


def init_state(config: ModelConfig, batch: int, max_len: int, mtp: bool = False,
               ring_margin: int = 0) -> DecodeState:
    """Empty state for `batch` sequences of up to `max_len` tokens (main layers, or the MTP layer);
    `ring_margin` extra ring slots allow verify chunks of ring_margin + 1 speculative tokens."""
    dtype = jnp.dtype(config.dtype)

    def stack(layers):
        one = LayerState.zeros(config, layers[0], batch, max_len, dtype, ring_margin)
        return jax.tree.map(lambda leaf: jnp.zeros((len(layers), *leaf.shape), leaf.dtype), one)

    return DecodeState(lengths=jnp.zeros((batch,), jnp.int32),
                       layers=tuple(stack(layers) for layers in state_stacks(config, mtp)))


def layer_state(state: DecodeState, config: ModelConfig, layer: int, mtp: bool = False) -> LayerState:
    """The state of one layer (main layer `layer`, or the MTP layer), unstacked: leaves [B, ...]."""
    for stack, layers in zip(state.layers, state_stacks(config, mtp)):
        if layer in layers:
            index = layers.index(layer)
            return jax.tree.map(lambda leaf: leaf[index], stack)
    raise ValueError(f"no layer {layer} in this state")
