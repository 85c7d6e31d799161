"""Private or version-specific JAX imports, kept in one place (jax 0.10.2 on CPU, 0.11.2 on the GPUs)."""

from __future__ import annotations


def backends_started() -> bool:
    """Whether XLA's backends have started (after which XLA_FLAGS no longer take effect)."""
    from jax._src import xla_bridge  # private: present in 0.10 and 0.11

    return xla_bridge.backends_are_initialized()
