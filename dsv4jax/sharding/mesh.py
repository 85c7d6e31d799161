"""The device mesh: named axes `dp, cp, tp, ep`, built from a spec such as "dp=1,cp=4,tp=1,ep=4".

- dp: data parallel — each dp rank owns its own sequences (the batch axis); with `dp_attention` the MoE
  weights are also tensor-sharded over dp and the MoE gathers every dp rank's tokens (PARALLELISM §4).
- cp: context parallel — a prefill chunk's tokens are split over cp (PARALLELISM §1); decode is replicated over cp.
  The cp ranks are also expert owners in the MoE (SGLang: the CP group is the MoE group, PARALLELISM §3.1).
- tp: tensor parallel for the MoE intermediate dimension (attention stays replicated: attn_tp = 1, PARALLELISM §0).
- ep: expert parallel — the routed-expert axis.
Axis order dp, cp, tp, ep (PARALLELISM §0: the fastest-varying axes last). All axes are `AxisType.Auto`: the parallel code
is manual inside `shard_map`, and `jit` outside it propagates the input shardings automatically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from dsv4jax.compat import backends_started
from dsv4jax.config import ModelConfig

AXES = ("dp", "cp", "tp", "ep")


class MeshError(ValueError):
    """A mesh spec that cannot work: unknown axis, wrong device count, or a size that does not divide the model."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    dp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    cp_mode: str = "round_robin"  # or "zigzag" (PARALLELISM §1.1, PARALLELISM §1.2)
    dp_attention: bool = False  # MoE weights also sharded over dp; tokens gathered over dp (PARALLELISM §4)
    moe_mode: str = "gather"  # or "all_to_all" (PARALLELISM §3.2)

    def __post_init__(self):
        for axis in AXES:
            if getattr(self, axis) < 1:
                raise MeshError(f"mesh axis {axis}={getattr(self, axis)} must be ≥ 1")
        if self.cp_mode not in ("round_robin", "zigzag"):
            raise MeshError(f"cp_mode {self.cp_mode!r}: use 'round_robin' or 'zigzag'")
        if self.moe_mode not in ("gather", "all_to_all"):
            raise MeshError(f"moe_mode {self.moe_mode!r}: use 'gather' or 'all_to_all'")
        if self.moe_mode == "all_to_all" and self.dp_attention:
            raise MeshError("moe_mode='all_to_all' keeps tokens on their dp rank, so the MoE weights cannot be split "
                            "over dp: use dp_attention=False (or moe_mode='gather' for DP attention + TP MoE, PARALLELISM §4)")

    @property
    def shape(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in AXES}

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())

    def axis_size(self, axes: tuple[str, ...]) -> int:
        return math.prod(getattr(self, a) for a in axes)

    # Which mesh axes shard what (the rules table in `rules.py` is built from these).
    @property
    def expert_axes(self) -> tuple[str, ...]:
        """The routed-expert axis is split over cp × ep: every CP rank owns experts (PARALLELISM §3.1)."""
        return tuple(a for a in ("cp", "ep") if getattr(self, a) > 1)

    @property
    def moe_mlp_axes(self) -> tuple[str, ...]:
        """The experts' intermediate dimension: tp, and dp under DP attention (PARALLELISM §4: MoE TP over the dp world)."""
        axes = ("dp", "tp") if self.dp_attention else ("tp",)
        return tuple(a for a in axes if getattr(self, a) > 1)

    @property
    def moe_weight_axes(self) -> tuple[str, ...]:
        """Every axis over which some MoE weight is split, in mesh order."""
        used = set(self.expert_axes) | set(self.moe_mlp_axes)
        return tuple(a for a in AXES if a in used)

    def check_model(self, config: ModelConfig) -> None:
        """Raise MeshError if a mesh axis does not divide what it shards."""
        experts = self.axis_size(self.expert_axes)
        if config.n_routed_experts % experts:
            raise MeshError(f"the expert axis is split over {'×'.join(self.expert_axes)} = {experts} devices, which "
                            f"does not divide n_routed_experts={config.n_routed_experts}; choose cp·ep dividing "
                            f"{config.n_routed_experts}")
        mlp = self.axis_size(self.moe_mlp_axes)
        if config.moe_intermediate_size % mlp:
            raise MeshError(f"moe_intermediate_size={config.moe_intermediate_size} is split over "
                            f"{'×'.join(self.moe_mlp_axes)} = {mlp} devices and must be divisible by it; lower tp")
        shared = self.axis_size(self.moe_weight_axes)
        if config.n_shared_experts and config.moe_intermediate_size % shared:
            raise MeshError(f"the shared expert's intermediate size {config.moe_intermediate_size} is split over all "
                            f"MoE axes ({shared} devices) and must be divisible by it")


def parse_mesh_spec(spec: str, **options) -> MeshConfig:
    """"dp=1,cp=4,tp=1,ep=4" (omitted axes are 1) -> MeshConfig; options: cp_mode, dp_attention, moe_mode."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise MeshError(f"unknown mesh axis {name!r} in {spec!r}; the axes are {', '.join(AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise MeshError(f"mesh axis {name!r} in {spec!r} needs an integer size, e.g. {name}=2") from None
    return MeshConfig(**sizes, **options)


# XLA's default ragged all-to-all within one host is a one-shot copy kernel that moved ~5 GB/s on 2×H200 (ep=2, 8k
# tokens: 132 ms per MoE layer, of which 113 ms per GPU in that kernel; openxla/xla#33386). Decomposed into a dense
# all-to-all and copies it took 12.6 ms (bench/results/multi-gpu-nvidia-h200-x2-ep-a2a-*.json).
DECOMPOSE_RAGGED_ALL_TO_ALL = "--xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=true"


def prefer_decomposed_ragged_all_to_all(environ=None) -> bool:
    """Add DECOMPOSE_RAGGED_ALL_TO_ALL to XLA_FLAGS unless they name the decomposer already (the user's choice
    stands). XLA reads its flags when its backend starts: returns False (and changes nothing) if it has started
    without them, so the caller can say so."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if "ragged_all_to_all_decomposer" in flags:
        return True
    if backends_started():
        return False
    environ["XLA_FLAGS"] = f"{flags} {DECOMPOSE_RAGGED_ALL_TO_ALL}".strip()
    return True


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The mesh over `devices` (default: all devices of all processes), axes dp, cp, tp, ep, all Auto.

    A mesh whose MoE exchanges pairs (`moe_mode="all_to_all"` with experts split) first asks XLA for the
    decomposed ragged all-to-all, which only works before XLA's backend starts: build such a mesh before any
    other JAX work (the server and benchmarks do), or set XLA_FLAGS yourself."""
    if config.moe_mode == "all_to_all" and config.expert_axes and not prefer_decomposed_ragged_all_to_all():
        warnings.warn(f"XLA started before this all-to-all mesh was built, without {DECOMPOSE_RAGGED_ALL_TO_ALL}: "
                      f"on GPUs the MoE exchange will use XLA's slow one-shot ragged all-to-all; build the mesh "
                      f"before other JAX work or add that flag to XLA_FLAGS", stacklevel=2)
    devices = list(jax.devices() if devices is None else devices)
    if config.size != len(devices):
        shape = ",".join(f"{a}={n}" for a, n in config.shape.items())
        raise MeshError(f"mesh {shape} needs {config.size} devices but {len(devices)} are given; make the product "
                        f"of the axis sizes equal {len(devices)} (or pass devices=jax.devices()[:{config.size}])")
    grid = np.asarray(devices, dtype=object).reshape(tuple(config.shape.values()))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
