"""The engine's caches: per-slot V4 state (ARCHITECTURE §11) for many sequences, with the growing
compressed-row and indexer-key caches in fixed-size pages (PagedRows) handed out by a host-side allocator.

One page table serves every layer: a page covers `page_tokens` positions of a sequence, so it holds
page_tokens / m rows of a ratio-m layer (CSA rows and indexer keys, HCA rows), each layer in its own pool.
The fixed-size parts (window ring, compressor rings) live per slot; slot `num_slots` is a scratch slot that
padding rows of a batch bucket point at. Every leaf is stacked over the layers of its state stack
(ARCHITECTURE §3.1): rings [L, slots, ...], pools [L, pages, r, d_c].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.config import ModelConfig
from dsv4jax.model.state import (CompressorState, DecodeState, LayerState, PagedRows, init_state, pytree_dataclass,
                                 state_stacks)


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Free list of page ids 1..num_pages−1 (page 0 is the scratch page that unallocated table entries name)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def total(self) -> int:
        return self.num_pages - 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPages(f"{count} pages wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@pytree_dataclass
class EngineCaches:
    """Device state of all slots. In `target` and `mtp`, compressor `rows` hold page pools [pages, r, d_c]."""

    target: DecodeState
    mtp: DecodeState | None  # the MTP layer's state (speculative decoding only)
    last_streams: jax.Array | None  # [slots+1, n, D] target streams at each sequence's last processed position
    counts: jax.Array  # [slots+1, V] int32 generated-token counts (presence / frequency penalties)
    seen: jax.Array  # [slots+1, V] bool prompt ∪ generated tokens (repetition penalty)
    # Each slot's committed length and its next token (sampled, not yet processed). Decode steps read them here,
    # not from the host, so a step can be dispatched before the previous one is read back (SERVING §D.5).
    lengths: jax.Array  # [slots+1] int32
    pending: jax.Array  # [slots+1] int32
    # Prefix caching (SERVING §D.8): each snapshot slot holds the rings of a sequence at a page boundary (target
    # and MTP layers) and the set of tokens before it; None without a prefix cache.
    snapshots: DecodeState | None
    mtp_snapshots: DecodeState | None
    snapshot_seen: jax.Array | None  # [snapshots, V] bool


def _paged(state: DecodeState, config: ModelConfig, mtp: bool, num_pages: int, page_tokens: int) -> DecodeState:
    """Replace each dense row buffer by a zero page pool."""
    def pool(compressor: CompressorState | None, ratio: int):
        if compressor is None:
            return None
        layers, dim = compressor.rows.shape[0], compressor.rows.shape[-1]
        return dataclasses.replace(compressor, rows=jnp.zeros((layers, num_pages, page_tokens // ratio, dim),
                                                              compressor.rows.dtype))

    stacks = state_stacks(config, mtp)
    layers = tuple(dataclasses.replace(layer, compressor=pool(layer.compressor, config.compress_ratio(ids[0])),
                                       indexer=pool(layer.indexer, config.compress_ratio(ids[0])))
                   for ids, layer in zip(stacks, state.layers))
    return DecodeState(lengths=state.lengths, layers=layers)


def init_caches(config: ModelConfig, num_slots: int, num_pages: int, page_tokens: int,
                speculative_steps: int, snapshots: int = 0) -> EngineCaches:
    """Empty caches for `num_slots` sequences (+ the scratch slot), a pool of `num_pages` pages and `snapshots`
    prefix-cache snapshot slots (0: no prefix cache)."""
    slots = num_slots + 1
    margin = speculative_steps  # ring slack so rejected speculative writes never clobber live slots
    target = _paged(init_state(config, slots, 1, ring_margin=margin), config, False, num_pages, page_tokens)
    mtp = last_streams = None
    if speculative_steps:
        mtp = _paged(init_state(config, slots, 1, mtp=True, ring_margin=margin), config, True, num_pages, page_tokens)
        last_streams = jnp.zeros((slots, config.hc_mult, config.hidden_size), jnp.dtype(config.dtype))
    target_snapshots = mtp_snapshots = seen = None
    if snapshots:  # rings only: their dense row buffers hold a single row and are never used
        target_snapshots = init_state(config, snapshots, 1, ring_margin=margin)
        if speculative_steps:
            mtp_snapshots = init_state(config, snapshots, 1, mtp=True, ring_margin=margin)
        seen = jnp.zeros((snapshots, config.vocab_size), bool)
    return EngineCaches(target=target, mtp=mtp, last_streams=last_streams,
                        counts=jnp.zeros((slots, config.vocab_size), jnp.int32),
                        seen=jnp.zeros((slots, config.vocab_size), bool),
                        lengths=jnp.zeros((slots,), jnp.int32), pending=jnp.zeros((slots,), jnp.int32),
                        snapshots=target_snapshots, mtp_snapshots=mtp_snapshots, snapshot_seen=seen)


def copy_rings(dst: DecodeState, dst_index: jax.Array, src: DecodeState, src_index: jax.Array) -> DecodeState:
    """dst's per-sequence rings (window, compressor and indexer blocks) at dst_index [n] set to src's at
    src_index [n]; indices past dst's end are dropped. Row pools and lengths are left alone."""
    def put(d, s):
        return d.at[:, dst_index].set(s[:, src_index], mode="drop")

    def compressor(d: CompressorState | None, s: CompressorState | None):
        return None if d is None else dataclasses.replace(d, kv=put(d.kv, s.kv), gate=put(d.gate, s.gate))

    layers = tuple(LayerState(window=put(d.window, s.window), compressor=compressor(d.compressor, s.compressor),
                              indexer=compressor(d.indexer, s.indexer)) for d, s in zip(dst.layers, src.layers))
    return dataclasses.replace(dst, layers=layers)


def restore_snapshots(caches: EngineCaches, slots: jax.Array, source: jax.Array) -> EngineCaches:
    """Rows with a snapshot to resume from (source [b] < snapshots) get its rings and its seen tokens in their
    slots, and no generated-token counts (a prefix hit is never past the prompt)."""
    count = caches.snapshot_seen.shape[0]
    dest = jnp.where(source < count, slots, caches.counts.shape[0])  # out of range: dropped
    source = jnp.minimum(source, count - 1)
    mtp = None if caches.mtp is None else copy_rings(caches.mtp, dest, caches.mtp_snapshots, source)
    return dataclasses.replace(caches, target=copy_rings(caches.target, dest, caches.snapshots, source), mtp=mtp,
                               counts=caches.counts.at[dest].set(0, mode="drop"),
                               seen=caches.seen.at[dest].set(caches.snapshot_seen[source], mode="drop"))


def take_snapshots(caches: EngineCaches, slots: jax.Array, dest: jax.Array) -> EngineCaches:
    """Copy the rings and seen tokens of rows with a snapshot slot (dest [b] < snapshots) into it."""
    mtp = None if caches.mtp is None else copy_rings(caches.mtp_snapshots, dest, caches.mtp, slots)
    return dataclasses.replace(caches, snapshots=copy_rings(caches.snapshots, dest, caches.target, slots),
                               mtp_snapshots=mtp,
                               snapshot_seen=caches.snapshot_seen.at[dest].set(caches.seen[slots], mode="drop"))


def _map_layers(state: DecodeState, per_slot, pooled) -> DecodeState:
    """Apply per_slot(array) to the slot-indexed leaves (window, rings) and pooled(pool) to the row pools."""
    def compressor(c: CompressorState | None):
        if c is None:
            return None
        return CompressorState(kv=per_slot(c.kv), gate=per_slot(c.gate), rows=pooled(c.rows))

    layers = tuple(LayerState(window=per_slot(layer.window), compressor=compressor(layer.compressor),
                              indexer=compressor(layer.indexer)) for layer in state.layers)
    return DecodeState(lengths=state.lengths, layers=layers)


def gather_slots(state: DecodeState, slots: jax.Array, starts: jax.Array, tables: jax.Array) -> DecodeState:
    """The model-ready state of a batch: rows `slots` of every ring, the shared pools behind the batch's page
    tables, and lengths `starts` (given per step, not read from the state: a speculative rollback is free)."""
    batch = _map_layers(state, lambda a: a[:, slots], lambda pool: PagedRows(pool=pool, table=tables))
    return dataclasses.replace(batch, lengths=starts)


def scatter_slots(state: DecodeState, batch: DecodeState, slots: jax.Array) -> DecodeState:
    """Write a batch's rings back to their slots and keep its updated pools."""
    def compressor(c: CompressorState | None, b: CompressorState | None):
        if c is None:
            return None
        return CompressorState(kv=c.kv.at[:, slots].set(b.kv), gate=c.gate.at[:, slots].set(b.gate), rows=b.rows.pool)

    layers = tuple(LayerState(window=layer.window.at[:, slots].set(new.window),
                              compressor=compressor(layer.compressor, new.compressor),
                              indexer=compressor(layer.indexer, new.indexer))
                   for layer, new in zip(state.layers, batch.layers))
    return DecodeState(lengths=state.lengths, layers=layers)


def pages_for(tokens: int, page_tokens: int) -> int:
    return -(-tokens // page_tokens)


def table_row(pages: list[int], width: int) -> np.ndarray:
    row = np.zeros((width,), np.int32)
    row[:len(pages)] = pages
    return row
