"""The V4 attention layer: q-LoRA, one shared K=V head, sink, inverse RoPE, grouped output (ARCHITECTURE §7)
over the window and, for CSA/HCA layers, compressed rows (ARCHITECTURE §8)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.compressor import Compressor, simulate_quantization
from dsv4jax.model.indexer import Indexer
from dsv4jax.model.init import normal
from dsv4jax.model.inspection import record
from dsv4jax.model.layout import IDENTITY, TokenLayout
from dsv4jax.model.linear import Linear
from dsv4jax.model.norm import RMSNorm, rms_normalize
from dsv4jax.model.rope import apply_rope, rope_frequencies
from dsv4jax.model.state import LayerState, PagedRows, batch_scatter, row_view
from dsv4jax.pallas.sparse_attention import sparse_attention


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.head_dim, self.rope_dim = c.num_attention_heads, c.head_dim, c.rope_head_dim
        self.groups, self.window, self.eps = c.o_groups, c.sliding_window, c.rms_norm_eps
        self.ratio = c.compress_ratio(layer)
        self.config = c
        # ARCHITECTURE §10.3 item 2: FP8 simulation of the non-RoPE channels of raw K=V and compressed rows.
        self.kv_quantization = "fp8" if c.simulate_fp8_kv else None
        fp8_act = c.simulate_fp8_activations
        heads_dim = c.num_attention_heads * c.head_dim
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank, ("q_lora", "embed"), dtype, rngs, fp8_act)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, axis_name="q_lora")
        self.wq_b = Linear(c.q_lora_rank, heads_dim, ("heads_dim", "q_lora"), dtype, rngs, fp8_act)
        self.wkv = Linear(c.hidden_size, c.head_dim, ("head_dim", "embed"), dtype, rngs, fp8_act)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps, axis_name="head_dim")
        self.wo_a = Linear(heads_dim // c.o_groups, c.o_groups * c.o_lora_rank, ("o_groups_rank", "group_heads_dim"),
                           dtype, rngs)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, ("embed", "o_groups_rank"), dtype, rngs,
                           fp8_act)
        self.attn_sink = nnx.Param(normal(rngs, (c.num_attention_heads,), 1.0, jnp.float32), axes=("heads",))
        self.compressor = (Compressor(c.hidden_size, c.head_dim, self.ratio, c.rope_head_dim, c.rms_norm_eps, dtype, rngs,
                                      self.kv_quantization) if self.ratio else None)
        self.indexer = Indexer(c, dtype, rngs) if self.ratio == 4 else None

    def __call__(self, x: jax.Array, start: jax.Array, num_new: jax.Array, state: LayerState,
                 layout: TokenLayout = IDENTITY):
        """x [B,S,D] (after attn_norm) at positions start + 0..S−1, num_new [B] real tokens -> (out, state).

        Under context parallelism x holds only the local tokens (`layout.positions`); the per-token K=V and
        compressor inputs are gathered to the whole chunk, so every rank builds the complete caches and
        attends with its local queries only (PARALLELISM §1.1).
        """
        batch, local = x.shape[:2]
        chunk = layout.chunk_length(local)
        freqs = rope_frequencies(self.config, self.ratio)
        positions = layout.positions(start, local)  # of the local queries
        chunk_positions = start[:, None] + jnp.arange(chunk)

        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).reshape(batch, local, self.num_heads, self.head_dim)
        q = rms_normalize(q, self.eps).astype(x.dtype)  # ARCHITECTURE §5: per-head, unweighted
        q = apply_rope(q, positions[..., None], freqs)
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, freqs)
        kv = layout.gather_chunk(simulate_quantization(kv, self.kv_quantization, self.rope_dim))

        # Candidate rows live in one buffer: [window ring | this chunk | compressed rows].
        buffers = [state.window.read(), kv]
        ring = state.window.shape[1]
        indices = [self._window_indices(positions, start, ring)]
        compressor, indexer = state.compressor, state.indexer
        if self.ratio:
            with jax.named_scope("compressor"):
                projections = layout.gather_chunk(self.compressor.project(x, positions))
                compressor = self.compressor.absorb(projections, compressor, start, num_new, freqs)
            offset = ring + chunk
            if self.ratio == 4:
                with jax.named_scope("indexer"):
                    index_projections = layout.gather_chunk(self.indexer.compressor.project(x, positions))
                    indexer = self.indexer.compressor.absorb(index_projections, indexer, start, num_new, freqs)
                    rows = self.indexer(x, q_latent, positions, row_view(indexer.rows), freqs,
                                        implementation=layout.kernels)
                record(self, "indexer_rows", rows)
                paged = isinstance(compressor.rows, PagedRows)
                if paged and rows.shape[1] * rows.shape[2] < compressor.rows.rows_per_sequence:
                    # Decode-sized calls read only the selected rows from the pages, not each sequence's
                    # whole row cache: query s's k-th pick sits at offset + s·K + k.
                    buffers.append(compressor.rows.take(rows).reshape(batch, -1, self.head_dim))
                    picks = offset + jnp.arange(rows.shape[1] * rows.shape[2]).reshape(rows.shape[1:])
                    indices.append(jnp.where(rows >= 0, picks, -1))
                else:
                    buffers.append(row_view(compressor.rows))
                    indices.append(jnp.where(rows >= 0, rows + offset, -1))
            else:  # HCA attends every visible row (ARCHITECTURE §8.3)
                compressed_rows = row_view(compressor.rows)
                num_rows = compressed_rows.shape[1]
                rows = jnp.broadcast_to(jnp.arange(num_rows), (batch, local, num_rows))
                rows = jnp.where(rows < ((positions + 1) // self.ratio)[..., None], rows, -1)
                buffers.append(compressed_rows)
                indices.append(jnp.where(rows >= 0, rows + offset, -1))
        out = sparse_attention(q, jnp.concatenate(buffers, axis=1), jnp.concatenate(indices, axis=-1),
                               self.attn_sink[...], self.head_dim ** -0.5, implementation=layout.kernels)

        with jax.named_scope("output"):
            out = apply_rope(out, positions[..., None], freqs, inverse=True)  # ARCHITECTURE §6.3
            out = self._grouped_output(out)

        end = (start + num_new)[:, None]
        keep = (chunk_positions < end) & (chunk_positions >= end - ring)
        new_window = batch_scatter(state.window, jnp.where(keep, chunk_positions % ring, ring), kv)
        return out, LayerState(window=new_window, compressor=compressor, indexer=indexer)

    def _window_indices(self, positions, start, ring):
        """Buffer index of position t−i (i < w) for each query t: ring slot if before `start`, else in chunk."""
        key_positions = positions[..., None] - jnp.arange(self.window)  # [B,S,w]
        start = start[:, None, None]
        index = jnp.where(key_positions >= start, ring + key_positions - start, key_positions % ring)
        return jnp.where(key_positions >= 0, index, -1).astype(jnp.int32)

    def _grouped_output(self, out: jax.Array) -> jax.Array:
        """ARCHITECTURE §7: heads g·H/G … (g+1)·H/G−1 form group g; per-group wo_a, then wo_b over all groups."""
        batch, chunk = out.shape[:2]
        grouped = out.reshape(batch, chunk, self.groups, -1)
        wo_a = self.wo_a.weight[...].reshape(self.groups, -1, grouped.shape[-1])
        mixed = jnp.einsum("bsgk,grk->bsgr", grouped, wo_a.astype(out.dtype), preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST).astype(out.dtype)
        return self.wo_b(mixed.reshape(batch, chunk, -1))
