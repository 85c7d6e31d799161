"""Random initialisation for models built without a checkpoint (tests, models/dsv4-random-tiny).

Values are drawn on the host with numpy from a seed split off the NNX `Rngs` stream: eager `jax.random` would
compile one small program per parameter shape, which makes building even a tiny model take many seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _tracing(key: jax.Array) -> bool:
    return isinstance(key, jax.core.Tracer)


def host_generator(rngs: nnx.Rngs) -> np.random.Generator | None:
    """A numpy generator seeded from the next key, or None while tracing (under jit or nnx.eval_shape)."""
    key = rngs.params()
    return None if _tracing(key) else np.random.default_rng(np.asarray(jax.random.key_data(key)))


def normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    key = rngs.params()
    if _tracing(key):  # under jit (e.g. initialising a large model on the accelerator): draw on the device
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    generator = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    values = generator.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return jnp.asarray(values, dtype=dtype)


def fan_in_normal(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
    """N(0, 1/fan_in) with fan_in the last axis: keeps activations O(1) through random layers."""
    return normal(rngs, shape, shape[-1] ** -0.5, dtype)
