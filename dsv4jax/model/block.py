"""One transformer block: attention and MoE sub-layers, each wrapped in hyper-connections (ARCHITECTURE §3)."""

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.attention import Attention
from dsv4jax.model.layout import IDENTITY, TokenLayout
from dsv4jax.model.mhc import HyperConnection
from dsv4jax.model.moe import MoE
from dsv4jax.model.norm import RMSNorm
from dsv4jax.model.state import LayerState


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, rngs: nnx.Rngs):
        c = config
        dtype = jnp.dtype(c.dtype)
        self.dtype = dtype

        def hyper_connection():
            return HyperConnection(c.hc_mult, c.hidden_size, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps, rngs)

        self.hc_attn = hyper_connection()
        self.hc_ffn = hyper_connection()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, layer, dtype, rngs)
        self.ffn = MoE(c, layer, dtype, rngs)

    def __call__(self, streams: jax.Array, ids: jax.Array, start: jax.Array, num_new: jax.Array,
                 state: LayerState, layout: TokenLayout = IDENTITY, layer=None) -> tuple[jax.Array, LayerState]:
        """streams [B,S,n,D] -> (streams, state); under context parallelism S is the local token count.
        `state` is this layer's (LayerSlices); `layer`: inside a scanned group, the routed experts are the group's
        stacks and this block is their layer `layer` (ARCHITECTURE §3.1)."""
        # Named scopes label the compiled ops, so a profile can say where device time goes (bench/profile_forward.py).
        with jax.named_scope("mhc"):
            x, post, comb = self.hc_attn.pre(streams, self.dtype)
        with jax.named_scope("attention"):
            x, state = self.attn(self.attn_norm(x), start, num_new, state, layout)
        with jax.named_scope("mhc"):
            streams = HyperConnection.post(x, streams, post, comb)
            x, post, comb = self.hc_ffn.pre(streams, self.dtype)
        with jax.named_scope("moe"):
            x = self.ffn(self.ffn_norm(x), ids, layout.moe_collectives, layout.kernels, layer)
        with jax.named_scope("mhc"):
            return HyperConnection.post(x, streams, post, comb), state
