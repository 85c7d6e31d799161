"""Pallas (Mosaic GPU) kernels, one folder per op: the public function, its pure-JAX reference (the
specification), the kernel, and its tests and benchmark.

Each op's public function takes the implementation per call (keyword `implementation`, one of KERNEL_CHOICES):

* "reference": the pure-JAX reference;
* "pallas": the Pallas kernel (on a backend other than the GPU it runs in the Mosaic GPU interpreter), and a
  ValueError naming the op and the reason where the kernel does not support the call;
* "auto" (the default): the kernel on a GPU where it supports the call (and where the op's own heuristics take
  it), else the reference.

Nothing here reads the environment: the choice travels with the call (the model's `TokenLayout.kernels`).
"""

from __future__ import annotations

KERNEL_CHOICES = ("auto", "reference", "pallas")

# SMs of the H100 / H200: the count used where no GPU is attached (the interpreter, lowering for CUDA on a CPU host).
FALLBACK_SMS = 132


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def sm_count(fallback: int = FALLBACK_SMS) -> int:
    """Streaming multiprocessors of the default backend's first device when that backend is a GPU, else
    `fallback`. Read when a kernel is built (at trace time), never at import."""
    import jax

    if on_gpu():
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return fallback


def check_implementation(op: str, implementation: str) -> str:
    """`implementation` if it is one of KERNEL_CHOICES, else a ValueError naming the op."""
    if implementation not in KERNEL_CHOICES:
        raise ValueError(f"{op}: implementation={implementation!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    return implementation


def use_kernel(op: str, implementation: str, unsupported: str | None, auto: bool = True) -> bool:
    """Whether `op` runs its Pallas kernel for this call.

    `unsupported`: None when the kernel supports the call, else why not. `auto`: the op's own conditions for
    taking the kernel under "auto" (beyond a GPU and support), e.g. a minimum size. "pallas" on an unsupported
    call is a ValueError naming the op and the reason."""
    check_implementation(op, implementation)
    if implementation == "reference":
        return False
    if implementation == "pallas":
        if unsupported is not None:
            raise ValueError(f"{op}: the Pallas kernel does not support this call ({unsupported})")
        return True
    return unsupported is None and auto and on_gpu()


def interpret_params():
    """None on a GPU (the compiled kernel), else the Mosaic GPU interpreter's `interpret=` value."""
    if on_gpu():
        return None
    from dsv4jax.compat import mosaic_gpu_interpret_params

    return mosaic_gpu_interpret_params()
