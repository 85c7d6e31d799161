"""DeepSeek-V4 configuration: one frozen dataclass, read from an upstream `config.json` in either naming.

ARCHITECTURE §1.1 lists the real values (HF names, official `inference/config.json` names in brackets),
ARCHITECTURE §1.3 how HF translates them. `ModelConfig` is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_RATIO_OF_LAYER_TYPE = {SLIDING: 0, CSA: 4, HCA: 128}
SUPPORTED_RATIOS = (0, 4, 128)


class ConfigError(ValueError):
    """A config field is missing, has the wrong type, or has a value DeepSeek-V4 does not support."""


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Main layers `first` … `first + period·repeats − 1` run as `repeats` repetitions of a unit of `period` layers
    whose kinds repeat (ARCHITECTURE §3.1): position j of repetition r is layer first + r·period + j."""

    first: int
    period: int
    repeats: int

    def layer(self, repetition: int, position: int) -> int:
        return self.first + repetition * self.period + position

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.period * self.repeats)


# A repeated unit is at most this many layers long (V4's own pattern is CSA, HCA: 2).
MAX_LAYER_PERIOD = 4


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency interpolation used on CSA/HCA layers only (ARCHITECTURE §6.2; no mscale)."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # One ratio per main layer plus one per MTP layer (ARCHITECTURE §1.1: the last entry is the MTP layer).
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnScaling | None = YarnScaling()
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_mtp_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    expert_dtype: str | None = "fp4"  # on-disk format of routed experts: "fp4", "fp8" or None (bf16)
    weight_block_size: tuple[int, int] | None = (128, 128)  # FP8 block scales; None: unquantized checkpoint
    # Numerics (not part of the checkpoint). ARCHITECTURE §2: activations in `dtype`, listed math in fp32.
    dtype: str = "bfloat16"
    simulate_fp8_kv: bool = False  # ARCHITECTURE §10.3 item 2
    simulate_fp4_indexer: bool = False  # ARCHITECTURE §10.3 item 3
    simulate_fp8_activations: bool = False  # ARCHITECTURE §10.3 item 1
    # Execution (not part of the checkpoint): layers of one kind stacked and run under one scan (model/stack.py).
    scan_layers: bool = True

    def __post_init__(self):
        _validate(self)

    # ---- derived quantities (ARCHITECTURE §1.2) ----
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def compress_ratio(self, layer: int) -> int:
        """Ratio of main layer `layer`, or of the MTP layer when `layer == num_hidden_layers`."""
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        return {0: SLIDING, 4: CSA, 128: HCA}[self.compress_ratio(layer)]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def mtp_layer(self) -> int:
        return self.num_hidden_layers

    def layer_kind(self, layer: int) -> tuple[int, bool]:
        """What decides a layer's parameter and state shapes: (compress ratio, hash routing)."""
        return self.compress_ratio(layer), self.is_hash_layer(layer)

    def layer_groups(self) -> tuple[LayerGroup, ...]:
        """The main layers as consecutive groups, each run under one scan (ARCHITECTURE §3.1).

        Greedy from the first layer: the unit (of at most MAX_LAYER_PERIOD layers) whose repetitions cover the most
        layers, ties to the shorter unit; a layer that starts no repetition is a group of its own. With
        `scan_layers` off every layer is its own group.
        """
        kinds = [self.layer_kind(i) for i in range(self.num_hidden_layers)]
        if not self.scan_layers:
            return tuple(LayerGroup(i, 1, 1) for i in range(len(kinds)))
        groups, first = [], 0
        while first < len(kinds):
            best = (1, 1)
            for period in range(1, MAX_LAYER_PERIOD + 1):
                unit = kinds[first:first + period]
                if len(unit) < period:
                    break
                repeats = 1
                while kinds[first + repeats * period:first + (repeats + 1) * period] == unit:
                    repeats += 1
                if repeats > 1 and period * repeats > best[0] * best[1]:
                    best = (period, repeats)
            groups.append(LayerGroup(first, *best))
            first += best[0] * best[1]
        return tuple(groups)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json_dict(self) -> dict[str, Any]:
        """Upstream (official `inference/config.json`-style, HF-compatible) dictionary."""
        d = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_ratios": list(self.compress_ratios),
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hash_layers": self.num_hash_layers,
            "scoring_func": "sqrtsoftplus",
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.rms_norm_eps,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "attention_bias": False,
            "torch_dtype": "bfloat16",
        }
        if self.yarn is not None:
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": self.yarn.factor,
                "original_max_position_embeddings": self.yarn.original_max_position_embeddings,
                "beta_fast": self.yarn.beta_fast,
                "beta_slow": self.yarn.beta_slow,
            }
        if self.weight_block_size is not None:
            d["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": list(self.weight_block_size),
                "activation_scheme": "dynamic",
                "scale_fmt": "ue8m0",
            }
        if self.expert_dtype is not None:
            d["expert_dtype"] = self.expert_dtype
        return d


# Official `inference/config.json` name -> our name (ARCHITECTURE §1.1, names in brackets).
_OFFICIAL_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "rope_head_dim": "rope_head_dim",
    "qk_rope_head_dim": "rope_head_dim",
    "window_size": "sliding_window",
    "n_activated_experts": "num_experts_per_tok",
    "moe_inter_dim": "moe_intermediate_size",
    "n_hash_layers": "num_hash_layers",
    "route_scale": "routed_scaling_factor",
    "norm_eps": "rms_norm_eps",
    "n_mtp_layers": "num_mtp_layers",
    "num_nextn_predict_layers": "num_mtp_layers",
    "max_seq_len": "max_position_embeddings",
}
_NUMERIC_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {
    "compress_ratios", "yarn", "expert_dtype", "weight_block_size", "dtype",
    "simulate_fp8_kv", "simulate_fp4_indexer", "simulate_fp8_activations", "scan_layers",
}


def config_from_dict(raw: dict[str, Any], **overrides) -> ModelConfig:
    """Build a `ModelConfig` from an upstream dict in official or HF naming; unknown keys are ignored."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name = _OFFICIAL_NAMES.get(key, key)
        if name in _NUMERIC_FIELDS:
            fields[name] = value
    if "num_key_value_heads" in raw and raw["num_key_value_heads"] != 1:
        raise ConfigError(f"num_key_value_heads must be 1 (one shared K=V head), got {raw['num_key_value_heads']}")
    score = raw.get("scoring_func", raw.get("score_func", "sqrtsoftplus"))
    if score != "sqrtsoftplus":
        raise ConfigError(f"scoring_func {score!r} is not DeepSeek-V4's; only 'sqrtsoftplus' is supported")
    if raw.get("tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings must be false for DeepSeek-V4 (separate embed and head)")
    if "head_dim" in raw and "partial_rotary_factor" in raw and "qk_rope_head_dim" not in raw \
            and "rope_head_dim" not in raw:
        fields["rope_head_dim"] = int(round(raw["head_dim"] * raw["partial_rotary_factor"]))
    fields["compress_ratios"] = _read_compress_ratios(raw, fields)
    if "num_hash_layers" not in fields and isinstance(raw.get("mlp_layer_types"), list):
        fields["num_hash_layers"] = sum(1 for t in raw["mlp_layer_types"] if t == "hash_moe")
    fields["yarn"] = _read_yarn(raw)
    quant = raw.get("quantization_config")
    if isinstance(quant, dict):
        block = quant.get("weight_block_size")
        fields["weight_block_size"] = tuple(block) if block is not None else None
        expert = quant.get("expert_dtype", raw.get("expert_dtype"))
    else:
        fields["weight_block_size"] = (128, 128) if raw.get("dtype") == "fp8" else None
        expert = raw.get("expert_dtype")
    fields["expert_dtype"] = expert
    if isinstance(raw.get("eos_token_id"), list):
        fields["eos_token_id"] = raw["eos_token_id"][0]
    for name, value in fields.items():
        if name in _NUMERIC_FIELDS and value is None:
            raise ConfigError(f"config field {name!r} is null; give a number")
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except TypeError as e:  # a wrong field name in overrides
        raise ConfigError(str(e)) from None


def _read_compress_ratios(raw: dict[str, Any], fields: dict[str, Any]) -> tuple[int, ...]:
    num_layers = fields.get("num_hidden_layers", ModelConfig.num_hidden_layers)
    num_mtp = fields.get("num_mtp_layers", ModelConfig.num_mtp_layers)
    if "compress_ratios" in raw:
        ratios = raw["compress_ratios"]
        if not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"compress_ratios must be a list of 0/4/128, got {ratios!r}")
        ratios = list(ratios)
    elif isinstance(raw.get("layer_types"), list):
        rates = raw.get("compress_rates") or {}
        ratio_of = dict(_RATIO_OF_LAYER_TYPE, **{k: v for k, v in rates.items()})
        for t in raw["layer_types"]:
            if t not in ratio_of:
                raise ConfigError(f"layer_types entry {t!r} is not one of {sorted(_RATIO_OF_LAYER_TYPE)}")
        ratios = [ratio_of[t] for t in raw["layer_types"]]
    else:
        return ModelConfig.compress_ratios
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ratios):
        raise ConfigError(f"compress_ratios entries must be integers, got {ratios!r}")
    # HF keeps only the main layers; the MTP layer is sliding-only (ARCHITECTURE §12.1).
    if len(ratios) == num_layers:
        ratios = ratios + [0] * num_mtp
    return tuple(ratios)


def _read_yarn(raw: dict[str, Any]) -> YarnScaling | None:
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if scaling is None and isinstance(params, dict) and isinstance(params.get("compress"), dict):
        scaling = params["compress"]
    if scaling is None and "rope_factor" in raw:  # official inference/config.json
        scaling = {"type": "yarn", "factor": raw["rope_factor"], "beta_fast": raw.get("beta_fast", 32),
                   "beta_slow": raw.get("beta_slow", 1),
                   "original_max_position_embeddings": raw.get("original_seq_len", 65536)}
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type", "yarn"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; DeepSeek-V4 uses 'yarn'")
    try:
        return YarnScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast", 32)),
            beta_slow=float(scaling.get("beta_slow", 1)),
        )
    except KeyError as e:
        raise ConfigError(f"rope_scaling is missing {e.args[0]!r}") from None


def _validate(c: ModelConfig) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)

    for name in _NUMERIC_FIELDS:
        value = getattr(c, name)
        need(isinstance(value, (int, float)) and not isinstance(value, bool),
             f"config field {name!r} must be a number, got {value!r}")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters",
                 "index_n_heads", "index_head_dim", "index_topk"):
        need(isinstance(getattr(c, name), int) and getattr(c, name) > 0,
             f"config field {name!r} must be a positive integer, got {getattr(c, name)!r}")
    need(c.num_mtp_layers in (0, 1), f"num_mtp_layers (num_nextn_predict_layers) must be 0 or 1, got {c.num_mtp_layers}")
    need(len(c.compress_ratios) == c.num_hidden_layers + c.num_mtp_layers,
         f"compress_ratios has {len(c.compress_ratios)} entries; expected num_hidden_layers "
         f"({c.num_hidden_layers}) + MTP layers ({c.num_mtp_layers})")
    for i, r in enumerate(c.compress_ratios):
        need(r in SUPPORTED_RATIOS, f"compress_ratios[{i}] = {r} is not a supported compress ratio "
             f"(use 0 = sliding, 4 = CSA, 128 = HCA)")
    if c.num_mtp_layers:
        need(c.compress_ratios[-1] == 0, "the MTP layer (last compress_ratios entry) must be sliding-only (0)")
    need(c.num_attention_heads % c.o_groups == 0,
         f"num_attention_heads ({c.num_attention_heads}) must be divisible by o_groups ({c.o_groups})")
    need(0 < c.rope_head_dim < c.head_dim and c.rope_head_dim % 2 == 0,
         f"rope_head_dim ({c.rope_head_dim}) must be even and smaller than head_dim ({c.head_dim})")
    need(c.index_head_dim >= c.rope_head_dim,
         f"index_head_dim ({c.index_head_dim}) must be at least rope_head_dim ({c.rope_head_dim})")
    need(c.num_experts_per_tok <= c.n_routed_experts,
         f"num_experts_per_tok ({c.num_experts_per_tok}) exceeds n_routed_experts ({c.n_routed_experts})")
    need(0 <= c.num_hash_layers <= c.num_hidden_layers,
         f"num_hash_layers ({c.num_hash_layers}) must be between 0 and num_hidden_layers ({c.num_hidden_layers})")
    need(c.n_shared_experts in (0, 1), f"n_shared_experts must be 0 or 1, got {c.n_shared_experts}")
    need(c.expert_dtype in (None, "fp4", "fp8", "bf16"),
         f"expert_dtype must be 'fp4', 'fp8' or null, got {c.expert_dtype!r}")
    need(c.dtype in ("bfloat16", "float32"), f"dtype must be 'bfloat16' or 'float32', got {c.dtype!r}")
    if c.simulate_fp8_kv:
        need(c.nope_head_dim % 64 == 0, f"simulate_fp8_kv needs head_dim - rope_head_dim divisible by 64, "
             f"got {c.nope_head_dim}")
    if c.simulate_fp4_indexer:
        need(c.index_head_dim % 32 == 0 and (c.index_head_dim & (c.index_head_dim - 1)) == 0,
             f"simulate_fp4_indexer needs index_head_dim a power of two divisible by 32, got {c.index_head_dim}")
    if c.simulate_fp8_activations:
        dims = {"hidden_size": c.hidden_size, "q_lora_rank": c.q_lora_rank,
                "moe_intermediate_size": c.moe_intermediate_size, "o_groups·o_lora_rank": c.o_groups * c.o_lora_rank}
        bad = {k: v for k, v in dims.items() if v % 128}
        need(not bad, f"simulate_fp8_activations quantizes FP8-linear inputs in blocks of 128; {bad} are not "
             f"multiples of 128")
    if c.yarn is not None:
        need(c.yarn.factor >= 1 and c.yarn.original_max_position_embeddings > 0,
             f"rope_scaling needs factor >= 1 and original_max_position_embeddings > 0, got {c.yarn}")
    need(math.isfinite(c.rms_norm_eps) and c.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {c.rms_norm_eps}")


def load_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """Read a `config.json` (a file, or a directory holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    try:
        return config_from_dict(raw, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_config(config: ModelConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(config.to_json_dict(), f, indent=2)
        f.write("\n")
