"""Pallas (Mosaic GPU) kernels, one folder per op: the public function, its pure-JAX reference (the
specification), the kernel, and its tests and benchmark.

`implementation()` decides which one the public functions run: "reference", "pallas", or "auto" (the default:
the kernel on a GPU for shapes it supports, the reference elsewhere). Set it with `use(...)` or the
environment variable DSV4JAX_KERNELS.
"""

from __future__ import annotations

import contextlib
import os

_CHOICES = ("auto", "reference", "pallas")
_current = os.environ.get("DSV4JAX_KERNELS", "auto")
if _current not in _CHOICES:
    raise ValueError(f"DSV4JAX_KERNELS={_current!r}; choose one of {_CHOICES}")


def implementation() -> str:
    return _current


@contextlib.contextmanager
def use(choice: str):
    """Run the enclosed code (its tracing, under jit) with "reference", "pallas" or "auto" kernels."""
    global _current
    if choice not in _CHOICES:
        raise ValueError(f"kernel implementation {choice!r}; choose one of {_CHOICES}")
    previous, _current = _current, choice
    try:
        yield
    finally:
        _current = previous


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"
