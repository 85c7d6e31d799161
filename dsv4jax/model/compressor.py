"""Gated softmax pooling of every m tokens into one compressed K=V row (ARCHITECTURE §8.2, state ARCHITECTURE §11).

CSA (m=4) overlaps windows: row j pools the A-halves of window j−1 and the B-halves of window j over 2m
slots; HCA (m=128) pools window j alone. The indexer has its own compressor (d_c = index_head_dim).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.model.init import fan_in_normal, normal
from dsv4jax.model.linear import matmul_fp32
from dsv4jax.model.norm import RMSNorm
from dsv4jax.model.rope import apply_rope
from dsv4jax.model.state import CompressorState, batch_scatter, row_write


def _batch_take(buffer: jax.Array, index: jax.Array) -> jax.Array:
    """buffer [B, N, ...], index [B, ...] -> buffer[b, index[b, ...]]."""
    return jax.vmap(lambda b, i: b[i])(buffer, index)


def simulate_quantization(x: jax.Array, kind: str | None, rope_dim: int = 64) -> jax.Array:
    """ARCHITECTURE §10.3 QAT simulations: "fp8" on the non-RoPE channels of K=V rows (block 64), "fp4" on indexer
    vectors after the orthonormal Hadamard transform (block 32); None leaves x unchanged."""
    from dsv4jax.quant import fp4_qdq, fp8_qdq, hadamard

    if kind is None:
        return x
    if kind == "fp8":
        nope = x.shape[-1] - rope_dim
        return jnp.concatenate([fp8_qdq(x[..., :nope], 64), x[..., nope:]], axis=-1)
    if kind == "fp4":
        return fp4_qdq(hadamard(x), 32)
    raise ValueError(f"unknown quantization simulation {kind!r}")


class Compressor(nnx.Module):
    """Parameters `wkv`, `wgate` [coff·d_c, D] (computed in fp32), `ape` [m, coff·d_c], `norm` [d_c]."""

    def __init__(self, hidden: int, dim: int, ratio: int, rope_dim: int, norm_eps: float, dtype, rngs: nnx.Rngs,
                 row_transform: str | None = None):
        self.ratio, self.dim, self.rope_dim = ratio, dim, rope_dim
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = nnx.Param(fan_in_normal(rngs, (coff * dim, hidden), dtype), axes=("compress_dim", "embed"))
        self.wgate = nnx.Param(fan_in_normal(rngs, (coff * dim, hidden), dtype), axes=("compress_dim", "embed"))
        self.ape = nnx.Param(normal(rngs, (ratio, coff * dim), 0.5, jnp.float32), axes=(None, "compress_dim"))
        self.norm = RMSNorm(dim, norm_eps, axis_name="compress_row")
        # Applied to each emitted row after norm and RoPE (ARCHITECTURE §8.2): "fp8" (KV simulation) or "fp4" (indexer).
        self.row_transform = row_transform

    def project(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """The per-token compressor input: [kv ‖ gate + ape] [B, S, 2·coff·d_c] fp32 of tokens at `positions`.

        Per token, so context parallelism computes it for the local tokens and gathers it (PARALLELISM §1.1).
        """
        kv = matmul_fp32(x, self.wkv[...])
        gate = matmul_fp32(x, self.wgate[...]) + self.ape[...][positions % self.ratio]
        return jnp.concatenate([kv, gate], axis=-1)

    def absorb(self, projections: jax.Array, state: CompressorState, start: jax.Array, num_new: jax.Array,
               frequencies) -> CompressorState:
        """Pool the projections [B, S, 2·coff·d_c] of a whole chunk at positions start + 0..S−1 into the state."""
        m, dim = self.ratio, self.dim
        batch, chunk = projections.shape[:2]
        ring = state.kv.shape[1]  # coff·m
        positions = start[:, None] + jnp.arange(chunk)
        kv, gate = jnp.split(projections, 2, axis=-1)

        # Candidate rows: every row whose last position may fall inside this chunk.
        num_candidates = -(-chunk // m)
        rows = start[:, None] // m + jnp.arange(num_candidates)  # [B, C]
        complete = (rows + 1) * m <= (start + num_new)[:, None]
        if self.overlap:  # slots 0..m−1: window j−1 (A-half); slots m..2m−1: window j (B-half)
            slot_positions = (rows[..., None] - 1) * m + jnp.arange(2 * m)
        else:
            slot_positions = rows[..., None] * m + jnp.arange(m)
        # A position before `start` is in the ring (slot p mod ring), later ones are in the chunk.
        in_chunk = slot_positions >= start[:, None, None]
        index = jnp.where(in_chunk, ring + slot_positions - start[:, None, None], slot_positions % ring)
        index = jnp.clip(index, 0, ring + chunk - 1).reshape(batch, -1)
        slot_kv = _batch_take(jnp.concatenate([state.kv.read(), kv], axis=1), index)
        slot_gate = _batch_take(jnp.concatenate([state.gate.read(), gate], axis=1), index)
        slot_kv = slot_kv.reshape(batch, num_candidates, -1, slot_kv.shape[-1])
        slot_gate = slot_gate.reshape(batch, num_candidates, -1, slot_gate.shape[-1])
        if self.overlap:
            slot_kv = jnp.concatenate([slot_kv[:, :, :m, :dim], slot_kv[:, :, m:, dim:]], axis=2)
            slot_gate = jnp.concatenate([slot_gate[:, :, :m, :dim], slot_gate[:, :, m:, dim:]], axis=2)
        # Positions before 0 (window −1 of row 0) carry weight 0.
        slot_gate = jnp.where((slot_positions >= 0)[..., None], slot_gate, -jnp.inf)
        weights = jax.nn.softmax(slot_gate, axis=2)
        pooled = jnp.sum(weights * slot_kv, axis=2)  # [B, C, d_c] fp32

        # ARCHITECTURE §8.2 post-processing, in this order: cast, RMSNorm, RoPE at the row's first position, transform.
        new_rows = self.norm(pooled.astype(state.rows.dtype))
        new_rows = apply_rope(new_rows, rows * m, frequencies)
        new_rows = simulate_quantization(new_rows, self.row_transform, self.rope_dim)
        row_buffer = row_write(state.rows, rows, complete, new_rows)

        # Keep the projections of the last `ring` real positions for later rows.
        end = (start + num_new)[:, None]
        keep = (positions < end) & (positions >= end - ring)
        slot = jnp.where(keep, positions % ring, ring)
        return CompressorState(kv=batch_scatter(state.kv, slot, kv), gate=batch_scatter(state.gate, slot, gate),
                               rows=row_buffer)
