"""Golden parity with transformers 5.23.0 (CPU torch, fp32, quantization simulations off), ARCHITECTURE §14.

The weights travel the real paths: HF's own `save_pretrained` (both its naming schemes) and the official naming
with FP8 / packed-FP4 tensors; our loader reads each, and all-position logits must agree to rel-L2 ≤ 1e-4 for a
batch of sequences of different lengths (right padding on our side, each sequence alone on HF's).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_oracle as hf
from numerics import rel_l2
from dsv4jax.run import Runner
from dsv4jax.checkpoint.loader import load_model
from dsv4jax.model import init_state

LENGTHS = (317, 300, 129)  # ≥ 300 so the HCA layer (m=128) emits rows; all different


@pytest.fixture(scope="module")
def config():
    return hf.tiny_config(num_hash_layers=2, index_n_heads=16)


@pytest.fixture(scope="module")
def sequences(config):
    rng = np.random.default_rng()  # fresh tokens every run
    return [rng.integers(0, config.vocab_size, n).tolist() for n in LENGTHS]


def _our_logits(directory, sequences):
    model = load_model(directory, dtype="float32", progress=False)
    graphdef, params = nnx.split(model)
    ids = np.zeros((len(sequences), max(LENGTHS)), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    state = init_state(model.config, len(sequences), 384)
    logits, _, _ = Runner(graphdef).forward(params, state, jnp.asarray(ids), jnp.asarray(LENGTHS, jnp.int32))
    return model, [np.asarray(logits[row, :n]) for row, n in enumerate(LENGTHS)]


def _check(ours, reference):
    for got, expected in zip(ours, reference):
        assert got.shape == expected.shape
        assert rel_l2(got, expected) <= 1e-4, rel_l2(got, expected)


@pytest.mark.parametrize("original_format", [True, False], ids=["save_pretrained-default", "hf-internal-names"])
def test_hf_saved_checkpoint(config, sequences, tmp_path, original_format):
    reference_model = hf.random_hf_model(config, seed=int(np.random.default_rng().integers(1 << 30)))
    hf.save_hf(reference_model, tmp_path, original_format=original_format)
    model, ours = _our_logits(tmp_path, sequences)
    assert model.config.num_mtp_layers == 0  # HF writes no MTP tensors
    _check(ours, hf.hf_logits(reference_model, sequences))


def test_official_fp8_fp4_checkpoint(config, sequences, tmp_path):
    reference_model = hf.random_hf_model(config, seed=int(np.random.default_rng().integers(1 << 30)))
    hf.save_official(reference_model, tmp_path, config, quantize=True)  # FP8 linears, FP4 experts, mtp.0.*
    reference = hf.hf_logits(hf.load_official(tmp_path), sequences)  # HF dequantizes on its side
    model, ours = _our_logits(tmp_path, sequences)
    assert model.config.num_mtp_layers == 1 and model.config.expert_dtype == "fp4"
    _check(ours, reference)
