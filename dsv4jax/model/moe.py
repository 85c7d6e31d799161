"""Mixture of experts: sqrt-softplus router with selection bias or hash routing, clamped SwiGLU routed and
shared experts, fp32 accumulation (ARCHITECTURE §9).

`MoE.__call__` is the one composition (gate -> routed experts -> shared expert) for every placement. Where the
tokens and experts of a call live enters as `Collectives`, collective functions over arrays handed in by the token
layout: the identity on one device (this module), the gather and all-to-all modes under a mesh
(dsv4jax/sharding/moe.py, PARALLELISM §3, PARALLELISM §4). Which experts a device computes is an `ExpertPlacement`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.model.init import fan_in_normal, host_generator, normal
from dsv4jax.model.inspection import record
from dsv4jax.model.linear import Linear, matmul_fp32
from dsv4jax.pallas.moe_gmm import clamped_swiglu, routed_experts


class Buffer(nnx.Variable):
    """Non-trainable state loaded from the checkpoint (the hash table `tid2eid`)."""


class Gate(nnx.Module):
    """Router `gate.weight` [E, D] plus `gate.bias` [E] (score routing) or `gate.tid2eid` [V, k] (hash)."""

    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        self.top_k, self.route_scale = c.num_experts_per_tok, c.routed_scaling_factor
        self.hash_routing = c.is_hash_layer(layer) and layer < c.num_hidden_layers
        self.weight = nnx.Param(fan_in_normal(rngs, (c.n_routed_experts, c.hidden_size), dtype),
                                axes=("router", "embed"))
        if self.hash_routing:
            # Distinct experts per token (ARCHITECTURE §9 last note); a random permutation's first k entries.
            generator = host_generator(rngs)
            if generator is None:  # under jit: draw on the device
                noise = jax.random.uniform(rngs.params(), (c.vocab_size, c.n_routed_experts))
                table = jnp.argsort(noise, axis=-1)[:, :c.num_experts_per_tok]
            else:
                table = np.argsort(generator.random((c.vocab_size, c.n_routed_experts)), axis=-1)
                table = table[:, :c.num_experts_per_tok]
            self.tid2eid = Buffer(jnp.asarray(table, jnp.int32), axes=("vocab", None))
        else:
            self.bias = nnx.Param(normal(rngs, (c.n_routed_experts,), 0.1, jnp.float32), axes=("router",))

    def __call__(self, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, D], ids [T] -> (experts [T, k] int32, weights [T, k] fp32)."""
        scores = jnp.sqrt(jax.nn.softplus(matmul_fp32(x, self.weight[...])))
        if self.hash_routing:
            experts = self.tid2eid[...][ids]
        else:  # the bias only chooses the experts (auxiliary-loss-free balancing)
            experts = jax.lax.top_k(scores + self.bias[...], self.top_k)[1]
        chosen = jnp.take_along_axis(scores, experts, axis=-1)
        weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * self.route_scale
        return experts.astype(jnp.int32), weights


class SharedExpert(nnx.Module):
    """`shared_experts.{w1,w2,w3}`: the same clamped SwiGLU with weight 1 (current official revision)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c, fp8 = config, config.simulate_fp8_activations
        self.limit = c.swiglu_limit
        self.w1 = Linear(c.hidden_size, c.moe_intermediate_size, ("mlp", "embed"), dtype, rngs, fp8)
        self.w3 = Linear(c.hidden_size, c.moe_intermediate_size, ("mlp", "embed"), dtype, rngs, fp8)
        self.w2 = Linear(c.moe_intermediate_size, c.hidden_size, ("embed", "mlp"), dtype, rngs, fp8)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = clamped_swiglu(self.w1(x), self.w3(x), self.limit)
        return self.w2(hidden.astype(x.dtype))


class Experts(nnx.Module):
    """Routed experts stacked on a leading axis: w1, w3 [E, I, D] and w2 [E, D, I] (in a scanned group, inside the
    scan: the group's stacks [L, E, ...], of which `layer` is this one, ARCHITECTURE §3.1)."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        e, i, d = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size
        self.limit, self.simulate_fp8_activations = c.swiglu_limit, c.simulate_fp8_activations
        self.w1 = nnx.Param(fan_in_normal(rngs, (e, i, d), dtype), axes=("expert", "moe_mlp", "embed"))
        self.w3 = nnx.Param(fan_in_normal(rngs, (e, i, d), dtype), axes=("expert", "moe_mlp", "embed"))
        self.w2 = nnx.Param(fan_in_normal(rngs, (e, d, i), dtype), axes=("expert", "embed", "moe_mlp"))

    @property
    def count(self) -> int:
        """Experts held here (all of them on one device, this device's block under a mesh)."""
        return self.w1.shape[-3]

    def __call__(self, x, experts, weights, implementation: str = "auto", layer=None) -> jax.Array:
        """x [R, D], local expert ids [R, k] (the drop id skips a pair, see ExpertPlacement), weights [R, k] ->
        Σ_k weight·expert(x) [R, D] fp32; `implementation` chooses the kernel (dsv4jax/pallas); `layer`: the
        weights are stacks and this is their layer `layer`."""
        return routed_experts(x, experts, weights, self.w1[...], self.w3[...], self.w2[...], self.limit,
                              self.simulate_fp8_activations, implementation=implementation, layer=layer)


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts this device computes.

    The expert axis is split into equal blocks of `count` experts, one per device of the expert group in shard
    order: expert e is local expert e % count of device e // count. This device's block starts at global id
    `offset` (traced from `axis_index` under `shard_map`); `offset` None: the ids reaching the experts here are
    local already (one device holds every expert; the all-to-all exchange sends each owner local ids).

    Dropped pairs, one convention for every placement: a (token, expert) pair that is not to be computed here (its
    expert is held elsewhere, or it fills an unused slot of an exchange buffer) carries the local expert id
    `count` (`drop_id`). `routed_experts` skips such pairs: they cost no expert work and add nothing.
    """

    count: int
    offset: jax.Array | int | None = None

    @property
    def drop_id(self) -> int:
        return self.count

    def keep(self, kept: jax.Array, local: jax.Array) -> jax.Array:
        """Local expert ids where `kept`, the drop id elsewhere."""
        return jnp.where(kept, local, self.drop_id)

    def localize(self, experts: jax.Array) -> jax.Array:
        """Global expert ids -> this device's local ids; the drop id for experts held elsewhere."""
        if self.offset is None:
            return experts
        local = experts - self.offset
        return self.keep((local >= 0) & (local < self.count), local)

    def owner(self, experts: jax.Array) -> jax.Array:
        """Global expert ids -> the index of the device holding each, in the expert group."""
        return experts // self.count

    def local(self, experts: jax.Array) -> jax.Array:
        """Global expert ids -> local ids on their owner."""
        return experts % self.count


class Collectives:
    """How the MoE reaches tokens and experts on other devices: collective functions over arrays, handed in by the
    token layout (`TokenLayout.moe_collectives`). This base is one device: every expert is here and every hook is
    the identity. The mesh-aware modes (dsv4jax/sharding/moe.py) never see the MoE module, only arrays and the
    `compute` function of `exchange`.

    Gather mode (`exchanges_pairs` False): tokens travel. `gather` brings the rows of every device sharing this
    one's weight shards, the partial sums of routed and shared experts for them are added, and one `reduce` returns
    this device's rows fully reduced. All-to-all mode (True): pairs travel. `dispatch` picks the tokens this device
    routes, `exchange` sends each (token, expert) pair to its expert's owner and the weighted output back,
    `combine` sums the weight shards and returns the local tokens' rows; the shared expert goes the gather way.
    """

    exchanges_pairs = False

    def gather(self, rows: jax.Array) -> jax.Array:
        """Per-token values of the local tokens [T, ...] -> those of the token group, rank-major."""
        return rows

    def reduce(self, partial: jax.Array) -> jax.Array:
        """fp32 partial sums for the gathered rows -> the local tokens' rows, reduced over every weight shard."""
        return partial

    def placement(self, count: int) -> ExpertPlacement:
        """Where the routed experts live, `count` of them being held here."""
        return ExpertPlacement(count)

    def dispatch(self, x: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Local tokens [T, D] and ids [T] -> those this device routes."""
        return x, ids

    def exchange(self, x: jax.Array, experts: jax.Array, weights: jax.Array, placement: ExpertPlacement,
                 compute) -> jax.Array:
        """Tokens [R, D] with their routing (global ids, weights [R, k]) -> Σ_k weight·expert(x) [R, D] fp32 of the
        experts reached here; compute(rows, local ids, weights) runs this device's experts."""
        return compute(x, placement.localize(experts), weights)

    def combine(self, routed: jax.Array, tokens: int) -> jax.Array:
        """`exchange`'s output for the dispatched tokens -> the rows of the `tokens` local tokens, fully reduced."""
        return routed


ONE_DEVICE = Collectives()


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        self.gate = Gate(config, layer, dtype, rngs)
        self.experts = Experts(config, dtype, rngs)
        self.shared_experts = SharedExpert(config, dtype, rngs) if config.n_shared_experts else None

    def __call__(self, x: jax.Array, ids: jax.Array, collectives: Collectives = ONE_DEVICE,
                 kernels: str = "auto", layer=None) -> jax.Array:
        """x [B,S,D] local tokens (after ffn_norm), ids [B,S] token ids (hash routing) -> [B,S,D] in x.dtype;
        `kernels` chooses the routed experts' implementation (dsv4jax/pallas); `layer` as in `Experts`."""
        c = collectives
        flat, flat_ids = x.reshape(-1, x.shape[-1]), ids.reshape(-1)
        if c.exchanges_pairs:
            rows, row_ids = c.dispatch(flat, flat_ids)
        else:  # the ids travel with their tokens, so hash routing sees the gathered rows' ids (PARALLELISM §3.1)
            rows, row_ids = c.gather(flat), c.gather(flat_ids)
        with jax.named_scope("gate"):
            experts, weights = self.gate(rows, row_ids)
        if c is ONE_DEVICE:  # inspection (dsv4jax.inspect) runs on one device
            record(self, "routed_experts", experts.reshape(*x.shape[:-1], -1))
        compute = functools.partial(self.experts, implementation=kernels, layer=layer)
        out = c.exchange(rows, experts, weights, c.placement(self.experts.count), compute)
        if c.exchanges_pairs:
            out = c.combine(out, flat.shape[0])
            if self.shared_experts is not None:
                out = out + c.reduce(self._shared(c.gather(flat)))
        else:
            if self.shared_experts is not None:  # its own intermediate slice: a partial sum too
                out = out + self._shared(rows)
            out = c.reduce(out)  # one reduction of the whole partial sum, before any slicing (PARALLELISM §4)
        return out.astype(x.dtype).reshape(x.shape)

    def _shared(self, rows: jax.Array) -> jax.Array:
        with jax.named_scope("shared_expert"):
            return self.shared_experts(rows).astype(jnp.float32)
