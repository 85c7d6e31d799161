"""The decode state: a state sized for N tokens gives the same results as a larger one for N tokens, and rings
with speculative slack (`ring_margin`) change nothing."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.run import Runner
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state


def test_state_size_and_ring_margin_do_not_change_results():
    config = load_config("configs/test-tiny.json", dtype="float32")
    model = DeepseekV4(config, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng().integers(0, 256, (1, 300)), jnp.int32)
    full = [Runner(graphdef).forward(params, init_state(config, 1, n, ring_margin=margin), ids, jnp.array([300]))[0]
            for n, margin in ((300, 0), (640, 0), (300, 3))]
    np.testing.assert_allclose(full[0], full[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(full[0], full[2], rtol=1e-6, atol=1e-6)
