"""Inspection of a forward pass: indexer selections obey the visibility rule and top-k size, routing picks k
distinct experts, and the recorded intermediates never leak into saved checkpoints."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsv4jax
from dsv4jax import inspect
from dsv4jax.checkpoint.loader import load_model
from dsv4jax.checkpoint.writer import save_checkpoint
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state


def test_indexer_selection_and_routing():
    config = load_config("configs/test-tiny.json", dtype="float32")
    model = dsv4jax.load(config, seed=4)
    prompt = np.random.default_rng().integers(0, 256, 150).tolist()
    selection = inspect.indexer_selection(model, prompt)
    assert sorted(selection) == [1, 3]  # the CSA layers
    for rows in selection.values():
        assert rows.shape == (150, config.index_topk)
        for t, chosen in enumerate(rows):
            visible = (t + 1) // 4  # ARCHITECTURE §8.3
            real = chosen[chosen >= 0]
            assert len(real) == min(config.index_topk, visible) and len(set(real)) == len(real)
            assert np.all(real < visible)
    routing = inspect.expert_routing(model, prompt)
    assert sorted(routing) == [0, 1, 2, 3]
    for experts in routing.values():
        assert experts.shape == (150, config.num_experts_per_tok)
        assert all(len(set(row)) == len(row) for row in experts)
    table = np.asarray(model.module.with_scan_layers(False).groups[0].blocks[0].ffn.gate.tid2eid[...])
    np.testing.assert_array_equal(routing[0], table[prompt])  # layer 0 routes by hash


def test_ordinary_runs_record_nothing(tmp_path):
    config = load_config("configs/test-tiny.json", dtype="float32")
    model = DeepseekV4(config, nnx.Rngs(1))
    model(jnp.zeros((1, 8), jnp.int32), init_state(config, 1, 8))  # recording is off by default
    assert not nnx.state(model, nnx.Intermediate)
    save_checkpoint(model, tmp_path)
    load_model(tmp_path, dtype="float32", progress=False)  # would fail on unexpected tensors
