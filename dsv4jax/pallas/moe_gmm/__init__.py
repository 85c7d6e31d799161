"""MoE grouped GEMM: routed experts over tokens sorted by expert, with the clamped SwiGLU between the GEMMs.

`routed_experts(..., implementation=...)` runs the Mosaic GPU kernels (kernel.py) for "pallas" (a ValueError where
they do not support the call), or "auto" on a GPU for supported shapes; else the reference (the specification).
The sort by expert and the scatter back to tokens stay in plain JAX around the two kernels.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dsv4jax import pallas as _pallas
from dsv4jax.pallas.moe_gmm.reference import (clamped_swiglu, grouped_matmul_reference, kept_rows,
                                              routed_experts_reference)

_ROW_ALIGN = 128  # sorted rows are padded to this (every block_m divides it)


def grouped_matmul(x, w, group_sizes, w_scale=None, *, cfg=None, out_dtype=None, interpret=None, group_offset=0):
    """Kernel: rows of x [M, K] sorted by group times w[group_offset + g]ᵀ (w [G, N, K] bf16, or e4m3 with 128x128
    UE8M0 w_scale [G, N/128, K/128]) -> [M, N] in out_dtype (x.dtype). Rows past sum(group_sizes) are unwritten."""
    from dsv4jax.pallas.moe_gmm import kernel

    return kernel.grouped_matmul(x, w, group_sizes, w_scale, cfg=cfg, out_dtype=out_dtype, interpret=interpret,
                                 group_offset=group_offset)


def grouped_matmul_swiglu(x, w1, w3, group_sizes, row_weights, limit, w1_scale=None, w3_scale=None, *, cfg=None,
                          interpret=None, group_offset=0):
    """Kernel: fused first layer, x.dtype(clamped_swiglu(x.dtype(x@w1ᵀ), x.dtype(x@w3ᵀ)) · row_weights[:, None])."""
    from dsv4jax.pallas.moe_gmm import kernel

    return kernel.grouped_matmul_swiglu(x, w1, w3, group_sizes, row_weights, limit, w1_scale, w3_scale, cfg=cfg,
                                        interpret=interpret, group_offset=group_offset)


def dequantize_fp8_blocks(w, scale):
    """ARCHITECTURE §10.2: e4m3 [G, N, K] times 2^(e8m0 - 127) per 128x128 block -> fp32."""
    s = scale.astype(jnp.float32)
    s = jnp.repeat(jnp.repeat(s, 128, axis=-2)[..., : w.shape[-2], :], 128, axis=-1)[..., : w.shape[-1]]
    return w.astype(jnp.float32) * s


def grouped_matmul_ref(x, w, group_sizes, w_scale=None, out_dtype=None):
    """Reference for `grouped_matmul` (fp8 weights dequantised to x.dtype, exact)."""
    if w_scale is not None:
        w = dequantize_fp8_blocks(w, w_scale).astype(x.dtype)
    return grouped_matmul_reference(x, w, group_sizes).astype(out_dtype or x.dtype)


def grouped_matmul_swiglu_ref(x, w1, w3, group_sizes, row_weights, limit, w1_scale=None, w3_scale=None):
    """Reference for `grouped_matmul_swiglu`, the first half of `routed_experts_reference`."""
    if w1_scale is not None:
        w1 = dequantize_fp8_blocks(w1, w1_scale).astype(x.dtype)
        w3 = dequantize_fp8_blocks(w3, w3_scale).astype(x.dtype)
    h = clamped_swiglu(grouped_matmul_reference(x, w1, group_sizes).astype(x.dtype),
                       grouped_matmul_reference(x, w3, group_sizes).astype(x.dtype), limit)
    return (h * row_weights.astype(jnp.float32)[:, None]).astype(x.dtype)


def _configs(rows: int, d: int, i: int):
    from dsv4jax.pallas.moe_gmm import kernel

    return (kernel.default_config(rows, i, d, fused=True), kernel.default_config(rows, d, i, fused=False))


def unsupported_reason(x, experts, w1, w3, w2) -> str | None:
    """None when `routed_experts_pallas` takes these shapes/dtypes, else why not."""
    from dsv4jax.pallas.moe_gmm import kernel

    rows = experts.shape[0] * experts.shape[1]
    e, i, d = w1.shape
    if rows == 0:
        return "no (token, expert) pairs"
    if w3.shape != w1.shape or w2.shape != (e, d, i):
        return f"weight shapes w1 {w1.shape}, w3 {w3.shape}, w2 {w2.shape}"
    if x.dtype != jnp.bfloat16 or any(w.dtype != jnp.bfloat16 for w in (w1, w3, w2)):
        return "dtype (bf16 x and bf16 weights)"
    c1, c2 = _configs(rows, d, i)
    reason = kernel.unsupported_reason(rows, i, d, c1) or kernel.unsupported_reason(rows, d, i, c2)
    return None if reason is None else f"grouped GEMM: {reason}"


def kernel_supported(x, experts, w1, w3, w2) -> bool:
    return unsupported_reason(x, experts, w1, w3, w2) is None


def routed_experts_pallas(x, experts, weights, w1, w3, w2, limit: float, simulate_fp8_activations: bool = False,
                          *, interpret=None, num_sms: int | None = None, layer=None):
    """`routed_experts_reference` with the two grouped GEMMs (the first fused with the SwiGLU) as kernels.
    num_sms: CTAs of the kernels' persistent grids (None: the default device's SMs; 4 under the interpreter).
    `layer`: the weights are stacks [L, E, ...] and layer `layer`'s experts are read from them in place."""
    from dsv4jax.quant import fp8_qdq

    quantize = (lambda a: fp8_qdq(a, 128)) if simulate_fp8_activations else (lambda a: a)
    tokens, k = experts.shape
    e, i, d = w1.shape[-3:]
    group_offset = 0
    if layer is not None:  # [L, E, ...] -> [L·E, ...] is free; the layer's experts are groups layer·E … layer·E + E−1
        w1, w3, w2 = (w.reshape(-1, *w.shape[2:]) for w in (w1, w3, w2))
        group_offset = layer * e
    rows = tokens * k
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=e).astype(jnp.int32)
    padded = -(-rows // _ROW_ALIGN) * _ROW_ALIGN
    # Pad inside the gathers (rows past `rows` belong to no group: never stored, never read back).
    gather = jnp.concatenate([token_of, jnp.zeros((padded - rows,), token_of.dtype)])
    sorted_x = quantize(x[gather])
    row_weights = jnp.concatenate([weights.reshape(-1)[order].astype(jnp.float32),
                                   jnp.zeros((padded - rows,), jnp.float32)])
    c1, c2 = _configs(rows, d, i)
    if num_sms is None and interpret is not None:  # fewer simulated CTAs
        num_sms = 4
    if num_sms is not None:
        c1, c2 = (dataclasses.replace(c, num_sms=num_sms) for c in (c1, c2))
    hidden = grouped_matmul_swiglu(sorted_x, w1, w3, group_sizes, row_weights, limit, cfg=c1, interpret=interpret,
                                   group_offset=group_offset)
    out = grouped_matmul(quantize(hidden), w2, group_sizes, cfg=c2, interpret=interpret, group_offset=group_offset)
    out = out[:rows]
    out = jnp.where(kept_rows(group_sizes, rows)[:, None], out, 0)  # dropped pairs' rows are never written
    return jnp.zeros((tokens, d), jnp.float32).at[token_of].add(out.astype(jnp.float32))


@functools.partial(jax.named_call, name="routed_experts")
def routed_experts(x, experts, weights, w1, w3, w2, limit: float, simulate_fp8_activations: bool = False, *,
                   implementation: str = "auto", layer=None):
    """Σ_k weights[t,k]·Expert_{experts[t,k]}(x_t) in fp32; x [T,D], experts/weights [T,k], w1/w3 [E,I,D],
    w2 [E,D,I]; a pair with expert id E is dropped (computed nowhere). The reference is the specification.

    implementation: "reference", "pallas" (the kernels; a ValueError where they do not support the call) or
    "auto" (the kernels on a GPU where supported, else the reference).
    layer: the weights are the stacks [L, ...] of a scanned group (ARCHITECTURE §3.1) and the experts are those of
    layer `layer` (traced): the kernels read them in place, the reference slices them out."""
    _pallas.check_implementation("routed_experts", implementation)
    one_layer = [w if layer is None else jax.ShapeDtypeStruct(w.shape[1:], w.dtype) for w in (w1, w3, w2)]
    reason = None  # through kernel_supported, which a benchmark may patch to keep "auto" on the reference
    if implementation != "reference" and not kernel_supported(x, experts, *one_layer):
        reason = unsupported_reason(x, experts, *one_layer) or "not supported"
    if _pallas.use_kernel("routed_experts", implementation, reason):
        return routed_experts_pallas(x, experts, weights, w1, w3, w2, limit, simulate_fp8_activations,
                                     interpret=_pallas.interpret_params(), layer=layer)
    if layer is not None:
        w1, w3, w2 = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) for w in (w1, w3, w2))
    return routed_experts_reference(x, experts, weights, w1, w3, w2, limit, simulate_fp8_activations)
