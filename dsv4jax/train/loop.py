"""A jit-compiled training step (AdamW with warm-up + cosine decay and clipping; bf16 compute over fp32 master
weights; the MTP loss beside the main loss; the auxiliary-loss-free update of the MoE selection bias) and a loop
with orbax checkpoints that resume exactly.

The step is a pure function of (train state, batch, host hyperparameters): the master params are fp32, the forward runs
a bf16 copy of the model (the same module tree built with dtype bfloat16), and gradients flow back to the fp32
masters through the cast. The learning rate and γ are arguments computed on the host, so the horizon of the
schedule can be fixed after the step is compiled (`--time-budget`) without compiling again.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from dsv4jax import quant
from dsv4jax.config import ModelConfig
from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.model.inspection import set_recording
from dsv4jax.model.layout import TokenLayout


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only (norm scales, hc biases and the router bias are not decayed)
    clip_norm: float = 1.0
    mtp_weight: float = 0.3  # λ of DeepSeek-V3's MTP loss (0.3 early in training)
    # γ of DeepSeek-V3's auxiliary-loss-free balancing: after each step every score-routed MoE layer moves its
    # selection bias by γ·sign(mean load − expert load), the loads counted from the step's top-k selections.
    bias_update_rate: float = 1e-3
    # Quantization-aware training: the forward sees the shipped formats (FP8 128×128 linears, FP4 1×32 routed
    # experts, ARCHITECTURE §10.1) with straight-through gradients, so the exported checkpoint is the trained model.
    qat: bool = False
    compute_dtype: str = "bfloat16"
    seed: int = 0
    checkpoint_every: int = 200
    # The kernel implementation of the forward (`TokenLayout.kernels`): the Pallas kernels have no backward pass,
    # so training runs the references unless told otherwise.
    kernels: str = "reference"


def learning_rate(train: TrainConfig, step: int) -> float:
    """Linear warm-up to the peak (step 0 already moves), then cosine decay to min_learning_rate_ratio·peak."""
    peak = train.learning_rate
    if step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    decay = max(train.steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / decay, 1.0)
    end = peak * train.min_learning_rate_ratio
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _names(key_path) -> tuple:
    """A pytree key path of an nnx.State leaf -> its module path, e.g. ('groups', 1, 'blocks', 0, 'ffn', 'gate',
    'bias')."""
    return tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _is_router_bias(names: tuple) -> bool:
    return names[-2:] == ("gate", "bias")


def optimizer(train: TrainConfig, params) -> optax.GradientTransformation:
    """Clipped AdamW without its learning rate (the step scales by −lr); the router biases are left out (their
    update is the balancing rule, not a gradient step)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "bias" if _is_router_bias(_names(path)) else "weights", params)
    weights = optax.chain(optax.clip_by_global_norm(train.clip_norm), optax.scale_by_adam(b1=0.9, b2=0.95),
                          optax.add_decayed_weights(train.weight_decay,
                                                    mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)))
    return optax.multi_transform({"weights": weights, "bias": optax.set_to_zero()}, labels)


def _cross_entropy(logits, targets, mask):
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask, chosen, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# The shipped formats (checkpoint/writer.py): FP8 linears and FP4 routed experts, by parameter path.
_FP8_PARAM = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|e_proj|h_proj)"
                        r"\.weight$")
_FP4_PARAM = re.compile(r"\.ffn\.experts\.w[123]$")


def fp8_weight_qdq(w: jax.Array) -> jax.Array:
    """e4m3 quantize-dequantize with one power-of-two scale per 128×128 block of the last two axes, exactly as
    `quant.quantize_fp8` stores it (ARCHITECTURE §10.1), in fp32."""
    rows, cols = w.shape[-2:]
    pad = [(0, 0)] * (w.ndim - 2) + [(0, -rows % 128), (0, -cols % 128)]
    x = jnp.pad(w.astype(jnp.float32), pad)  # zeros never change a block's amax
    blocks = x.reshape(*x.shape[:-2], x.shape[-2] // 128, 128, x.shape[-1] // 128, 128)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1), keepdims=True)
    exponent = quant._jnp_ceil_log2(jnp.maximum(amax, jnp.float32(quant.FP8_AMAX_FLOOR))
                                    * jnp.float32(1.0 / quant.E4M3_MAX))
    scaled = jnp.clip(blocks * quant._jnp_pow2(-exponent), -quant.E4M3_MAX, quant.E4M3_MAX)
    dequantized = quant._jnp_round_to_grid(scaled, quant._E4M3_GRID) * quant._jnp_pow2(exponent)
    return dequantized.reshape(x.shape)[..., :rows, :cols]


def _fake_quantize(names: tuple, w: jax.Array) -> jax.Array:
    """Straight-through fake quantization of one master parameter (identity where the format is bf16/fp32)."""
    key = ".".join(str(n) for n in names)
    if _FP4_PARAM.search(key):
        q = quant.fp4_qdq(w.astype(jnp.float32))
    elif _FP8_PARAM.search(key):
        q = fp8_weight_qdq(w)
    else:
        return w
    return w + jax.lax.stop_gradient(q - w)


def expert_loads(intermediates, num_experts: int) -> dict[tuple, jax.Array]:
    """Captured routed_experts [B, S, k] of each MoE module -> {module path: selections per expert [E] fp32}."""
    loads = {}
    for path, var in nnx.to_flat_state(intermediates):
        if path[-1] == "routed_experts":
            experts = jnp.concatenate([e.reshape(-1) for e in var.get_value()])
            loads[tuple(path[:-1])] = jnp.bincount(experts, length=num_experts).astype(jnp.float32)
    return loads


def max_violation(load: jax.Array) -> jax.Array:
    """(max load − mean load) / mean load: 0 when perfectly balanced (DeepSeek's MaxVio)."""
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)


class Trainer:
    """Holds the graph definitions and the jitted step; the state it trains is (params, opt_state, step)."""

    def __init__(self, config: ModelConfig, train: TrainConfig):
        # Unscanned layers (ARCHITECTURE §3.1): the bias balancing reads each MoE layer's recorded selections, which
        # a layer inside a scan cannot record.
        config = config.replace(scan_layers=False)
        self.config = config.replace(dtype="float32")
        self.train = train
        self.compute_config = config.replace(dtype=train.compute_dtype)
        master = nnx.eval_shape(lambda: DeepseekV4(self.config, nnx.Rngs(0)))
        self.graphdef, master_params, _ = nnx.split(master, nnx.Param, ...)
        self.tx = optimizer(train, master_params)
        compute = nnx.eval_shape(lambda: DeepseekV4(self.compute_config, nnx.Rngs(0)))
        set_recording(compute, True)  # the forward sows each MoE layer's selections (for the bias update)
        self.compute_graphdef, compute_params, _ = nnx.split(compute, nnx.Param, ...)
        self.compute_dtypes = jax.tree.map(lambda a: a.dtype, compute_params)
        # Module paths (…, 'ffn') of the score-routed MoE layers, whose `gate.bias` the balancing rule moves.
        self.bias_layers = [names[:-2] for names in
                            (_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(master_params)[0])
                            if _is_router_bias(names)]
        self.step = jax.jit(self._step)

    HOST_FIELDS = ("steps", "learning_rate", "warmup_steps", "min_learning_rate_ratio", "bias_update_rate",
                   "checkpoint_every")

    def set(self, **changes) -> None:
        """Change what the host decides (the schedule, γ): the compiled step takes them as arguments."""
        fixed = set(changes) - set(self.HOST_FIELDS)
        if fixed:
            raise ValueError(f"{sorted(fixed)} are compiled into the step; make a new Trainer")
        self.train = dataclasses.replace(self.train, **changes)

    def hyper(self, step: int) -> dict:
        """The step's host-side arguments."""
        return {"learning_rate": jnp.float32(learning_rate(self.train, step)),
                "bias_update_rate": jnp.float32(self.train.bias_update_rate)}

    def init(self, seed: int | None = None):
        model = DeepseekV4(self.config, nnx.Rngs(self.train.seed if seed is None else seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {"params": params, "rest": rest, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
                "total_steps": jnp.asarray(self.train.steps, jnp.int32)}

    def compute_params(self, params):
        if self.train.qat:
            params = jax.tree_util.tree_map_with_path(lambda path, p: _fake_quantize(_names(path), p), params)
        return jax.tree.map(lambda p, dtype: p.astype(dtype), params, self.compute_dtypes)

    def loss(self, params, rest, tokens):
        """Main next-token loss + λ·MTP loss (token t+2 from the streams at t and token t+1). tokens [B, L+1].

        Returns (loss, (main, mtp, loads)) with loads the expert selection counts of every MoE layer."""
        model = nnx.merge(self.compute_graphdef, self.compute_params(params), rest)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        batch, length = inputs.shape
        layout = TokenLayout(kernels=self.train.kernels)

        def forward(model):
            hidden, streams, _ = model(inputs, init_state(self.compute_config, batch, length), layout=layout)
            main = _cross_entropy(model.logits(hidden), targets, jnp.ones(targets.shape, bool))
            if not self.config.num_mtp_layers:
                return main, jnp.zeros(())
            # MTP: streams at t with token t+1 predict token t+2 (ARCHITECTURE §12.1); the last position has no
            # target.
            mtp_hidden, _, _ = model.mtp_forward(streams, targets,
                                                 init_state(self.compute_config, batch, length, mtp=True),
                                                 layout=layout)
            mtp_targets = jnp.concatenate([targets[:, 1:], targets[:, -1:]], axis=1)
            mtp_mask = jnp.broadcast_to(jnp.arange(length)[None, :] < length - 1, targets.shape)
            return main, _cross_entropy(model.logits(mtp_hidden), mtp_targets, mtp_mask)

        (main, mtp), intermediates = nnx.capture(forward, nnx.Intermediate)(model)
        loads = expert_loads(intermediates, self.config.n_routed_experts)
        return main + self.train.mtp_weight * mtp, (main, mtp, loads)

    def _step(self, state, tokens, hyper):
        (loss, (main, mtp, loads)), grads = jax.value_and_grad(self.loss, has_aux=True)(
            state["params"], state["rest"], tokens)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p - hyper["learning_rate"] * u, state["params"], updates)
        # Auxiliary-loss-free balancing (DeepSeek-V3 section 2.1.2): overloaded experts' bias down, underloaded up.
        gamma = hyper["bias_update_rate"]

        def balance(path, p):
            names = _names(path)
            if not _is_router_bias(names):
                return p
            load = loads[names[:-2]]
            return p + gamma * jnp.sign(jnp.mean(load) - load)

        params = jax.tree_util.tree_map_with_path(balance, params)
        violation = (jnp.mean(jnp.stack([max_violation(loads[layer]) for layer in self.bias_layers]))
                     if self.bias_layers else jnp.zeros(()))
        metrics = {"loss": loss, "main_loss": main, "mtp_loss": mtp, "grad_norm": optax.tree.norm(grads),
                   "max_violation": violation}
        return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics

    def model(self, state) -> DeepseekV4:
        return nnx.merge(self.graphdef, state["params"], state["rest"])


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The batch of a step depends only on (seed, step): resuming replays the same data."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def train(trainer: Trainer, tokens: np.ndarray, checkpoint_dir: str | Path | None = None, stop_at: int | None = None,
          progress: bool = True, log=None, time_budget: float | None = None, calibration_steps: int = 20,
          announce=None):
    """Train to `trainer.train.steps` (or stop early at `stop_at`), resuming from the latest checkpoint.

    With `time_budget` (seconds, counted from this call) the step time is measured over `calibration_steps`
    steps after the first (compiling) one, and the horizon becomes the number of steps that fit, at most
    `train.steps`; the schedule does not change before that point as long as it lies inside the warm-up. The
    horizon is saved in the checkpoint, so a resumed run follows the same schedule. `announce(text)` hears the
    stages before the first step (which compiles).
    """
    start_time = time.perf_counter()
    cfg = trainer.train
    state = trainer.init()
    manager = None
    if checkpoint_dir is not None:
        manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2))
        if manager.latest_step() is not None:
            state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
            trainer.set(steps=int(state["total_steps"]))
            time_budget = None  # the horizon was fixed by the run being resumed
    first = int(jax.block_until_ready(state["step"]))
    if announce is not None:
        announce(f"state ready at step {first} ({time.perf_counter() - start_time:.0f}s); the first step compiles")
    bar = tqdm(total=trainer.train.steps, initial=first, disable=not progress, desc="training")
    history = []
    step, timed_from = first, None
    while step < (trainer.train.steps if stop_at is None else min(stop_at, trainer.train.steps)):
        started = time.perf_counter()
        batch = jnp.asarray(batch_at(tokens, step, cfg.batch_size, cfg.seq_len, cfg.seed))
        hyper = trainer.hyper(step)
        state, metrics = trainer.step(state, batch, hyper)
        metrics = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        metrics["learning_rate"] = float(hyper["learning_rate"])
        metrics["tokens_per_s"] = cfg.batch_size * cfg.seq_len / (now - started)
        step += 1
        history.append({"step": step, **metrics})
        if time_budget is not None:
            if step == first + 1:
                timed_from = now
            elif step == first + 1 + calibration_steps:
                per_step = (now - timed_from) / calibration_steps
                fit = step + int((time_budget - (now - start_time)) / per_step)
                trainer.set(steps=max(step, min(trainer.train.steps, fit)))
                state = dict(state, total_steps=jnp.asarray(trainer.train.steps, jnp.int32))
                bar.total = trainer.train.steps
                time_budget = None
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log is not None:
            log(history[-1])
        if manager is not None and (step % cfg.checkpoint_every == 0 or step == trainer.train.steps
                                    or step == stop_at):
            manager.save(step, args=ocp.args.StandardSave(state))
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return state, history
