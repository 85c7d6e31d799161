"""Small models for the engine tests (fp32, CPU)."""

import functools

import jax.numpy as jnp
from flax import nnx

from dsv4jax.api import Model
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4

CONFIG = "configs/test-tiny.json"  # SWA, CSA (m=4) and HCA (m=128) layers, a hash layer, MTP


@functools.cache
def drafting_model(residual_scale: float = 0.05, seed: int = 0) -> Model:
    """A random model whose MTP head usually agrees with it, so speculation accepts drafts.

    Every block's writes into the residual streams are scaled by `residual_scale`: the model is then close to
    a bigram model (logits mostly a function of the current token) but every block, attention cache and
    compressor still matters at the 1e-2 level. The MTP module reads only the embedding of x_{t+1} (h_proj = 0,
    e_proj = I, the model's own hc_head and norm), so it predicts the model's bigram guess for x_{t+2}.
    """
    config = load_config(CONFIG).replace(dtype="float32")
    module = DeepseekV4(config, nnx.Rngs(seed))
    for block in [block for group in module.groups for block in group.blocks] + list(module.mtp):
        block.attn.wo_b.weight[...] *= residual_scale
        block.ffn.experts.w2[...] *= residual_scale
        block.ffn.shared_experts.w2.weight[...] *= residual_scale
    mtp = module.mtp[0]
    mtp.h_proj.weight[...] = jnp.zeros_like(mtp.h_proj.weight[...])
    mtp.e_proj.weight[...] = jnp.eye(config.hidden_size, dtype=jnp.float32)
    for name in ("fn", "base", "scale"):
        getattr(mtp.hc_head, name)[...] = getattr(module.hc_head, name)[...]
    mtp.norm.weight[...] = module.norm.weight[...]
    return Model(module, name="drafting-test")


@functools.cache
def random_model(seed: int = 0, dtype: str = "float32") -> Model:
    return Model(DeepseekV4(load_config(CONFIG).replace(dtype=dtype), nnx.Rngs(seed)), name="random-test")
