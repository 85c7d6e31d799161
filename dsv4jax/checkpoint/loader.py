"""Load official or HF-named DeepSeek-V4 safetensors into the NNX model, shard by shard (ARCHITECTURE §10, §13).

FP8 weights (e4m3 + 128×128 UE8M0 scales) and packed FP4 experts (e2m1 + 1×32 UE8M0 scales) are dequantised
exactly (§10.2) and stored in the model dtype (both formats are exact in bf16); fp32 tensors stay fp32.
Missing, unexpected, misshapen or truncated tensors raise `CheckpointError` naming the tensor.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from dsv4jax import quant
from dsv4jax.checkpoint.errors import CheckpointError
from dsv4jax.checkpoint.names import (HF_STACKED_EXPERTS, hf_to_official, is_hf_naming, official_names,
                                      param_target, path_key)
from dsv4jax.checkpoint.safetensors_io import SafetensorsFile, read_index
from dsv4jax.config import ModelConfig, load_config

log = logging.getLogger(__name__)


def _abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    from dsv4jax.model import DeepseekV4

    abstract = nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0)))
    return nnx.split(abstract)


def _flat_targets(state: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    return {path_key(path): var.get_value() for path, var in nnx.to_flat_state(state)}


class _Assembler:
    """Collects dequantised tensors into host arrays for every parameter path, checking names and shapes."""

    def __init__(self, config: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct]):
        self.config, self.targets = config, targets
        self.values: dict[str, np.ndarray] = {}
        self.filled: dict[str, set[int]] = defaultdict(set)

    def put(self, name: str, value: np.ndarray, source: str) -> None:
        path, expert = param_target(name)
        target = self.targets.get(path)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in {source}: the model (config: "
                                  f"{self.config.num_hidden_layers} layers, {self.config.num_mtp_layers} MTP) "
                                  f"has no such parameter")
        expected = target.shape if expert is None else target.shape[1:]
        if tuple(value.shape) != tuple(expected):
            raise CheckpointError(f"tensor {name!r} in {source} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(expected)} from the config")
        value = value.astype(target.dtype)
        if expert is None:
            self.values[path] = value
            self.filled[path].add(-1)
        else:
            if expert >= target.shape[0]:
                raise CheckpointError(f"tensor {name!r} in {source}: expert {expert} ≥ n_routed_experts "
                                      f"({target.shape[0]})")
            if path not in self.values:
                self.values[path] = np.zeros(target.shape, target.dtype)
            self.values[path][expert] = value
            self.filled[path].add(expert)

    def missing(self) -> list[str]:
        missing = []
        for path, target in self.targets.items():
            if target.shape and len(official_names(path, target.shape[0])) > 1:  # stacked experts
                names = official_names(path, target.shape[0])
                missing += [n for n, e in names if e not in self.filled[path]]
            elif path not in self.filled:
                missing += [official_names(path, 0)[0][0]]
        return missing


def _dequantize(name: str, tensor: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    if dtype == "F8_E4M3":
        if scale is None:
            raise CheckpointError(f"FP8 tensor {name!r} has no '.scale' tensor beside it")
        return quant.dequantize_fp8(tensor, scale)
    if dtype == "I8" and scale is not None:  # packed FP4 routed expert
        return quant.dequantize_fp4(tensor, scale)
    if scale is not None:
        raise CheckpointError(f"tensor {name!r} has a '.scale' but dtype {dtype} is neither F8_E4M3 nor I8 (FP4)")
    return np.asarray(tensor)


def read_checkpoint(directory: str | os.PathLike, config: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct],
                    progress: bool = True) -> dict[str, np.ndarray]:
    """Host arrays for every parameter path, read shard by shard."""
    directory = Path(directory)
    weight_map = read_index(directory)
    hf = is_hf_naming(weight_map)
    assembler = _Assembler(config, targets)
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, file in weight_map.items():
        by_file[file].append(name)
    for file in tqdm(sorted(by_file), desc=f"loading {directory.name}", unit="shard", disable=not progress):
        with SafetensorsFile(directory / file) as shard:
            names = set(shard.keys())
            for name in sorted(by_file[file]):
                if name.endswith((".scale", ".weight_scale_inv")):
                    base = name.rsplit(".", 1)[0] + ".weight"
                    if base in weight_map:
                        continue  # read together with its weight
                    if name.endswith(".weight_scale_inv") or shard.dtype(name) == "F8_E8M0":
                        raise CheckpointError(f"scale tensor {name!r} in {file} has no weight {base!r}")
                scale_name = next((s for s in (name[:-len(".weight")] + ".scale",
                                               name[:-len(".weight")] + ".weight_scale_inv")
                                   if name.endswith(".weight") and s in weight_map), None)
                scale = None
                if scale_name is not None:
                    if scale_name in names:
                        scale = shard.get(scale_name)
                    else:
                        with SafetensorsFile(directory / weight_map[scale_name]) as other:
                            scale = other.get(scale_name)
                value = _dequantize(name, shard.get(name), scale, shard.dtype(name))
                official = hf_to_official(name) if hf else name
                stacked = HF_STACKED_EXPERTS.match(official) if hf else None
                if stacked:
                    _put_hf_stacked(assembler, stacked, value, f"{directory / file}")
                else:
                    assembler.put(official, value, f"{directory / file}")
    missing = assembler.missing()
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} tensor(s): {shown}")
    return assembler.values


def _put_hf_stacked(assembler: _Assembler, match, value: np.ndarray, source: str) -> None:
    prefix = match["prefix"]
    if match["proj"] == "down_proj":
        for e in range(value.shape[0]):
            assembler.put(f"{prefix}.{e}.w2.weight", value[e], source)
        return
    if value.ndim != 3 or value.shape[1] % 2:
        raise CheckpointError(f"tensor {prefix}.gate_up_proj in {source} has shape {value.shape}, expected [E, 2I, D]")
    half = value.shape[1] // 2
    for e in range(value.shape[0]):
        assembler.put(f"{prefix}.{e}.w1.weight", value[e, :half], source)
        assembler.put(f"{prefix}.{e}.w3.weight", value[e, half:], source)


def _has_mtp_tensors(directory: Path) -> bool:
    return any(n.startswith("mtp.") for n in read_index(directory))


def read_host_params(path: str | os.PathLike, dtype: str | None = None, progress: bool = True, **overrides):
    """(config, graphdef, state of host numpy arrays) from a checkpoint directory; nothing is put on a device.

    `load_model` places them on the default device; `dsv4jax.sharding.params.load_sharded` sends each device
    only its shards. A checkpoint without any `mtp.*` tensors (HF-saved ones: HF has no MTP module) loads
    without the MTP module.
    """
    from dsv4jax.model import DeepseekV4  # noqa: F401  (registers the module classes)

    directory = Path(path)
    if dtype is not None:
        overrides["dtype"] = dtype
    config = load_config(directory, **overrides)
    if config.num_mtp_layers and not _has_mtp_tensors(directory):
        log.warning("%s has no mtp.* tensors; loading without the MTP module", directory)
        config = config.replace(num_mtp_layers=0, compress_ratios=config.compress_ratios[:config.num_hidden_layers])
    graphdef, state = _abstract_params(config)
    targets = _flat_targets(state)
    values = read_checkpoint(directory, config, targets, progress)
    flat = [(path, var.replace(values[path_key(path)])) for path, var in nnx.to_flat_state(state)]
    return config, graphdef, nnx.from_flat_state(flat)


def load_model(path: str | os.PathLike, dtype: str | None = None, progress: bool = True, **overrides):
    """Build a `DeepseekV4` from a checkpoint directory (config.json + safetensors, official or HF naming).

    A checkpoint without any `mtp.*` tensors (HF-saved ones: HF has no MTP module) loads without the MTP module.
    """
    _, graphdef, host = read_host_params(path, dtype, progress, **overrides)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, host))
