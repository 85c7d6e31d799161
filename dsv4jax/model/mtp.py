"""The multi-token-prediction ("nextn") module (ARCHITECTURE §12.1): one extra sliding-window block that
predicts token t+2 from the main model's streams at t and the embedding of token t+1."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.block import Block
from dsv4jax.model.layout import IDENTITY, TokenLayout
from dsv4jax.model.linear import Embedding, Linear
from dsv4jax.model.mhc import HyperConnectionHead
from dsv4jax.model.norm import RMSNorm
from dsv4jax.model.state import DecodeState


class MTPBlock(Block):
    """`mtp.0.*`: a standard block plus e_proj/h_proj, enorm/hnorm, its own hc_head and norm.

    It shares the main model's embedding and LM head (no such tensors under `mtp.*`).
    """

    def __init__(self, config: ModelConfig, layer: int, rngs: nnx.Rngs):
        super().__init__(config, layer, rngs)
        c, dtype = config, jnp.dtype(config.dtype)
        fp8 = c.simulate_fp8_activations
        self.e_proj = Linear(c.hidden_size, c.hidden_size, ("embed", "embed_in"), dtype, rngs, fp8)
        self.h_proj = Linear(c.hidden_size, c.hidden_size, ("embed", "embed_in"), dtype, rngs, fp8)
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hc_head = HyperConnectionHead(c.hc_mult, c.hidden_size, c.hc_eps, c.rms_norm_eps, rngs)

    def __call__(self, main_streams: jax.Array, next_ids: jax.Array, embed: Embedding, state: DecodeState,
                 num_new: jax.Array, layout: TokenLayout = IDENTITY):
        """Under context parallelism main_streams/next_ids are the local tokens; the streams come back whole
        (PARALLELISM §5: the draft model's prefill is split and gathered like the target's)."""
        start = state.lengths
        e = self.e_proj(self.enorm(embed(next_ids)))
        h = self.h_proj(self.hnorm(main_streams.astype(self.dtype)))  # per stream
        streams = e[:, :, None, :] + h
        streams, layer_state = super().__call__(streams, next_ids, start, num_new, state.layers[0].at(0), layout)
        streams = layout.gather_chunk(streams)
        hidden = self.norm(self.hc_head(streams, self.dtype))
        return hidden, streams, DecodeState(lengths=start + num_new, layers=(layer_state.stacked(),))
