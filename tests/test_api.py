"""The notebook API (`dsv4jax.load`, `Model.generate`, `Model.logits`) and the command line."""

import subprocess
import sys

import numpy as np
import pytest

import dsv4jax
from dsv4jax.config import load_config


@pytest.fixture(scope="module")
def model():
    return dsv4jax.load(load_config("configs/test-tiny.json", dtype="float32"), seed=5)


def test_logits_of_a_batch_equal_each_prompt_alone(model):
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, n).tolist() for n in (50, 9)]
    batch = model.logits(prompts)
    for prompt, logits in zip(prompts, batch):
        alone = model.logits(prompt)
        assert logits.shape == (len(prompt), 256)
        np.testing.assert_allclose(logits, alone, rtol=1e-5, atol=1e-5)


def test_greedy_generation_follows_the_argmax(model):
    prompt = np.random.default_rng().integers(3, 256, 20).tolist()
    out = model.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert len(out) == 6
    # Each greedy token is the argmax of the logits after the sequence so far (one causal forward of it all).
    logits = model.logits(prompt + out)
    assert out == [int(np.argmax(logits[len(prompt) - 1 + i])) for i in range(len(out))]


def test_sampling_is_reproducible_per_seed(model):
    prompts = [[0, 5, 6, 7], [0, 9]]
    first = model.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11, stop_at_eos=False)
    again = model.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11, stop_at_eos=False)
    other = model.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=12, stop_at_eos=False)
    assert first == again and first != other


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([0, 999], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([0, 5], max_new_tokens=2, top_p=0)
    with pytest.raises(dsv4jax.ConfigError, match="no model at"):
        dsv4jax.load("/nonexistent/model")


def test_command_line_prints_a_continuation():
    result = subprocess.run([sys.executable, "-m", "dsv4jax.generate", "--prompt", "Hi", "--max-new-tokens", "3"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[dsv4-tiny] Hi")
