"""MoE grouped GEMM: routed experts over tokens sorted by expert, with the clamped SwiGLU between the GEMMs."""

import functools

import jax

from dsv4jax.pallas.moe_gmm.reference import clamped_swiglu, grouped_matmul_reference, routed_experts_reference


@functools.partial(jax.named_call, name="routed_experts")
def routed_experts(x, experts, weights, w1, w3, w2, limit: float, simulate_fp8_activations: bool = False):
    """Σ_k weights[t,k]·Expert_{experts[t,k]}(x_t) in fp32; x [T,D], experts/weights [T,k], w1/w3 [E,I,D],
    w2 [E,D,I]. The reference is the specification."""
    return routed_experts_reference(x, experts, weights, w1, w3, w2, limit, simulate_fp8_activations)
