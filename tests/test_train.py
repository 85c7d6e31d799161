"""Training: the loss falls on a small config, and stop-and-resume through orbax is bit-identical."""

import jax
import numpy as np

from dsv4jax.config import load_config
from dsv4jax.train.loop import Trainer, TrainConfig, train


def _tokens():
    # A learnable stream: a repeated random phrase with random noise tokens sprinkled in.
    rng = np.random.default_rng(0)
    phrase = rng.integers(2, 256, 37)
    stream = np.tile(phrase, 200)
    noise = rng.random(stream.shape) < 0.05
    stream[noise] = rng.integers(2, 256, noise.sum())
    return stream


def _trainer(steps):
    config = load_config("configs/test-tiny.json")
    return Trainer(config, TrainConfig(steps=steps, batch_size=4, seq_len=48, learning_rate=1e-2, warmup_steps=5,
                                       checkpoint_every=1000))


def test_loss_falls_and_resume_is_exact(tmp_path):
    trainer = _trainer(24)
    tokens = _tokens()
    state, history = train(trainer, tokens, progress=False)
    first, last = np.mean([h["main_loss"] for h in history[:3]]), np.mean([h["main_loss"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)
    assert all(np.isfinite(h["mtp_loss"]) and h["mtp_loss"] > 0 for h in history)

    # Same run in two halves through an orbax checkpoint.
    train(trainer, tokens, checkpoint_dir=tmp_path / "ckpt", stop_at=12, progress=False)
    resumed, resumed_history = train(trainer, tokens, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert resumed_history[0]["step"] == 13
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
