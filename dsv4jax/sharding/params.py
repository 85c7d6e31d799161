"""Sharded parameters: initialisation and checkpoint loading that never put the whole model on one device.

- `init_sharded`: the model's own initialisers run under `jit` with the rules-table `out_shardings`; with JAX's
  partitionable threefry each device generates only its shards, with the same values as an unsharded init.
- `shard_host_params` / `load_sharded`: host numpy tensors (read shard by shard from safetensors) are placed
  with `jax.make_array_from_callback`, which copies to each device only the slice it owns.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from dsv4jax.config import ModelConfig
from dsv4jax.sharding.mesh import MeshConfig
from dsv4jax.sharding.rules import param_shardings


def abstract_model(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    from dsv4jax.model import DeepseekV4

    return nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0))))


def init_sharded(config: ModelConfig, mesh: MeshConfig, device_mesh, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    from dsv4jax.model import DeepseekV4

    mesh.check_model(config)
    graphdef, abstract = abstract_model(config)
    shardings = param_shardings(abstract, mesh, device_mesh)

    def init():
        return nnx.split(DeepseekV4(config, nnx.Rngs(seed)))[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def host_to_global(value, sharding) -> jax.Array:
    """A host value (the same in every process) -> a global array; each device receives only its shard."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_host_params(host: nnx.State, mesh: MeshConfig, device_mesh) -> nnx.State:
    """A state of host arrays (numpy, or arrays on one device) -> the same state sharded by the rules table."""
    shardings = param_shardings(host, mesh, device_mesh)

    return jax.tree.map(lambda v, s: v.replace(host_to_global(v.get_value(), s.get_value())), host, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def load_sharded(path: str | os.PathLike, mesh: MeshConfig, device_mesh, dtype: str | None = None,
                 progress: bool = True, **overrides) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """A checkpoint directory -> (config, graphdef, sharded params); tensors go from host to their shards only."""
    from dsv4jax.checkpoint.loader import read_host_params

    config, graphdef, host = read_host_params(path, dtype, progress, **overrides)
    mesh.check_model(config)
    return config, graphdef, shard_host_params(host, mesh, device_mesh)


def device_bytes(params: nnx.State, device) -> int:
    """Bytes of parameter shards held by `device`."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
               for shard in leaf.addressable_shards if shard.device == device)
