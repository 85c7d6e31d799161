"""dsv4jax: DeepSeek-V4 in JAX with Flax NNX."""

from dsv4jax.sharding.all_to_all import prefer_decomposed_ragged_all_to_all

prefer_decomposed_ragged_all_to_all()  # before any computation starts XLA's backend

from dsv4jax.api import Model, load  # noqa: E402
from dsv4jax.config import ConfigError, ModelConfig, load_config  # noqa: E402

__all__ = ["ConfigError", "Model", "ModelConfig", "load", "load_config"]
