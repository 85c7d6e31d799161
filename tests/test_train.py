"""Training: the loss falls on a small config, stop-and-resume through orbax is bit-identical, the
auxiliary-loss-free bias update evens the expert loads, and the QAT fake quantization is the shipped format."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4jax import quant
from dsv4jax.config import load_config
from dsv4jax.train.loop import Trainer, TrainConfig, fp8_weight_qdq, learning_rate, train


def _tokens():
    # A learnable stream: a repeated random phrase with random noise tokens sprinkled in.
    rng = np.random.default_rng(0)
    phrase = rng.integers(2, 256, 37)
    stream = np.tile(phrase, 200)
    noise = rng.random(stream.shape) < 0.05
    stream[noise] = rng.integers(2, 256, noise.sum())
    return stream


def _trainer(steps, gamma):
    config = load_config("configs/test-tiny.json")
    return Trainer(config, TrainConfig(steps=steps, batch_size=4, seq_len=48, learning_rate=1e-2, warmup_steps=5,
                                       checkpoint_every=1000, bias_update_rate=gamma))


def _biases(trainer, state):
    return {layer: np.asarray(functools.reduce(lambda tree, key: tree[key], layer, state["params"])
                              ["gate"]["bias"][...]) for layer in trainer.bias_layers}


@pytest.fixture(scope="module")
def tokens():
    return _tokens()


def test_loss_falls_bias_balances_and_resume_is_exact(tokens, tmp_path):
    trainer = _trainer(24, gamma=0.02)
    initial = _biases(trainer, trainer.init())
    state, history = train(trainer, tokens, progress=False)
    first, last = np.mean([h["main_loss"] for h in history[:3]]), np.mean([h["main_loss"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)
    assert all(np.isfinite(h["mtp_loss"]) and h["mtp_loss"] > 0 for h in history)
    # The MTP layer routes by score too: its bias is balanced with the main layers'.
    assert ("mtp", 0, "ffn") in trainer.bias_layers and ("groups", 0, "blocks", 0, "ffn") not in trainer.bias_layers

    # The same run without the balancing update: its biases never move (no gradient, no weight decay), and its
    # loads stay less even than with the update.
    trainer.set(bias_update_rate=0.0)  # a host-side argument: same compiled step
    frozen, frozen_history = train(trainer, tokens, progress=False)
    trainer.set(bias_update_rate=0.02)
    for layer, bias in _biases(trainer, frozen).items():
        np.testing.assert_array_equal(bias, initial[layer])
    moved = _biases(trainer, state)
    assert all(np.abs(moved[layer] - initial[layer]).max() > 0 for layer in moved)
    balanced = np.mean([h["max_violation"] for h in history[-8:]])
    unbalanced = np.mean([h["max_violation"] for h in frozen_history[-8:]])
    print(f"max violation over the last 8 steps: {balanced:.3f} with the update, {unbalanced:.3f} without")
    assert balanced < 0.75 * unbalanced, (balanced, unbalanced)

    # Same run in two halves through an orbax checkpoint: params (biases included) and moments bit-identical.
    train(trainer, tokens, checkpoint_dir=tmp_path / "ckpt", stop_at=12, progress=False)
    resumed, resumed_history = train(trainer, tokens, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert resumed_history[0]["step"] == 13
    for a, b in zip(jax.tree.leaves((state["params"], state["opt_state"])),
                    jax.tree.leaves((resumed["params"], resumed["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # A time budget fixes the horizon after the calibration steps (budget 0: stop right there) and records it.
    trainer.set(steps=1000)
    budget_state, budget_history = train(trainer, tokens, progress=False, time_budget=0.0, calibration_steps=2)
    assert len(budget_history) == 3 and trainer.train.steps == 3 and int(budget_state["total_steps"]) == 3


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_learning_rate_ratio=0.1)
    lrs = [learning_rate(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("shape", [(64, 256), (3, 200, 96), (256, 128)])
def test_qat_is_the_shipped_format(shape):
    w = np.random.default_rng(1).normal(0, 0.05, shape).astype(np.float32)
    w[..., 0, :7] *= 40  # blocks of different scales
    np.testing.assert_array_equal(np.asarray(fp8_weight_qdq(jnp.asarray(w))),
                                  quant.dequantize_fp8(*quant.quantize_fp8(w)))
    np.testing.assert_array_equal(np.asarray(quant.fp4_qdq(jnp.asarray(w)))[..., :96],
                                  quant.dequantize_fp4(*quant.quantize_fp4(w))[..., :96])


def test_heldout_loss_and_mtp_acceptance_match_independent_paths():
    """evaluate(): the window loss equals the full-context perplexity path's NLL, and a draft counts as accepted
    exactly when MTP's argmax at t equals the main model's argmax at t+1 (both from other code paths)."""
    import dsv4jax
    from dsv4jax.eval.perplexity import perplexity
    from dsv4jax.model import init_state
    from dsv4jax.train.evaluate import evaluate, evaluate_windows

    config = load_config("configs/test-tiny.json", dtype="float32")
    module = dsv4jax.load(config, seed=3).module
    # Only two tokens can win the argmax, so drafts and targets agree about half the time (a random head almost
    # never agrees, which would not test the alignment).
    head = np.zeros(module.head.shape, np.float32)
    head[[5, 7]] = np.asarray(module.head[...])[[5, 7]]
    module.head[...] = jnp.asarray(head)
    model = dsv4jax.api.Model(module, "two-token head")
    seq_len = 40
    stream = _tokens()[:2 * seq_len + 1]
    result = evaluate(model.module, stream, seq_len, batch_size=2)
    assert result["windows"] == 2 and result["tokens"] == 2 * seq_len
    nll = [perplexity(model, stream[i * seq_len:(i + 1) * seq_len + 1].tolist(), chunk=64)["nll"] for i in range(2)]
    assert result["loss"] == pytest.approx(np.mean(nll), rel=1e-5)

    @jax.jit
    def mtp_logits(params, window):  # the MTP module by hand: streams at t with token t+1
        module = nnx.merge(model.graphdef, params)
        _, streams, _ = module(window[:, :-1], init_state(config, 1, seq_len))
        hidden, _, _ = module.mtp_forward(streams, window[:, 1:], init_state(config, 1, seq_len, mtp=True))
        return module.logits(hidden)

    total = 0
    for i in range(2):  # window by window: totals could agree by chance under a wrong alignment
        window = stream[i * seq_len:(i + 1) * seq_len + 1]
        greedy = np.argmax(model.logits(window[:-1].tolist()), axis=-1)
        draft = np.argmax(np.asarray(mtp_logits(model.params, jnp.asarray(window[None])))[0], axis=-1)
        accepted = int(np.sum(draft[:-1] == greedy[1:]))
        assert 0 < accepted < seq_len - 1
        assert evaluate_windows(model.module, window[None])["mtp_acceptance"]["accepted"] == accepted
        total += accepted
    assert result["mtp_acceptance"]["accepted"] == total
    assert result["mtp_acceptance"]["drafts"] == 2 * (seq_len - 1)
