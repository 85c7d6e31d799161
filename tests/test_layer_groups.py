"""Scanned layer groups (ARCHITECTURE §3.1): the partition of the layers, and the scanned model against the unscanned
one on the same weights — logits, caches, greedy tokens with and without MTP, checkpoints (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4jax.api import Model
from dsv4jax.checkpoint.loader import load_model
from dsv4jax.checkpoint.safetensors_io import SafetensorsFile
from dsv4jax.checkpoint.writer import save_checkpoint
from dsv4jax.config import LayerGroup, load_config
from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.model.state import layer_state
from dsv4jax.run import Runner
from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.sampling import SamplingParams
from numerics import rel_l2

# test-tiny's widths with a repeating (CSA, HCA) pair: groups [layer 0], [2 × (CSA, HCA)], [layer 5].
CFG = load_config("configs/test-tiny.json", dtype="float32").replace(
    num_hidden_layers=6, compress_ratios=(0, 4, 128, 4, 128, 4, 0))
FLAT = CFG.replace(scan_layers=False)


def test_the_partition_covers_each_layer_once_with_repeating_kinds():
    flash = load_config("configs/deepseek-v4-flash.json")
    assert flash.layer_groups() == (LayerGroup(0, 1, 2), LayerGroup(2, 1, 1), LayerGroup(3, 2, 20))
    assert CFG.layer_groups() == (LayerGroup(0, 1, 1), LayerGroup(1, 2, 2), LayerGroup(5, 1, 1))
    rng = np.random.default_rng()
    for _ in range(50):
        layers = int(rng.integers(1, 40))
        ratios = tuple(int(r) for r in rng.choice([0, 4, 128], size=layers)) + (0,)
        config = CFG.replace(num_hidden_layers=layers, compress_ratios=ratios,
                             num_hash_layers=int(rng.integers(0, layers + 1)))
        covered = [layer for group in config.layer_groups() for layer in group.layers]
        assert covered == list(range(layers))
        for group in config.layer_groups():
            for r in range(group.repeats):
                for j in range(group.period):
                    assert config.layer_kind(group.layer(r, j)) == config.layer_kind(group.layer(0, j))
        assert all(g.repeats == 1 for g in config.replace(scan_layers=False).layer_groups())


@pytest.fixture(scope="module")
def models():
    scanned = DeepseekV4(CFG, nnx.Rngs(5))
    return scanned, scanned.with_scan_layers(False)


def test_unscanned_model_draws_the_same_weights(models):
    scanned, flat = models
    fresh = DeepseekV4(FLAT, nnx.Rngs(5))  # built unscanned from the same seed
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(flat)), nnx.to_flat_state(nnx.state(fresh))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
    back = flat.with_scan_layers(True)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(back)), nnx.to_flat_state(nnx.state(scanned))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def _run(model, chunks, steps):
    """Chunked prefill of fresh random prompts then greedy decode steps: (every logit, the final state)."""
    graphdef, params = nnx.split(model)
    runner = Runner(graphdef, kernels="reference")
    state = init_state(model.config, 2, 256)
    logits = []
    for ids, num_new in chunks:
        out, _, state = runner.forward(params, state, ids, num_new)
        logits.append(out)
    token = jnp.argmax(out[jnp.arange(2), chunks[-1][1] - 1], axis=-1).astype(jnp.int32)
    for _ in range(steps):
        out, _, state = runner.decode(params, state, token, jnp.ones((2,), bool))
        logits.append(out)
        token = jnp.argmax(out, axis=-1).astype(jnp.int32)
    return logits, state


def test_scanned_equals_unscanned_logits_and_caches(models):
    scanned, flat = models
    rng = np.random.default_rng()
    # Two chunks, the second one ragged (rows of 70 and 33 real tokens): HCA rows complete inside the prompt.
    chunks = [(jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 96)), jnp.int32), jnp.array([96, 96])),
              (jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 96)), jnp.int32), jnp.array([70, 33]))]
    a, state_a = _run(scanned, chunks, steps=6)
    b, state_b = _run(flat, chunks, steps=6)
    for x, y in zip(a, b):
        assert rel_l2(x, y) <= 1e-6
    np.testing.assert_array_equal(state_a.lengths, state_b.lengths)
    for layer in range(CFG.num_hidden_layers):
        for x, y in zip(jax.tree.leaves(layer_state(state_a, CFG, layer)),
                        jax.tree.leaves(layer_state(state_b, FLAT, layer))):
            assert x.shape == y.shape and rel_l2(x, y) <= 1e-6, layer


def test_engine_greedy_tokens_equal_unscanned_argmax(models):
    """The engine on the scanned model (paged pools stacked per group, MTP speculation with 2 draft steps): every
    generated token is the unscanned model's argmax after the tokens before it (one full forward)."""
    scanned, flat = models
    settings = EngineConfig(max_running_requests=4, max_model_len=384, page_tokens=128, prefill_chunk=64,
                            prefill_buckets=(64,), max_prefill_rows=4, prefill_row_buckets=(4,), decode_buckets=(4,),
                            speculative_steps=2)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, CFG.vocab_size, size=n).tolist() for n in (1, 70, 150)]
    outputs = Engine(Model(scanned, name="scanned"), settings).generate(
        prompts, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    ids = np.zeros((len(prompts), 256), np.int32)
    for row, (prompt, out) in enumerate(zip(prompts, outputs)):
        assert len(out.token_ids) == 40
        ids[row, :len(prompt) + 40] = prompt + out.token_ids
    graphdef, params = nnx.split(flat)
    logits, _, _ = Runner(graphdef, kernels="reference").forward(
        params, init_state(FLAT, len(prompts), 256), jnp.asarray(ids), jnp.full((len(prompts),), 256, jnp.int32))
    for row, (prompt, out) in enumerate(zip(prompts, outputs)):
        positions = np.arange(len(prompt) - 1, len(prompt) + 39)
        assert np.asarray(logits[row, positions]).argmax(-1).tolist() == out.token_ids


def test_checkpoint_round_trip_keeps_per_layer_names(models, tmp_path):
    scanned, flat = models
    save_checkpoint(scanned, tmp_path / "scanned")
    save_checkpoint(flat, tmp_path / "flat")
    with SafetensorsFile(tmp_path / "scanned" / "model.safetensors") as a, \
            SafetensorsFile(tmp_path / "flat" / "model.safetensors") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "layers.3.attn.wq_a.weight" in a and not any(k.startswith("groups.") for k in a.keys())
        for name in a.keys():
            np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    loaded = load_model(tmp_path / "flat", dtype="float32", progress=False)  # a checkpoint loads scanned
    assert loaded.config.scan_layers
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(scanned))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))
    assert loaded.config == CFG


@pytest.mark.parametrize("mesh", ["cp=2,ep=2"])
def test_scanned_over_a_mesh_equals_one_device(models, mesh):
    """The scan inside the runner's shard_map: prefill split over cp (collectives inside the scan body), experts
    split over the MoE axes, stacked caches placed with their batch over dp."""
    scanned, _ = models
    graphdef, params = nnx.split(scanned)
    rng = np.random.default_rng()
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 64)), jnp.int32)
    num_new = jnp.array([64, 41])
    local = Runner(graphdef, kernels="reference")
    expected, _, expected_state = local.forward(params, init_state(CFG, 2, 128), ids, num_new)
    runner = Runner(graphdef, mesh, jax.devices()[:4], kernels="reference")
    logits, _, state = runner.forward(runner.place_params(params), runner.place_state(init_state(CFG, 2, 128)),
                                      ids, num_new)
    assert rel_l2(logits, expected) <= 1e-5
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state)):  # some rows are still all zero
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))
