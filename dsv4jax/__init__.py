"""dsv4jax: DeepSeek-V4 in JAX with Flax NNX."""

from dsv4jax.api import Model, load
from dsv4jax.config import ConfigError, ModelConfig, load_config

__all__ = ["ConfigError", "Model", "ModelConfig", "load", "load_config"]
