"""Sharded parameters: initialisation and checkpoint loading that never put the whole model on one device.

- `init_sharded`: the model's own initialisers run under `jit` with the rules-table `out_shardings`; with JAX's
  partitionable threefry each device generates only its shards, with the same values as an unsharded init.
- `shard_host_params`: host numpy tensors are placed with `jax.make_array_from_callback`, which copies to each
  device only the slice it owns.
- `load_sharded`: streams a checkpoint parameter by parameter (a few in flight); FP8/FP4 tensors go to the devices
  as packed codes and scales and are dequantised there, so host memory stays far below the model's size.
"""

from __future__ import annotations

import concurrent.futures as futures
import functools
import math
import os
import threading
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from dsv4jax.checkpoint.names import checkpoint_layout, filled, flat_values, model_layout

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
                 progress: bool = True, threads: int | None = None, **overrides
                 ) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """A checkpoint directory -> (config, graphdef, sharded params), streamed tensor by tensor.

    The same names, checks and values as `read_host_params` + `shard_host_params` (bit for bit), but the host never
    holds the model: `threads` parameters are in flight at a time; FP8/FP4 tensors travel as their packed codes
    and scales, each device receiving the slices it owns, and are dequantised on the devices.
    """
    from dsv4jax.checkpoint.loader import _flat_targets, abstract_for_checkpoint, plan_checkpoint

    config, graphdef, abstract = abstract_for_checkpoint(path, dtype, **overrides)
    mesh.check_model(config)
    targets = _flat_targets(abstract, config)  # by checkpoint-layout path: one per layer
    plan = plan_checkpoint(path, config, targets)  # every name/shape error before any transfer
    stacked_shardings = flat_values(param_shardings(abstract, mesh, device_mesh))
    shardings = checkpoint_layout(config, stacked_shardings,
                                  lambda sharding, _: NamedSharding(sharding.mesh, P(*sharding.spec[1:])))
    # Largest first, so that the long transfers overlap the many small ones.
    order = sorted(targets, key=lambda k: -math.prod(targets[k].shape) * np.dtype(targets[k].dtype).itemsize)
    arrays = {}
    with futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        jobs = {pool.submit(_load_param, plan[key], targets[key], shardings[key]): key for key in order}
        for job in tqdm(futures.as_completed(jobs), total=len(jobs), desc=f"loading {Path(path).name}",
                        unit="param", disable=not progress):
            arrays[jobs[job]] = job.result()

    def stack(key, parts):  # a scanned group's layers, stacked on the devices (ARCHITECTURE §3.1)
        stacked = jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=stacked_shardings[key])(*parts)
        for part in parts:
            part.delete()
        return stacked

    arrays = model_layout(config, arrays, stack)
    return config, graphdef, filled(abstract, arrays)


class _NotExact(Exception):
    """Raised while streaming codes the device would not dequantise to quant.py's bits (host path instead)."""


def _fitting(sharding: NamedSharding, shape) -> NamedSharding:
    """`sharding` for an on-disk array (codes: last axis halved; scales: blocks), without the mesh axes that do
    not divide a dimension (the jitted dequantisation reshards those parts on the devices)."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    entries = []
    for dim, entry in zip(shape, spec):
        axes = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
        entries.append(entry if dim % math.prod(sharding.mesh.shape[a] for a in axes) == 0 else None)
    return NamedSharding(sharding.mesh, P(*entries))


def _streamed(shape, sharding, pieces, stacked: bool, convert) -> jax.Array:
    """A global array of the pieces' raw codes (`convert`ed); a stacked one is read expert by expert, each device
    reading only its experts, a single one is read once."""
    if stacked:
        def callback(index):
            experts, rest = range(*index[0].indices(shape[0])), tuple(index[1:])
            return np.stack([convert(pieces[e].read())[rest] for e in experts])
    else:
        cache = []

        def callback(index):
            if not cache:
                cache.append(convert(pieces[0].read()))
            return cache[0][index]
    return jax.make_array_from_callback(shape, sharding, callback)


_DEQUANTIZERS: dict = {}
_DEQUANTIZERS_LOCK = threading.Lock()


def _dequantizer(kind: str, sharding, dtype):
    from dsv4jax.checkpoint.loader import dequantize_on_device

    key = (kind, sharding, np.dtype(dtype).name)
    with _DEQUANTIZERS_LOCK:
        if key not in _DEQUANTIZERS:
            _DEQUANTIZERS[key] = jax.jit(functools.partial(dequantize_on_device, kind, dtype=np.dtype(dtype)),
                                         out_shardings=sharding)
        return _DEQUANTIZERS[key]


def _load_param(by_expert: dict, target, sharding: NamedSharding) -> jax.Array:
    """One parameter, placed with `sharding`, from its planned pieces (see `loader.plan_checkpoint`)."""
    from dsv4jax.checkpoint.loader import device_exact

    stacked = None not in by_expert
    pieces = [by_expert[e] for e in range(target.shape[0])] if stacked else [by_expert[None]]
    kinds = {p.kind for p in pieces}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    lead = (len(pieces),) if stacked else ()
    if kind is None:
        return _streamed(target.shape, sharding, pieces, stacked, lambda a: a.astype(target.dtype))
    if kind in ("fp8", "fp4") and all(p.rows is None and p.scale_fits() and p.scale.dtype in ("F8_E8M0", "U8", "I8")
                                      for p in pieces):
        scales = [p.scale.read().view(np.uint8) for p in pieces]
        scale = np.stack(scales) if stacked else scales[0]
        if device_exact(kind, scale):
            def as_codes(raw):
                if not device_exact(kind, scale[:0], raw):
                    raise _NotExact
                return raw.view(np.uint8)

            try:
                codes_shape = (*lead, *pieces[0].raw_shape)
                codes = _streamed(codes_shape, _fitting(sharding, codes_shape), pieces, stacked, as_codes)
            except _NotExact:
                pass
            else:
                # FP8 scales cover 128-row blocks, which need not align with the shards: tiny, so replicated.
                scale_sharding = _fitting(sharding, scale.shape) if kind == "fp4" else NamedSharding(sharding.mesh, P())
                scale = jax.make_array_from_callback(scale.shape, scale_sharding, lambda index: scale[index])
                # Waiting bounds the packed inputs and temporaries on the devices to one per thread.
                return _dequantizer(kind, sharding, target.dtype)(codes, scale).block_until_ready()
    # Host dequantisation (quant.py), one tensor at a time: odd scales, NaN codes, FP8 splits across blocks.
    if not stacked:
        return host_to_global(pieces[0].host_value(target.dtype), sharding)
    value = np.zeros(target.shape, target.dtype)
    for e, piece in enumerate(pieces):
        value[e] = piece.host_value(target.dtype)
    return host_to_global(value, sharding)


def device_bytes(params: nnx.State, device) -> int:
    """Bytes of parameter shards held by `device`."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
               for shard in leaf.addressable_shards if shard.device == device)
