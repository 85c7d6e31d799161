"""Mixture of experts: sqrt-softplus router with selection bias or hash routing, clamped SwiGLU routed and
shared experts, fp32 accumulation (ARCHITECTURE §9)."""

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
            # Distinct experts per token (§9 last note); a random permutation's first k entries.
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
    """Routed experts stacked on a leading axis: w1, w3 [E, I, D] and w2 [E, D, I]."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        c = config
        e, i, d = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size
        self.limit, self.simulate_fp8_activations = c.swiglu_limit, c.simulate_fp8_activations
        self.w1 = nnx.Param(fan_in_normal(rngs, (e, i, d), dtype), axes=("expert", "moe_mlp", "embed"))
        self.w3 = nnx.Param(fan_in_normal(rngs, (e, i, d), dtype), axes=("expert", "moe_mlp", "embed"))
        self.w2 = nnx.Param(fan_in_normal(rngs, (e, d, i), dtype), axes=("expert", "embed", "moe_mlp"))

    def __call__(self, x, experts, weights) -> jax.Array:
        return routed_experts(x, experts, weights, self.w1[...], self.w3[...], self.w2[...], self.limit,
                              self.simulate_fp8_activations)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, rngs: nnx.Rngs):
        self.gate = Gate(config, layer, dtype, rngs)
        self.experts = Experts(config, dtype, rngs)
        self.shared_experts = SharedExpert(config, dtype, rngs) if config.n_shared_experts else None

    def __call__(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """x [B,S,D] (after ffn_norm), ids [B,S] token ids (hash routing) -> [B,S,D] in x.dtype."""
        flat = x.reshape(-1, x.shape[-1])
        with jax.named_scope("gate"):
            experts, weights = self.gate(flat, ids.reshape(-1))
        record(self, "routed_experts", experts.reshape(*x.shape[:-1], -1))
        out = self.experts(flat, experts, weights)
        if self.shared_experts is not None:
            with jax.named_scope("shared_expert"):
                out = out + self.shared_experts(flat).astype(jnp.float32)
        return out.astype(x.dtype).reshape(x.shape)
