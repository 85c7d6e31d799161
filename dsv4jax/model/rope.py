"""Partial, interleaved rotary embedding with the two per-layer frequency tables (ARCHITECTURE §6)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4jax.config import ModelConfig


def rope_frequencies(config: ModelConfig, compress_ratio: int) -> np.ndarray:
    """Per-pair angular frequencies [rope_head_dim/2] (fp32) for a layer of the given compress ratio.

    ARCHITECTURE §6.2: sliding layers use plain RoPE with rope_theta; CSA/HCA layers use compress_rope_theta with YaRN.
    """
    rope_dim = config.rope_head_dim
    if compress_ratio == 0:
        theta, yarn = config.rope_theta, None
    else:
        theta, yarn = config.compress_rope_theta, config.yarn
    base = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float32) / rope_dim))
    if yarn is None:
        return base.astype(np.float32)

    def correction_dim(num_rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    return (base / yarn.factor * (1 - smooth) + base * smooth).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, frequencies: np.ndarray, inverse: bool = False) -> jax.Array:
    """Rotate the LAST len(frequencies)*2 channels of x by angle position·freq, pairs (2i, 2i+1) interleaved.

    x: [..., S, (heads,) dim]; positions: broadcastable to x.shape[:-1] after adding a heads axis is the
    caller's job. Rotation in fp32, result in x's dtype (ARCHITECTURE §6.1). `inverse` uses the conjugate angle (ARCHITECTURE §6.3).
    """
    rope_dim = 2 * frequencies.shape[0]
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(frequencies)
    if inverse:
        angle = -angle
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    head, tail = x[..., :-rope_dim], x[..., -rope_dim:].astype(jnp.float32)
    pairs = tail.reshape(*tail.shape[:-1], rope_dim // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    rotated = rotated.reshape(tail.shape).astype(x.dtype)
    return jnp.concatenate([head, rotated], axis=-1)
