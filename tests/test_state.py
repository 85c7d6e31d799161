"""The decode state's capacity: a state holds exactly as many tokens as `capacity` says, and `check_room`
refuses more instead of letting compressed rows be dropped silently."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4jax import run
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state


def test_capacity_is_exact():
    config = load_config("configs/test-tiny.json", dtype="float32")
    state = init_state(config, 1, 300)  # CSA: 75 rows -> up to 303 tokens; HCA: 2 rows -> up to 383
    assert state.capacity == 303
    state.check_room(jnp.array([303]))
    with pytest.raises(ValueError, match="exceeds the state's capacity of 303"):
        state.check_room(jnp.array([304]))
    model = DeepseekV4(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng().integers(0, 256, (1, 303)), jnp.int32)
    full = [run.forward(graphdef, params, init_state(config, 1, n), ids, jnp.array([303]))[0] for n in (300, 640)]
    np.testing.assert_allclose(full[0], full[1], rtol=1e-6, atol=1e-6)
    assert init_state(config, 1, 300, mtp=True).capacity is None  # sliding-only: unlimited
