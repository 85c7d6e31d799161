"""Checkpoint tensor names (ARCHITECTURE §13) and where each lands in the model's parameter tree.

Our parameter paths follow the official names, with four differences handled here:
- main layers live in layer groups (ARCHITECTURE §3.1): `groups.G.blocks.J.…` ⇔ `layers.L.…`, stacked on a
  leading axis over the group's repetitions when it has several (`checkpoint_layout` / `model_layout`);
- hyper-connection params are grouped: `layers.L.hc_attn.fn` ⇔ `layers.L.hc_attn_fn` (also hc_ffn, hc_head);
- the compressor projections are plain params: `…compressor.wkv` ⇔ `…compressor.wkv.weight`, and `head` ⇔ `head.weight`;
- routed experts are stacked: `ffn.experts.w1` [E, I, D] ⇔ `ffn.experts.{e}.w1.weight` for every e.
HF transformers names (`model.layers.L.self_attn.q_a_proj.weight`, ...) are translated to official ones first.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_HC_PARAM = re.compile(r"^(?P<prefix>(?:mtp\.\d+\.|layers\.\d+\.)?)hc_(?P<which>attn|ffn|head)\.(?P<part>fn|base|scale)$")
_HC_NAME = re.compile(r"^(?P<prefix>(?:mtp\.\d+\.|layers\.\d+\.)?)hc_(?P<which>attn|ffn|head)_(?P<part>fn|base|scale)$")
_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<expert>\d+)\.(?P<proj>w[123])\.weight$")


def path_key(path: tuple) -> str:
    """An NNX state path, e.g. ('layers', 0, 'attn', 'wq_a', 'weight') -> 'layers.0.attn.wq_a.weight'."""
    return ".".join(str(k) for k in path)


def flat_values(state) -> dict[str, Any]:
    """An NNX state -> {parameter path: value}."""
    from flax import nnx

    return {path_key(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def filled(abstract, values: dict[str, Any]):
    """An (abstract) NNX state with every variable's value taken from `values` by parameter path."""
    from flax import nnx

    flat = nnx.to_flat_state(abstract)
    return nnx.from_flat_state([(path, var.replace(values[path_key(path)])) for path, var in flat])


def official_names(param_path: str, num_experts: int) -> list[tuple[str, int | None]]:
    """Checkpoint names that fill one parameter: [(name, expert index or None)]."""
    m = _HC_PARAM.match(param_path)
    if m:
        return [(f"{m['prefix']}hc_{m['which']}_{m['part']}", None)]
    if param_path.endswith(".ffn.experts.w1") or param_path.endswith(".ffn.experts.w2") \
            or param_path.endswith(".ffn.experts.w3"):
        prefix, proj = param_path.rsplit(".", 1)
        return [(f"{prefix}.{e}.{proj}.weight", e) for e in range(num_experts)]
    if param_path.endswith((".compressor.wkv", ".compressor.wgate")) or param_path == "head":
        return [(param_path + ".weight", None)]
    return [(param_path, None)]


def param_target(name: str) -> tuple[str, int | None]:
    """Official checkpoint name -> (parameter path, expert index or None)."""
    m = _HC_NAME.match(name)
    if m:
        return f"{m['prefix']}hc_{m['which']}.{m['part']}", None
    m = _EXPERT_NAME.match(name)
    if m:
        return f"{m['prefix']}.{m['proj']}", int(m["expert"])
    if name.endswith((".compressor.wkv.weight", ".compressor.wgate.weight")) or name == "head.weight":
        return name[: -len(".weight")], None
    return name, None


# HF transformers 5.23 names -> official names (ARCHITECTURE §13, `conversion_mapping.py["deepseek_v4"]`).
_HF_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r) for p, r in [
        (r"^model\.embed_tokens\.", "embed."),
        (r"^lm_head\.", "head."),
        (r"^model\.norm\.", "norm."),
        (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
        (r"^model\.layers\.", "layers."),
        (r"\.input_layernorm\.", ".attn_norm."),
        (r"\.post_attention_layernorm\.", ".ffn_norm."),
        (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
        (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
        (r"\.self_attn\.", ".attn."),
        (r"\.mlp\.", ".ffn."),
        (r"\.attn\.sinks$", ".attn.attn_sink"),
        (r"\.attn\.norm\.", ".attn.kv_norm."),  # what save_pretrained writes for the attention's kv_norm
        (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
        (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
        (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
        (r"\.attn\.kv_proj\.", ".attn.wkv."),
        (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
        (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
        (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
        (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
        (r"\.compressor\.indexer\.", ".indexer.compressor."),
        (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
        (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
        (r"\.compressor\.kv_norm\.", ".compressor.norm."),
        (r"\.compressor\.position_bias$", ".compressor.ape"),
        (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
        (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
        (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
        (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
        (r"\.weight_scale_inv$", ".scale"),
    ]
]
# Stacked HF experts: gate_up_proj [E, 2I, D] = concat(w1_e, w3_e); down_proj [E, D, I] = w2_e.
HF_STACKED_EXPERTS = re.compile(r"^(?P<prefix>.*\.ffn\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def is_hf_naming(names) -> bool:
    return any(n.startswith("model.") or n.startswith("lm_head.") for n in names)


def hf_to_official(name: str) -> str:
    for pattern, replacement in _HF_RULES:
        name = pattern.sub(replacement, name)
    return name


_GROUP_PATH = re.compile(r"^groups\.(?P<group>\d+)\.blocks\.(?P<position>\d+)\.(?P<rest>.+)$")
_LAYER_PATH = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<rest>.+)$")


def checkpoint_layout(config, flat: dict[str, Any], take: Callable[[Any, int], Any]) -> dict[str, Any]:
    """Values by parameter path -> by checkpoint-layout path (`layers.L.…`); `take(value, r)` is repetition r of a
    stacked value (a slice, a shape, a sharding)."""
    groups = config.layer_groups()
    out = {}
    for path, value in flat.items():
        m = _GROUP_PATH.match(path)
        if m is None:
            out[path] = value
            continue
        group, position = groups[int(m["group"])], int(m["position"])
        if group.repeats == 1:
            out[f"layers.{group.layer(0, position)}.{m['rest']}"] = value
        else:
            for r in range(group.repeats):
                out[f"layers.{group.layer(r, position)}.{m['rest']}"] = take(value, r)
    return out


def model_layout(config, flat: dict[str, Any], stack: Callable[[str, list], Any]) -> dict[str, Any]:
    """The inverse of `checkpoint_layout`: `stack(path, values)` joins a stacked parameter's repetitions."""
    where = {group.layer(r, j): (g, j, r, group.repeats) for g, group in enumerate(config.layer_groups())
             for r in range(group.repeats) for j in range(group.period)}
    out, parts = {}, {}
    for path, value in flat.items():
        m = _LAYER_PATH.match(path)
        if m is None:
            out[path] = value
            continue
        g, j, r, repeats = where[int(m["layer"])]
        key = f"groups.{g}.blocks.{j}.{m['rest']}"
        if repeats == 1:
            out[key] = value
        else:
            parts.setdefault(key, {})[r] = value
    for key, values in parts.items():
        out[key] = stack(key, [values[r] for r in range(len(values))])
    return out
