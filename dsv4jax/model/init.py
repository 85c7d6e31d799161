"""Random initialisation helpers for models built without a checkpoint (tests, the random default model)."""

import jax
import jax.numpy as jnp
from flax import nnx


def normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def fan_in_normal(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
    """N(0, 1/fan_in) with fan_in the last axis: keeps activations O(1) through random layers."""
    return normal(rngs, shape, shape[-1] ** -0.5, dtype)
