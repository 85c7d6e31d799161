"""The DeepSeek-V4 model: embedding, blocks, hyper-connection head, final norm, LM head, MTP (ARCHITECTURE §3)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.init import normal
from dsv4jax.model.layout import IDENTITY, TokenLayout
from dsv4jax.model.linear import Embedding, matmul_fp32
from dsv4jax.model.mhc import HyperConnectionHead
from dsv4jax.model.mtp import MTPBlock
from dsv4jax.model.norm import RMSNorm
from dsv4jax.model.stack import LayerStack
from dsv4jax.model.state import DecodeState


class DeepseekV4(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        dtype = jnp.dtype(c.dtype)
        self.config = c
        self.embed = Embedding(c.vocab_size, c.hidden_size, dtype, rngs)
        self.groups = nnx.List([LayerStack(c, group, rngs) for group in c.layer_groups()])  # ARCHITECTURE §3.1
        self.hc_head = HyperConnectionHead(c.hc_mult, c.hidden_size, c.hc_eps, c.rms_norm_eps, rngs)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = nnx.Param(normal(rngs, (c.vocab_size, c.hidden_size), c.hidden_size ** -0.5, dtype),
                              axes=("vocab", "embed"))
        self.mtp = nnx.List([MTPBlock(c, c.mtp_layer, rngs) for _ in range(c.num_mtp_layers)])

    def __call__(self, ids: jax.Array, state: DecodeState, num_new: jax.Array | None = None,
                 layout: TokenLayout = IDENTITY):
        """Run a chunk of tokens ids [B,S] at positions state.lengths + 0..S−1 (num_new [B] of them real).

        Returns (hidden [B,S,D] after the final norm, streams [B,S,n,D] before the hyper-connection head —
        what the MTP module consumes, ARCHITECTURE §12.1 — and the updated state). Under context parallelism `ids` are the
        local tokens (`layout`); the streams are gathered back to the whole chunk after the last block.
        """
        batch, local = ids.shape
        chunk = layout.chunk_length(local)
        if num_new is None:
            num_new = jnp.full((batch,), chunk, jnp.int32)
        start = state.lengths
        x = self.embed(ids)
        streams = jnp.broadcast_to(x[:, :, None, :], (batch, local, self.config.hc_mult, x.shape[-1]))
        layer_states, first = [], 0
        for index, group in enumerate(self.groups):
            period = group.group.period
            with jax.named_scope(f"group{index}"):
                streams, states = group(streams, ids, start, num_new, state.layers[first:first + period], layout)
            layer_states += states
            first += period
        streams = layout.gather_chunk(streams)
        with jax.named_scope("mhc"):
            hidden = self.norm(self.hc_head(streams, x.dtype))
        return hidden, streams, DecodeState(lengths=start + num_new, layers=tuple(layer_states))

    def with_scan_layers(self, scan_layers: bool) -> "DeepseekV4":
        """The same model with its layers grouped for `scan_layers` (ARCHITECTURE §3.1): same values, other layout."""
        from dsv4jax.checkpoint.names import checkpoint_layout, filled, flat_values, model_layout

        config = self.config.replace(scan_layers=scan_layers)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0))))
        per_layer = checkpoint_layout(self.config, flat_values(nnx.state(self)), lambda stacked, r: stacked[r])
        values = model_layout(config, per_layer, lambda _, parts: jnp.stack(parts))
        return nnx.merge(graphdef, filled(abstract, values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits from final hidden states (ARCHITECTURE §3: head weight upcast to fp32)."""
        with jax.named_scope("logits"):
            return matmul_fp32(hidden, self.head[...])

    def mtp_forward(self, streams: jax.Array, next_ids: jax.Array, state: DecodeState,
                    num_new: jax.Array | None = None, layout: TokenLayout = IDENTITY):
        """The MTP module on main-model streams [B,S,n,D] paired with the next tokens [B,S] (ARCHITECTURE §12.1).

        Returns (hidden after the MTP norm, MTP streams, MTP state); `logits(hidden)` predicts token t+2.
        """
        batch, local = next_ids.shape
        if num_new is None:
            num_new = jnp.full((batch,), layout.chunk_length(local), jnp.int32)
        with jax.named_scope("mtp"):
            return self.mtp[0](streams, next_ids, self.embed, state, num_new, layout)
