"""Private or version-specific JAX imports, kept in one place (jax 0.10.2 on CPU, 0.11.2 on the GPUs)."""

from __future__ import annotations


def backends_started() -> bool:
    """Whether XLA's backends have started (after which XLA_FLAGS no longer take effect)."""
    from jax._src import xla_bridge  # private: present in 0.10 and 0.11

    return xla_bridge.backends_are_initialized()


def mosaic_gpu_interpret_params(**kwargs):
    """`interpret=` value that runs a Mosaic GPU kernel on the CPU (TMA, barriers and wgmma simulated)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private: present in 0.10 and 0.11

    return InterpretGPUParams(**kwargs)


def reset_interpret_state() -> None:
    """Needed after an exception inside a kernel run by the Mosaic GPU interpreter."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state
    except ImportError:
        return
    reset_gpu_interpret_mode_state()
