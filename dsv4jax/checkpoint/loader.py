"""Load official or HF-named DeepSeek-V4 safetensors into the NNX model, shard by shard (ARCHITECTURE §10, ARCHITECTURE §13).

FP8 weights (e4m3 + 128×128 UE8M0 scales) and packed FP4 experts (e2m1 + 1×32 UE8M0 scales) are dequantised
exactly (ARCHITECTURE §10.2) and stored in the model dtype (both formats are exact in bf16); fp32 tensors stay fp32.
Missing, unexpected, misshapen or truncated tensors raise `CheckpointError` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
from dsv4jax.checkpoint.names import (HF_STACKED_EXPERTS, checkpoint_layout, filled, flat_values, hf_to_official,
                                      is_hf_naming, model_layout, official_names, param_target)
from dsv4jax.checkpoint.safetensors_io import DTYPES, SafetensorsFile, read_index
from dsv4jax.config import ModelConfig, load_config

log = logging.getLogger(__name__)


def _abstract_params(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    from dsv4jax.model import DeepseekV4

    abstract = nnx.eval_shape(lambda: DeepseekV4(config, nnx.Rngs(0)))
    return nnx.split(abstract)


def _flat_targets(state: nnx.State, config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes to fill, by checkpoint-layout path (one per layer, names.checkpoint_layout)."""
    return checkpoint_layout(config, flat_values(state),
                             lambda target, _: jax.ShapeDtypeStruct(target.shape[1:], target.dtype))


class _Assembler:
    """Collects dequantised tensors into host arrays for every parameter path, checking names and shapes."""

    def __init__(self, config: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct]):
        self.config, self.targets = config, targets
        self.values: dict[str, np.ndarray] = {}
        self.filled: dict[str, set[int]] = defaultdict(set)

    def put(self, name: str, value: np.ndarray, source: str) -> None:
        path, expert, target = self.check(name, value.shape, source)
        value = value.astype(target.dtype)
        if expert is None:
            self.values[path] = value
        else:
            if path not in self.values:
                self.values[path] = np.zeros(target.shape, target.dtype)
            self.values[path][expert] = value
        self.filled[path].add(-1 if expert is None else expert)

    def check(self, name: str, shape, source: str) -> tuple[str, int | None, jax.ShapeDtypeStruct]:
        """(parameter path, expert or None, target) of a tensor, or a `CheckpointError` naming it."""
        path, expert = param_target(name)
        target = self.targets.get(path)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in {source}: the model (config: "
                                  f"{self.config.num_hidden_layers} layers, {self.config.num_mtp_layers} MTP) "
                                  f"has no such parameter")
        expected = target.shape if expert is None else target.shape[1:]
        if tuple(shape) != tuple(expected):
            raise CheckpointError(f"tensor {name!r} in {source} has shape {tuple(shape)}, expected "
                                  f"{tuple(expected)} from the config")
        if expert is not None and expert >= target.shape[0]:
            raise CheckpointError(f"tensor {name!r} in {source}: expert {expert} ≥ n_routed_experts "
                                  f"({target.shape[0]})")
        return path, expert, target

    def missing(self) -> list[str]:
        missing = []
        for path, target in self.targets.items():
            if target.shape and len(official_names(path, target.shape[0])) > 1:  # stacked experts
                names = official_names(path, target.shape[0])
                missing += [n for n, e in names if e not in self.filled[path]]
            elif path not in self.filled:
                missing += [official_names(path, 0)[0][0]]
        return missing


def _quant_kind(name: str, dtype: str, has_scale: bool) -> str | None:
    """"fp8", "fp4" or None (stored as is) for a tensor of safetensors `dtype`; raises for inconsistent pairs."""
    if dtype == "F8_E4M3":
        if not has_scale:
            raise CheckpointError(f"FP8 tensor {name!r} has no '.scale' tensor beside it")
        return "fp8"
    if dtype == "I8" and has_scale:  # packed FP4 routed expert
        return "fp4"
    if has_scale:
        raise CheckpointError(f"tensor {name!r} has a '.scale' but dtype {dtype} is neither F8_E4M3 nor I8 (FP4)")
    return None


def _dequantize(name: str, tensor: np.ndarray, scale: np.ndarray | None, dtype: str) -> np.ndarray:
    kind = _quant_kind(name, dtype, scale is not None)
    if kind == "fp8":
        return quant.dequantize_fp8(tensor, scale)
    if kind == "fp4":
        return quant.dequantize_fp4(tensor, scale)
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


# --------------------------------------------------------------------------------------------------------------------
# Streaming: the same names, checks and formats as `read_checkpoint`, planned from the headers alone, so that a
# sharded load (`dsv4jax.sharding.params.load_sharded`) can read each tensor's raw bytes when it needs them.


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where one (expert's) tensor lies on disk: raw codes at `offset` (C order), its scale, its format.

    `shape` is the dequantised shape (what `_Assembler.check` compares); `rows` is a row range still to cut
    after dequantising (a quantised stacked tensor split by `_put_hf_stacked`: dequantised on the host).
    """

    name: str
    file: Path
    dtype: str  # safetensors dtype string of the stored codes
    raw_shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    kind: str | None = None  # "fp8", "fp4" or None
    scale: Piece | None = None
    rows: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        shape = (*self.raw_shape[:-1], 2 * self.raw_shape[-1]) if self.kind == "fp4" else self.raw_shape
        return shape if self.rows is None else (*shape[:-2], self.rows[1] - self.rows[0], shape[-1])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> Piece:
        """piece[e] or piece[e, r0:r1] (what `_put_hf_stacked` takes from a stacked tensor): a contiguous range."""
        expert, rows = (key, slice(None)) if isinstance(key, int) else key
        inner = self.raw_shape[1:]
        stride = math.prod(inner) * DTYPES[self.dtype].itemsize
        piece = dataclasses.replace(self, raw_shape=inner, offset=self.offset + expert * stride,
                                    scale=None if self.scale is None else self.scale[expert])
        if rows == slice(None):
            return piece
        r0, r1, _ = rows.indices(piece.shape[-2])
        if self.kind is not None:  # quantised and stacked (no known checkpoint): cut after dequantising on the host
            return dataclasses.replace(piece, rows=(r0, r1))
        return piece._row_range(r0, r1)

    def _row_range(self, r0: int, r1: int) -> Piece:
        row_bytes = self.raw_shape[-1] * DTYPES[self.dtype].itemsize
        return dataclasses.replace(self, raw_shape=(r1 - r0, self.raw_shape[-1]), offset=self.offset + r0 * row_bytes)

    def scale_fits(self) -> bool:
        """Whether the scale has the shape quant.py expects (if not, the host path raises its error)."""
        *lead, rows, cols = self.raw_shape
        if self.kind == "fp8":
            expected = (*lead, -(-rows // quant.FP8_WEIGHT_BLOCK[0]), -(-cols // quant.FP8_WEIGHT_BLOCK[1]))
        else:
            expected = (*lead, rows, -(-2 * cols // quant.FP4_WEIGHT_BLOCK))
        return self.scale is not None and self.scale.raw_shape == tuple(expected)

    def read(self) -> np.ndarray:
        """The stored codes (raw dtype), read with one positional read."""
        out = np.empty(self.raw_shape, DTYPES[self.dtype])
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.file, "rb", buffering=0) as file:
            done = 0
            while done < len(view):
                n = os.preadv(file.fileno(), [view[done:]], self.offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.file}: tensor {self.name!r} is truncated: read {done} of "
                                          f"{len(view)} bytes")
                done += n
        return out

    def host_value(self, dtype) -> np.ndarray:
        """Dequantised on the host exactly as `read_checkpoint` does, in `dtype`."""
        value = _dequantize(self.name, self.read(), None if self.scale is None else self.scale.read(), self.dtype)
        if self.rows is not None:
            value = value[..., self.rows[0]:self.rows[1], :]
        return value.astype(dtype)


def plan_checkpoint(directory: str | os.PathLike, config: ModelConfig, targets: dict[str, jax.ShapeDtypeStruct]
                    ) -> dict[str, dict[int | None, Piece]]:
    """Parameter path -> {expert or None: Piece}, from the headers only; raises the errors `read_checkpoint` does
    (unexpected, misshapen, missing tensors, scales without weights, FP8 without scales)."""
    directory = Path(directory)
    weight_map = read_index(directory)
    hf = is_hf_naming(weight_map)
    assembler = _Assembler(config, targets)
    plan: dict[str, dict[int | None, Piece]] = defaultdict(dict)
    headers: dict[str, SafetensorsFile] = {}

    def piece(name: str, kind: str | None = None, scale: Piece | None = None) -> Piece:
        file = weight_map[name]
        if file not in headers:
            headers[file] = SafetensorsFile(directory / file)  # checks the header (truncation, offsets)
        shard = headers[file]
        entry = shard._entries[name]
        return Piece(name, directory / file, entry["dtype"], tuple(entry["shape"]),
                     shard._data_start + entry["data_offsets"][0], kind, scale)

    def put(official: str, value: Piece, source: str) -> None:
        path, expert, _ = assembler.check(official, value.shape, source)
        plan[path][expert] = value
        assembler.filled[path].add(-1 if expert is None else expert)

    for name in sorted(weight_map, key=lambda n: (weight_map[n], n)):
        file = weight_map[name]
        raw = piece(name)
        if name.endswith((".scale", ".weight_scale_inv")):
            base = name.rsplit(".", 1)[0] + ".weight"
            if base in weight_map:
                continue  # planned together with its weight
            if name.endswith(".weight_scale_inv") or raw.dtype == "F8_E8M0":
                raise CheckpointError(f"scale tensor {name!r} in {file} has no weight {base!r}")
        scale_name = next((s for s in (name[:-len(".weight")] + ".scale", name[:-len(".weight")] + ".weight_scale_inv")
                           if name.endswith(".weight") and s in weight_map), None)
        kind = _quant_kind(name, raw.dtype, scale_name is not None)
        value = dataclasses.replace(raw, kind=kind, scale=None if scale_name is None else piece(scale_name))
        source = f"{directory / file}"
        official = hf_to_official(name) if hf else name
        stacked = HF_STACKED_EXPERTS.match(official) if hf else None
        if stacked:
            _put_hf_stacked(_PlanSink(put), stacked, value, source)
        else:
            put(official, value, source)
    for shard in headers.values():
        shard.close()
    missing = assembler.missing()
    if missing:
        shown = ", ".join(repr(n) for n in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} tensor(s): {shown}")
    return dict(plan)


class _PlanSink:
    """What `_put_hf_stacked` writes to, when planning."""

    def __init__(self, put):
        self.put = put


def _e8m0_device(scale: jax.Array) -> jax.Array:
    """UE8M0 bytes -> 2^(b-127) as fp32, as `quant._e8m0_to_float32` (b=0: 2^-127, b=0xFF: NaN)."""
    bits = scale.astype(jnp.uint32) << 23
    bits = jnp.where(scale == 0, jnp.uint32(0x00400000), bits)
    bits = jnp.where(scale == 0xFF, jnp.uint32(0x7FC00000), bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def dequantize_on_device(kind: str, codes: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """`quant.dequantize_fp8` / `dequantize_fp4` in jnp (codes and scales as raw uint8), cast to `dtype`.

    Bit-identical to the host functions for every finite code whose product is a normal fp32 (devices may flush
    subnormals): `device_exact` tells which inputs qualify.
    """
    if kind == "fp4":
        packed = codes
        codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
        # E2M1 (quant.E2M1_LUT) by arithmetic, which fuses, rather than a gather: exponent bits 0 -> m·0.5,
        # else (1 + m/2)·2^(e−1); bit 3 is the sign.
        exponent, mantissa = ((codes >> 1) & 3).astype(jnp.int32), (codes & 1).astype(jnp.float32)
        magnitude = jnp.where(exponent == 0, 0.5 * mantissa,
                              (1.0 + 0.5 * mantissa) * (jnp.left_shift(1, exponent).astype(jnp.float32) * 0.5))
        values = jnp.where(codes >= 8, -magnitude, magnitude)
        scales = jnp.repeat(_e8m0_device(scale), quant.FP4_WEIGHT_BLOCK, axis=-1)[..., :values.shape[-1]]
    else:
        values = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).astype(jnp.float32)
        rows, cols = codes.shape[-2:]
        block_rows, block_cols = quant.FP8_WEIGHT_BLOCK
        scales = jnp.repeat(jnp.repeat(_e8m0_device(scale), block_rows, axis=-2)[..., :rows, :], block_cols,
                            axis=-1)[..., :cols]
    return (values * scales).astype(dtype)


# Smallest scale byte whose products with every nonzero code stay normal fp32 (smallest e4m3 magnitude 2^-9,
# smallest E2M1 one 2^-1): below it, or for NaN scales/codes, the host dequantises instead.
_MIN_EXACT_SCALE_BYTE = {"fp8": 127 - 126 + 9, "fp4": 127 - 126 + 1}


def device_exact(kind: str, scale: np.ndarray, codes: np.ndarray | None = None) -> bool:
    """Whether `dequantize_on_device` gives quant.py's bits for these scales (and FP8 codes: no NaN code)."""
    scale = np.asarray(scale).view(np.uint8)
    if scale.size and (scale.min() < _MIN_EXACT_SCALE_BYTE[kind] or scale.max() == 0xFF):
        return False
    return codes is None or kind != "fp8" or not np.any((np.asarray(codes).view(np.uint8) & 0x7F) == 0x7F)


def _has_mtp_tensors(directory: Path) -> bool:
    return any(n.startswith("mtp.") for n in read_index(directory))


def abstract_for_checkpoint(path: str | os.PathLike, dtype: str | None = None, **overrides):
    """(config, graphdef, abstract state) of the model a checkpoint directory fills (without MTP if it has none)."""
    from dsv4jax.model import DeepseekV4  # noqa: F401  (registers the module classes)

    directory = Path(path)
    if dtype is not None:
        overrides["dtype"] = dtype
    config = load_config(directory, **overrides)
    if config.num_mtp_layers and not _has_mtp_tensors(directory):
        log.warning("%s has no mtp.* tensors; loading without the MTP module", directory)
        config = config.replace(num_mtp_layers=0, compress_ratios=config.compress_ratios[:config.num_hidden_layers])
    graphdef, state = _abstract_params(config)
    return config, graphdef, state


def read_host_params(path: str | os.PathLike, dtype: str | None = None, progress: bool = True, **overrides):
    """(config, graphdef, state of host numpy arrays) from a checkpoint directory; nothing is put on a device.

    `load_model` places them on the default device; `dsv4jax.sharding.params.load_sharded` sends each device
    only its shards. A checkpoint without any `mtp.*` tensors (HF-saved ones: HF has no MTP module) loads
    without the MTP module.
    """
    directory = Path(path)
    config, graphdef, state = abstract_for_checkpoint(directory, dtype, **overrides)
    values = read_checkpoint(directory, config, _flat_targets(state, config), progress)
    values = model_layout(config, values, lambda _, parts: np.stack(parts))
    return config, graphdef, filled(state, values)


def load_model(path: str | os.PathLike, dtype: str | None = None, progress: bool = True, **overrides):
    """Build a `DeepseekV4` from a checkpoint directory (config.json + safetensors, official or HF naming).

    A checkpoint without any `mtp.*` tensors (HF-saved ones: HF has no MTP module) loads without the MTP module.
    """
    _, graphdef, host = read_host_params(path, dtype, progress, **overrides)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, host))
