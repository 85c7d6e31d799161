"""The shipped trained model models/dsv4-tiny: transformers 5.23 loads it and its fp32 logits match ours (the
format is the real one), its tokenizer carries V4's special tokens (SERVING §D.2), and it is the default."""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

MODEL = Path(os.environ.get("DSV4_TINY_DIR", Path(__file__).resolve().parent.parent / "models" / "dsv4-tiny"))
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(),
                                reason=f"{MODEL} is not trained yet")

# Text the model never saw (the corpus is the Python stdlib; this is our own code), long enough (> 300 tokens)
# for the HCA layer (ratio 128) to emit compressed rows.
SNIPPET = Path(__file__).resolve().parent.parent / "dsv4jax" / "train" / "evaluate.py"


@pytest.fixture(scope="module")
def tokenizer():
    from dsv4jax.tokenizer import JsonTokenizer

    return JsonTokenizer(MODEL / "tokenizer.json")


@pytest.fixture(scope="module")
def sequences(tokenizer):
    text = [0] + tokenizer.encode(SNIPPET.read_text())[:400]
    rng = np.random.default_rng()  # fresh ids every run
    return [text, rng.integers(0, 8192, 131).tolist()]


def test_transformers_loads_it_and_fp32_logits_match(sequences):
    import hf_oracle as hf
    from numerics import rel_l2
    from dsv4jax.run import Runner
    from dsv4jax.checkpoint.loader import load_model
    from dsv4jax.model import init_state

    reference = hf.hf_logits(hf.load_official(MODEL), sequences)  # HF dequantizes FP8/FP4 on its side
    model = load_model(MODEL, dtype="float32", progress=False)
    assert model.config.expert_dtype == "fp4" and model.config.num_mtp_layers == 1
    graphdef, params = nnx.split(model)
    lengths = [len(s) for s in sequences]
    ids = np.zeros((len(sequences), 448), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = seq
    logits, _, _ = Runner(graphdef).forward(params, init_state(model.config, len(sequences), 448), jnp.asarray(ids),
                               jnp.asarray(lengths, jnp.int32))
    for row, expected in enumerate(reference):
        got = np.asarray(logits[row, :lengths[row]])
        assert got.shape == expected.shape
        assert rel_l2(got, expected) <= 1e-4, rel_l2(got, expected)
    # Trained, not random: unseen code is far more predictable than uniform (ln 8192 = 9.0 nats; a random model
    # scores ≥ 9). The shipped model gives 5.2 here (our code is not in the stdlib's style; held-out stdlib: 3.3).
    text = sequences[0]
    logprobs = np.asarray(logits[0, :len(text) - 1], np.float64)
    logprobs -= np.log(np.sum(np.exp(logprobs - logprobs.max(-1, keepdims=True)), -1, keepdims=True)) \
        + logprobs.max(-1, keepdims=True)
    nll = -np.mean(logprobs[np.arange(len(text) - 1), text[1:]])
    assert nll < 6.0, nll


def test_tokenizer_has_v4_special_tokens_and_the_chat_encoding_round_trips(tokenizer):
    from dsv4jax.train.bpe import SPECIAL_TOKENS

    raw = tokenizer._tokenizer
    assert raw.get_vocab_size() == 8192
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    # A chat prompt as the V4 encoder renders it (SERVING §D.2): system text, user turn, generation prompt in chat mode.
    prompt = ("<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Write a loop in Python."
              "<｜Assistant｜></think>for i in range(3):\n    print(i)<｜end▁of▁sentence｜>")
    ids = raw.encode(prompt, add_special_tokens=False).ids
    for token in ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "</think>", "<｜end▁of▁sentence｜>"):
        assert ids.count(SPECIAL_TOKENS.index(token)) == 1, token
    assert raw.decode(ids, skip_special_tokens=False) == prompt
    assert tokenizer.decode(ids) == "You are a helpful assistant.Write a loop in Python.for i in range(3):\n    print(i)"


@pytest.mark.skipif("DSV4_TINY_DIR" in os.environ, reason="checks the repository's default")
def test_it_is_the_default_model():
    import dsv4jax
    from dsv4jax.api import DEFAULT_MODEL

    assert DEFAULT_MODEL.resolve() == MODEL.resolve()
    model = dsv4jax.load(progress=False)
    assert model.name == "dsv4-tiny" and "random" not in model.name
    assert model.encode("def f():")[0] == 0 and len(model.encode("def f():")) < 9  # BPE, not bytes
