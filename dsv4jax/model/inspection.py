"""Recording intermediate values for inspection (`dsv4jax.inspect`): off unless a module's `recording` flag is
set, and then collected with `nnx.capture`, so ordinary runs carry nothing extra."""

from flax import nnx


def record(module: nnx.Module, name: str, value) -> None:
    if getattr(module, "recording", False):
        module.sow(nnx.Intermediate, name, value)


def set_recording(model: nnx.Module, on: bool) -> None:
    for _, module in nnx.iter_modules(model):
        module.recording = on
