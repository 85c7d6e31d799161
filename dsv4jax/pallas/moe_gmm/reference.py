"""Pure-JAX specification of the routed experts over tokens sorted by expert (ARCHITECTURE §9)."""

import jax
import jax.numpy as jnp


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
    """ARCHITECTURE §9: gate clamped from above only, up clamped on both sides, silu(gate)·up, all fp32."""
    gate = jnp.minimum(gate.astype(jnp.float32), limit)
    up = jnp.clip(up.astype(jnp.float32), -limit, limit)
    return jax.nn.silu(gate) * up


_CONTRACT_LAST = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul_reference(x: jax.Array, weight: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows of x [M, K] sorted by group times weight[g]ᵀ ([G, N, K] checkpoint layout) -> [M, N] fp32."""
    return jax.lax.ragged_dot_general(x, weight.astype(x.dtype), group_sizes, _CONTRACT_LAST,
                                      preferred_element_type=jnp.float32)


def routed_experts_reference(x, experts, weights, w1, w3, w2, limit: float,
                             simulate_fp8_activations: bool = False) -> jax.Array:
    """Σ_k weights[t,k]·Expert_{experts[t,k]}(x_t) in fp32, via tokens sorted by expert.

    x [T,D] activations; experts [T,k] int; weights [T,k] fp32; w1, w3 [E,I,D]; w2 [E,D,I]. A pair whose expert
    id is E is dropped: computed nowhere, it adds nothing (an expert-parallel shard's way to skip the experts it
    does not hold). The routing weight is applied before w2 in fp32; each expert's output is rounded to x.dtype
    (ARCHITECTURE §9).
    With `simulate_fp8_activations` both GEMM inputs are quantised like the official FP8×FP4 kernel's (ARCHITECTURE §10.3).
    """
    from dsv4jax.quant import fp8_qdq

    quantize = (lambda a: fp8_qdq(a, 128)) if simulate_fp8_activations else (lambda a: a)
    tokens, k = experts.shape
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=w1.shape[0])
    sorted_x = quantize(x[token_of])
    # Projections are rounded to the activation dtype first, as the official bf16 linears are.
    hidden = clamped_swiglu(grouped_matmul_reference(sorted_x, w1, group_sizes).astype(x.dtype),
                            grouped_matmul_reference(sorted_x, w3, group_sizes).astype(x.dtype), limit)
    hidden = hidden * weights.reshape(-1)[order][:, None]
    out = grouped_matmul_reference(quantize(hidden.astype(x.dtype)), w2, group_sizes).astype(x.dtype)
    out = jnp.where(kept_rows(group_sizes, out.shape[0])[:, None], out, 0)
    return jnp.zeros((tokens, x.shape[-1]), jnp.float32).at[token_of].add(out.astype(jnp.float32))


def kept_rows(group_sizes: jax.Array, rows: int) -> jax.Array:
    """[rows] bool: the sorted rows that belong to a group (dropped pairs, expert id E, sort after them all)."""
    return jnp.arange(rows) < jnp.sum(group_sizes)
