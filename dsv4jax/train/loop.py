"""A jit-compiled training step (optax AdamW with warm-up + cosine decay and clipping; bf16 compute over fp32
master weights; the MTP loss beside the main loss) and a loop with orbax checkpoints that resume exactly.

The step is a pure function of (master params, optimizer state, batch): the master params are fp32, the
forward runs a bf16 copy of the model (the same module tree built with dtype bfloat16), and gradients flow back
to the fp32 masters through the cast.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from dsv4jax.config import ModelConfig
from dsv4jax.model import DeepseekV4, init_state


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    mtp_weight: float = 0.3  # λ of DeepSeek-V3's MTP loss (0.3 early in training)
    compute_dtype: str = "bfloat16"
    seed: int = 0
    checkpoint_every: int = 200


def optimizer(train: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, train.warmup_steps, max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.min_learning_rate_ratio)
    return optax.chain(optax.clip_by_global_norm(train.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train.weight_decay))


def _cross_entropy(logits, targets, mask):
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask, chosen, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


class Trainer:
    """Holds the graph definitions and the jitted step; the state it trains is (params, opt_state, step)."""

    def __init__(self, config: ModelConfig, train: TrainConfig):
        self.config = config.replace(dtype="float32")
        self.train = train
        self.compute_config = config.replace(dtype=train.compute_dtype)
        self.tx = optimizer(train)
        master = nnx.eval_shape(lambda: DeepseekV4(self.config, nnx.Rngs(0)))
        self.graphdef, _, _ = nnx.split(master, nnx.Param, ...)
        compute = nnx.eval_shape(lambda: DeepseekV4(self.compute_config, nnx.Rngs(0)))
        self.compute_graphdef, compute_params, _ = nnx.split(compute, nnx.Param, ...)
        self.compute_dtypes = jax.tree.map(lambda a: a.dtype, compute_params)

    def init(self, seed: int | None = None):
        model = DeepseekV4(self.config, nnx.Rngs(self.train.seed if seed is None else seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def loss(self, params, rest, tokens):
        """Main next-token loss + λ·MTP loss (token t+2 from the streams at t and token t+1). tokens [B, L+1]."""
        compute_params = jax.tree.map(lambda p, dtype: p.astype(dtype), params, self.compute_dtypes)
        model = nnx.merge(self.compute_graphdef, compute_params, rest)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        batch, length = inputs.shape
        hidden, streams, _ = model(inputs, init_state(self.compute_config, batch, length))
        mask = jnp.ones(targets.shape, bool)
        main = _cross_entropy(model.logits(hidden), targets, mask)
        if not self.config.num_mtp_layers:
            return main, (main, jnp.zeros(()))
        # MTP: streams at t with token t+1 predict token t+2 (ARCHITECTURE §12.1); the last position has no target.
        mtp_hidden, _, _ = model.mtp_forward(streams, targets, init_state(self.compute_config, batch, length, mtp=True))
        mtp_targets = jnp.concatenate([targets[:, 1:], targets[:, -1:]], axis=1)
        mtp_mask = jnp.arange(length)[None, :] < length - 1
        mtp = _cross_entropy(model.logits(mtp_hidden), mtp_targets, jnp.broadcast_to(mtp_mask, targets.shape))
        return main + self.train.mtp_weight * mtp, (main, mtp)

    @functools.partial(jax.jit, static_argnums=0)
    def step(self, state, tokens):
        (loss, (main, mtp)), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], state["rest"],
                                                                                 tokens)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "main_loss": main, "mtp_loss": mtp, "grad_norm": optax.global_norm(grads)}
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

    def model(self, state) -> DeepseekV4:
        return nnx.merge(self.graphdef, state["params"], state["rest"])


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The batch of a step depends only on (seed, step): resuming replays the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def train(trainer: Trainer, tokens: np.ndarray, checkpoint_dir: str | Path | None = None, stop_at: int | None = None,
          progress: bool = True, log=None):
    """Train to `trainer.train.steps` (or stop early at `stop_at`), resuming from the latest checkpoint."""
    cfg = trainer.train
    state = trainer.init()
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2))
        if manager.latest_step() is not None:
            state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    first = int(state["step"])
    last = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(range(first, last), initial=first, total=cfg.steps, disable=not progress, desc="training")
    history = []
    for step in bar:
        start = time.perf_counter()
        state, metrics = trainer.step(state, jnp.asarray(batch_at(tokens, step, cfg.batch_size, cfg.seq_len,
                                                                  cfg.seed)))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["tokens_per_s"] = cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)
        history.append({"step": step + 1, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log is not None:
            log(history[-1])
        if manager is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == last):
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return state, history
