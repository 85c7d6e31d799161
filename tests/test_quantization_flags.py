"""The ARCHITECTURE §10.3 quantization simulations really act when their config flag is on (and only then)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.run import Runner
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.model.state import layer_state
from dsv4jax.model.linear import Linear
from dsv4jax.quant import fp4_qdq, fp8_qdq

WIDE = dict(dtype="float32", hidden_size=128, q_lora_rank=128, moe_intermediate_size=128, o_lora_rank=64)


@functools.lru_cache(maxsize=None)
def _prefill(**flags):
    config = load_config("configs/test-tiny.json", **WIDE, **flags)
    model = DeepseekV4(config, nnx.Rngs(3))
    ids = jax.random.randint(jax.random.key(4), (1, 140), 0, config.vocab_size)
    graphdef, params = nnx.split(model)
    logits, _, state = Runner(graphdef).forward(params, init_state(config, 1, 160), ids, jnp.array([140]))
    return config, logits, state


def test_kv_and_indexer_caches_are_on_the_quantization_grid():
    config, plain_logits, plain = _prefill()
    _, logits, state = _prefill(simulate_fp8_kv=True, simulate_fp4_indexer=True)
    nope = config.nope_head_dim
    csa, plain_csa = layer_state(state, config, 1), layer_state(plain, config, 1)  # ratio 4
    for cache in (csa.window, csa.compressor.rows, layer_state(state, config, 2).compressor.rows):
        np.testing.assert_array_equal(fp8_qdq(cache[..., :nope], 64), cache[..., :nope])
    np.testing.assert_array_equal(fp4_qdq(csa.indexer.rows, 32), csa.indexer.rows)
    # Without the flags the same caches are off the grid, and the logits differ.
    assert not np.array_equal(fp8_qdq(plain_csa.window[..., :nope], 64), plain_csa.window[..., :nope])
    assert not np.array_equal(fp4_qdq(plain_csa.indexer.rows, 32), plain_csa.indexer.rows)
    assert not np.allclose(logits, plain_logits)


def test_fp8_activation_simulation_quantizes_linear_inputs():
    x = jax.random.normal(jax.random.key(0), (3, 256)) * 3
    plain = Linear(256, 64, ("a", "b"), jnp.float32, nnx.Rngs(1))
    simulated = Linear(256, 64, ("a", "b"), jnp.float32, nnx.Rngs(1), simulate_fp8_activations=True)
    np.testing.assert_allclose(simulated(x), plain(fp8_qdq(x, 128)), rtol=1e-6)
    assert not np.allclose(simulated(x), plain(x), rtol=1e-4)
    _, plain_logits, _ = _prefill()
    _, logits, _ = _prefill(simulate_fp8_activations=True)
    assert not np.allclose(logits, plain_logits)
