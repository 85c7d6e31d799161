"""Save and restore already-converted parameters with orbax-checkpoint (skips safetensors parsing and
dequantisation on the next start). A converted directory holds `config.json` and an orbax `params/` tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import orbax.checkpoint as ocp
from flax import nnx

from dsv4jax.checkpoint.errors import CheckpointError
from dsv4jax.config import config_from_dict

_NUMERICS = ("dtype", "simulate_fp8_kv", "simulate_fp4_indexer", "simulate_fp8_activations", "scan_layers")


def save_converted(model: nnx.Module, directory: str | os.PathLike) -> None:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    raw = dict(config.to_json_dict(), **{k: getattr(config, k) for k in _NUMERICS})
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", nnx.state(model, nnx.Not(nnx.Intermediate)), force=True)


def restore_converted(directory: str | os.PathLike) -> nnx.Module:
    from dsv4jax.model import DeepseekV4

    directory = Path(directory).absolute()
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory} is not a converted checkpoint (no params/ folder)")
    raw = json.loads((directory / "config.json").read_text())
    config = config_from_dict(raw, **{k: raw[k] for k in _NUMERICS if k in raw})
    abstract = nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(directory / "params", abstract_state)
    return nnx.merge(graphdef, state)
