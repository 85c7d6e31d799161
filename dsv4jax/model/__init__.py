"""The DeepSeek-V4 model, one paper concept per file."""

from dsv4jax.model.state import DecodeState, init_state
from dsv4jax.model.transformer import DeepseekV4

__all__ = ["DeepseekV4", "DecodeState", "init_state"]
