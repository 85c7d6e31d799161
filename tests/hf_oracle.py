"""HF transformers 5.23 `DeepseekV4ForCausalLM` as the fp32 CPU numerical oracle (ARCHITECTURE §14).

Test-support module, not a test. Everything runs on CPU in fp32 with torch; results come back as numpy.

    cfg   = tiny_config()                                  # ARCHITECTURE §1.4 cross-check config
    model = random_hf_model(cfg, seed=0)                   # fp32, eval, every parameter/buffer re-drawn
    full  = hf_logits(model, [tokens])[0]                  # [S, V] all-position logits, no cache
    pre, dec = hf_prefill_then_decode(model, tokens, 300, 6)   # dec[i] == full[300 + i]
    chunk = hf_chunked(model, tokens, [100, 37, 1, 168])   # == full
    save_hf(model, dir)                                    # HF's own save_pretrained (its naming, see below)
    save_official(model, dir, cfg, quantize=True)          # official naming (ARCHITECTURE §13), FP8 / packed FP4
    again = load_official(dir)                             # from_pretrained; logits equal to `model`'s

Notes (findings, transformers 5.23.0):
* `save_pretrained` does NOT write official names: it reverts the conversion mapping only partly and keeps the
  `model.` prefix (`model.layers.0.attn.wq_a.weight`, `model.embed_tokens.weight`, `head.weight`,
  `model.layers.0.attn.norm.weight` for the attention kv_norm, ...). Use `save_official` for the ARCHITECTURE §13 layout.
* HF's FP8 dequantizer derives the block size from the scale grid (rows // scale_rows). That equals the official
  128x128 block only when every dim is a multiple of 128 or at most 128. For other dims (tiny configs: `wo_a` has
  H*d/G = 192 columns) HF would use the wrong block, so `fp8_quantize(..., hf_compatible=True)` (the default here)
  makes the scales of such an axis uniform; the file is still a valid official 128x128 encoding.
* Loading FP8/FP4 checkpoints goes through the FP8 quantizer, which insists on `accelerate` being importable
  although nothing of it is used on the CPU dequantize path; `load_official` works around that (see there), and
  upcasts the bf16 tensors HF leaves in bf16 despite `dtype=torch.float32`.
* Importing this module sets torch to 1 intra-op thread (HF_ORACLE_TORCH_THREADS overrides).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from typing import Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4jax.config import ModelConfig, YarnScaling

import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4

assert transformers.__version__ == "5.23.0", f"the oracle is pinned to transformers 5.23.0, got {transformers.__version__}"

# The oracle's models are tiny: torch's intra-op threads buy nothing, and on the shared 2-core CPU any competing
# process makes 2 OpenMP threads spin (a 300-token forward goes from 0.05 s to 0.1-2.5 s). Override with
# HF_ORACLE_TORCH_THREADS=n.
torch.set_num_threads(int(os.environ.get("HF_ORACLE_TORCH_THREADS", "1")))

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes by 3-bit code; bit 3 is the sign
_E2M1_LUT = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# 1. Config
# ------------------------------------------------------------------------------------------------------------------

def tiny_config(**overrides) -> ModelConfig:
    """ARCHITECTURE §1.4 "Our verified cross-check config" (fp32 numerics, quant sims off)."""
    fields = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, compress_ratios=(0, 4, 128, 4, 0), num_hash_layers=1,
        num_attention_heads=4, head_dim=96, rope_head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16,
        sliding_window=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        routed_scaling_factor=1.5, swiglu_limit=10.0, index_n_heads=16, index_head_dim=32, index_topk=4,
        hc_mult=4, hc_sinkhorn_iters=20,
        yarn=YarnScaling(factor=4.0, original_max_position_embeddings=32, beta_fast=32.0, beta_slow=1.0),
        dtype="float32",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


_QUANT_KEYS = ("quantization_config", "expert_dtype")


def hf_config_dict(cfg: ModelConfig, quantized: bool = False) -> dict:
    """`cfg.to_json_dict()` as handed to HF (quantization keys dropped unless `quantized`)."""
    d = cfg.to_json_dict()
    if not quantized:
        for k in _QUANT_KEYS:
            d.pop(k, None)
    return d


def hf_config(cfg: ModelConfig, quantized: bool = False) -> DeepseekV4Config:
    """A transformers `DeepseekV4Config` built from `cfg.to_json_dict()`, checked to mean what `cfg` means.

    HF folds the upstream keys (ARCHITECTURE §1.3): compress_ratios -> layer_types (MTP entry dropped),
    num_hash_layers -> mlp_layer_types, qk_rope_head_dim -> partial_rotary_factor, rope_scaling ->
    rope_parameters["compress"] (yarn, attention_factor forced to 1.0), expert_dtype -> quantization_config.
    """
    d = hf_config_dict(cfg, quantized)
    with _quiet_transformers():  # tiny YaRN configs trigger a harmless "factor does not match" warning
        hcfg = DeepseekV4Config(**d)
    check_hf_config(cfg, hcfg, quantized)
    return hcfg


def check_hf_config(cfg: ModelConfig, hcfg: DeepseekV4Config, quantized: bool = False) -> None:
    """Raise AssertionError where HF's interpretation of `cfg` differs from ARCHITECTURE §1/ARCHITECTURE §6."""
    L = cfg.num_hidden_layers

    def eq(name, got, want):
        assert got == want, f"HF config {name}: got {got!r}, expected {want!r}"

    eq("layer_types", list(hcfg.layer_types), [cfg.layer_type(i) for i in range(L)])
    eq("mlp_layer_types", list(hcfg.mlp_layer_types),
       ["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(L)])
    eq("compress_rates", dict(hcfg.compress_rates),
       {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    eq("qk_rope_head_dim", hcfg.qk_rope_head_dim, cfg.rope_head_dim)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
                  "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                  "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "routed_scaling_factor", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps",
                  "rope_theta", "compress_rope_theta"):
        eq(field, getattr(hcfg, field), getattr(cfg, field))
    eq("num_key_value_heads", hcfg.num_key_value_heads, 1)
    eq("num_local_experts", hcfg.num_local_experts, cfg.n_routed_experts)
    eq("intermediate_size (shared expert width)", hcfg.intermediate_size, cfg.moe_intermediate_size)
    eq("scoring_func", hcfg.scoring_func, "sqrtsoftplus")
    eq("norm_topk_prob", hcfg.norm_topk_prob, True)
    eq("tie_word_embeddings", hcfg.tie_word_embeddings, False)
    eq("num_nextn_predict_layers", hcfg.num_nextn_predict_layers, cfg.num_mtp_layers)

    main, comp = hcfg.rope_parameters["main"], hcfg.rope_parameters["compress"]
    eq("rope main type", main["rope_type"], "default")
    eq("rope main theta", main["rope_theta"], cfg.rope_theta)
    eq("rope compress theta", comp["rope_theta"], cfg.compress_rope_theta)
    if cfg.yarn is None:
        eq("rope compress type", comp["rope_type"], "default")
    else:
        eq("rope compress type", comp["rope_type"], "yarn")
        eq("rope compress attention_factor", comp.get("attention_factor"), 1.0)
        for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
            eq(f"rope compress {k}", comp[k], getattr(cfg.yarn, k))
    # inv_freq tables actually built by HF vs ARCHITECTURE §6.2
    rot = hf_v4.DeepseekV4RotaryEmbedding(hcfg)
    for label, theta, yarn in (("main", cfg.rope_theta, None), ("compress", cfg.compress_rope_theta, cfg.yarn)):
        got = getattr(rot, f"{label}_inv_freq").double().numpy()
        want = reference_inv_freq(cfg.rope_head_dim, theta, yarn)
        err = float(np.max(np.abs(got - want) / want))
        assert got.shape == want.shape and err < 1e-6, f"HF {label} inv_freq differs from ARCHITECTURE §6.2 (max rel err {err})"
        eq(f"{label} attention_scaling", getattr(rot, f"{label}_attention_scaling"), 1.0)

    q = getattr(hcfg, "quantization_config", None)
    if quantized and cfg.weight_block_size is not None:
        assert isinstance(q, dict), f"HF dropped quantization_config: {q!r}"
        eq("quantization_config.weight_block_size", list(q["weight_block_size"]), list(cfg.weight_block_size))
        eq("quantization_config.scale_fmt", q.get("scale_fmt"), "ue8m0")
        if cfg.expert_dtype is not None:
            eq("quantization_config.expert_dtype", q.get("expert_dtype"), cfg.expert_dtype)
    elif not quantized:
        assert q is None, f"unexpected quantization_config {q!r}"


def reference_inv_freq(rope_dim: int, theta: float, yarn: YarnScaling | None) -> np.ndarray:
    """ARCHITECTURE §6.2 frequencies (float64): plain RoPE, or YaRN without mscale."""
    i = np.arange(rope_dim // 2, dtype=np.float64)
    base = theta ** (-2.0 * i / rope_dim)
    if yarn is None:
        return base

    def corr(n):
        return rope_dim * math.log(yarn.original_max_position_embeddings / (n * 2 * math.pi)) / (2 * math.log(theta))

    lo = max(math.floor(corr(yarn.beta_fast)), 0)
    hi = min(math.ceil(corr(yarn.beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((i - lo) / (hi - lo), 0.0, 1.0)
    smooth = 1.0 - ramp
    return base / yarn.factor * (1.0 - smooth) + base * smooth


# ------------------------------------------------------------------------------------------------------------------
# 2. Random model
# ------------------------------------------------------------------------------------------------------------------

def random_hf_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV4ForCausalLM:
    """fp32, eval-mode HF model with every parameter and persistent buffer re-drawn from `seed`.

    Scales (activations stay O(1) through the layers): linear weights N(0, 1/fan_in), embedding N(0, 1),
    RMSNorm weights 1 + 0.1 N, hc fn N(0, (0.5^2)/(n*D)), hc base 0.5 N, hc scale 1 + 0.25 N, attention sinks N(0, 1),
    compressor / indexer ape (position_bias) 0.5 N, gate bias (e_score_correction_bias) 0.1 N,
    tid2eid rows = k distinct experts (ARCHITECTURE §9 last note).
    """
    hcfg = hf_config(cfg)
    with _quiet_transformers():
        model = DeepseekV4ForCausalLM(hcfg)
    model = model.to(torch.float32).eval()
    model.config.dtype = torch.float32
    randomize_(model, seed)
    return model


def _draw(name: str, shape: Sequence[int], g: torch.Generator) -> torch.Tensor:
    """Random value of the parameter called `name` (HF naming), see `random_hf_model`."""
    def n(std, mean=0.0):
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).float() * std + mean

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("embed_tokens.weight"):
        return n(1.0)
    if re.search(r"(norm|layernorm)\.weight$", name):
        return n(0.1, 1.0)
    if leaf == "sinks":
        return n(1.0)
    if leaf == "position_bias":
        return n(0.5)
    if leaf in ("fn", "hc_fn"):
        return n(0.5 / math.sqrt(shape[-1]))
    if leaf in ("base", "hc_base"):
        return n(0.5)
    if leaf in ("scale", "hc_scale"):
        return n(0.25, 1.0)
    if leaf == "e_score_correction_bias":
        return n(0.1)
    if leaf in ("gate_up_proj", "down_proj", "weight") and len(shape) >= 2:
        return n(1.0 / math.sqrt(shape[-1]))  # fan_in = last dim for [out, in] and [E, out, in]
    raise ValueError(f"no randomization rule for {name} {tuple(shape)}")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw all parameters and persistent buffers of an HF DeepSeek-V4 module (or the whole model) in place."""
    g = torch.Generator().manual_seed(seed)
    non_persistent = set()
    for mod_name, mod in module.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{mod_name}.{b}" if mod_name else b)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        p.copy_(_draw(name, p.shape, g))
    for name, b in sorted(module.named_buffers(), key=lambda kv: kv[0]):
        if name in non_persistent:
            continue  # rope tables
        if name.endswith("tid2eid"):
            vocab, k = b.shape
            n_exp = _num_experts(module)
            rows = torch.argsort(torch.rand(vocab, n_exp, generator=g), dim=-1)[:, :k]
            b.copy_(rows.to(b.dtype))
        else:
            b.copy_(_draw(name, b.shape, g).to(b.dtype))


def _num_experts(module: torch.nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, hf_v4.DeepseekV4Experts):
            return m.num_experts
    raise ValueError("no experts module")


# ------------------------------------------------------------------------------------------------------------------
# 3./4./5. Saving with HF, forward passes
# ------------------------------------------------------------------------------------------------------------------

def save_hf(model: DeepseekV4ForCausalLM, directory: str | os.PathLike,
            original_format: bool = True) -> dict[str, tuple[tuple[int, ...], str]]:
    """`model.save_pretrained(directory)` (safetensors). Returns {tensor name in the file: (shape, dtype)}.

    original_format=True (HF's default `save_original_format`): HF reverts its conversion mapping, which gives a
    HYBRID naming, neither HF-internal nor official: `model.` prefix kept, `head.weight`, `model.embed_tokens.weight`,
    `model.norm.weight`, `model.hc_head.hc_{fn,base,scale}`, `model.layers.L.attn.wq_a.weight`, ...,
    `model.layers.L.attn.norm.weight` (= attention kv_norm; official is `attn.kv_norm.weight`), per-expert
    `model.layers.L.ffn.experts.E.w{1,2,3}.weight`, `model.layers.L.ffn.gate.bias`, tid2eid int64.
    original_format=False: HF-internal names (`model.layers.L.self_attn.q_a_proj.weight`, stacked
    `mlp.experts.gate_up_proj` [E, 2I, D] (gate rows first) and `mlp.experts.down_proj` [E, D, I]).
    `from_pretrained` reads both back exactly.
    """
    os.makedirs(directory, exist_ok=True)
    with _quiet_transformers():
        model.save_pretrained(directory, safe_serialization=True, save_original_format=original_format)
    return safetensors_index(directory)


def safetensors_index(directory: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for fname in sorted(os.listdir(directory)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(directory, fname), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _ids(tokens: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(tokens), dtype=torch.long)[None]


@torch.no_grad()
def hf_logits(model: DeepseekV4ForCausalLM, sequences: Iterable[Sequence[int]]) -> list[np.ndarray]:
    """All-position fp32 logits [S_i, V] for each sequence, each run alone (batch 1, no padding, no cache)."""
    return [model(input_ids=_ids(s), use_cache=False).logits[0].float().numpy() for s in sequences]


@torch.no_grad()
def hf_prefill_then_decode(model: DeepseekV4ForCausalLM, tokens: Sequence[int], prefill_len: int,
                           steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill `tokens[:prefill_len]` into a fresh cache, then feed `tokens[prefill_len + i]` one at a time.

    Returns (prefill logits [prefill_len, V], decode logits [steps, V]); decode row i is the output after feeding
    token prefill_len + i, i.e. it corresponds to row prefill_len + i of the full-sequence logits.
    """
    assert 0 < prefill_len and prefill_len + steps <= len(tokens), (prefill_len, steps, len(tokens))
    out = model(input_ids=_ids(tokens[:prefill_len]), use_cache=True)
    cache, pre = out.past_key_values, out.logits[0].float().numpy()
    dec = []
    for i in range(steps):
        out = model(input_ids=_ids([tokens[prefill_len + i]]), past_key_values=cache, use_cache=True)
        dec.append(out.logits[0, -1].float().numpy())
    return pre, np.stack(dec) if dec else np.zeros((0, pre.shape[-1]), np.float32)


@torch.no_grad()
def hf_chunked(model: DeepseekV4ForCausalLM, tokens: Sequence[int], chunk_sizes: Sequence[int]) -> np.ndarray:
    """Feed `tokens` through one cache in chunks of the given sizes (must sum to len(tokens)); logits [S, V]."""
    assert sum(chunk_sizes) == len(tokens) and all(c > 0 for c in chunk_sizes), (chunk_sizes, len(tokens))
    cache, outs, start = None, [], 0
    for c in chunk_sizes:
        out = model(input_ids=_ids(tokens[start:start + c]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        outs.append(out.logits[0].float().numpy())
        start += c
    return np.concatenate(outs, axis=0)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------------------------------
# 6. FP8 / FP4 encoders (ARCHITECTURE §10.1–10.2), torch
# ------------------------------------------------------------------------------------------------------------------

def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(x)))


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Exact power-of-two fp32 scales -> float8_e8m0fnu (byte = log2(scale) + 127)."""
    e = torch.log2(scale)
    assert torch.all(e == torch.round(e)) and torch.all(e >= -127) and torch.all(e <= 127), "scale not a power of 2"
    return scale.to(torch.float8_e8m0fnu)


def fp8_quantize(w: torch.Tensor, block: Sequence[int] = (128, 128),
                 hf_compatible: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float8_e8m0fnu scales [ceil(out/bm), ceil(in/bn)]).

    Scale of a block = 2^ceil(log2(max(amax, 1e-4) / 448)) (UE8M0); values = RNE(clamp(w / s, ±448)).
    hf_compatible: for an axis whose length is > block and not a multiple of it, use one scale along that axis
    (per block row / column), because HF derives the block size as len // grid and would misplace partial blocks.
    """
    assert w.ndim == 2, w.shape
    bm, bn = block
    rows, cols = w.shape
    R, C = -(-rows // bm), -(-cols // bn)
    wf = w.detach().float()
    padded = torch.zeros(R * bm, C * bn)
    padded[:rows, :cols] = wf
    amax = padded.abs().reshape(R, bm, C, bn).amax(dim=(1, 3))
    if hf_compatible:
        if rows > bm and rows % bm:
            amax = amax.amax(dim=0, keepdim=True).expand(R, C)
        if cols > bn and cols % bn:
            amax = amax.amax(dim=1, keepdim=True).expand(R, C)
    scale = _pow2_ceil(amax.clamp(min=1e-4) / FP8_MAX)
    s_full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    q = (wf / s_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, _e8m0(scale)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: Sequence[int] = (128, 128)) -> torch.Tensor:
    """Official FP8 dequantization (exact): W = e4m3 * 2^(e8m0 - 127), blocks of `block` (partial last blocks)."""
    bm, bn = block
    rows, cols = q.shape
    s = scale.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
    return q.float() * s


def _round_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """|x| <= 6 -> 4-bit E2M1 codes (bit 3 sign), round to nearest, ties to even code."""
    grid = torch.tensor(FP4_VALUES, dtype=torch.float32)
    a = x.abs()
    dist = (a[..., None] - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    ties = dist == best
    even = ties & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.float().argmax(-1), ties.float().argmax(-1))
    sign = (x < 0) & (code > 0)
    return (code | (sign.long() << 3)).to(torch.uint8)


def fp4_quantize(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in/2] two E2M1 codes per byte (even element = low nibble),
    float8_e8m0fnu scales [out, in/32]); s = 2^ceil(log2(max(amax, 6*2^-126) / 6))."""
    rows, cols = w.shape
    assert cols % block == 0 and cols % 2 == 0, f"FP4 needs in_features divisible by {block}, got {cols}"
    wf = w.detach().float().reshape(rows, cols // block, block)
    amax = wf.abs().amax(-1)
    scale = _pow2_ceil(amax.clamp(min=FP4_MAX * 2.0 ** -126) / FP4_MAX)
    codes = _round_e2m1_codes((wf / scale[..., None]).clamp(-FP4_MAX, FP4_MAX)).reshape(rows, cols)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, _e8m0(scale)


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    u = packed.view(torch.uint8).long()
    vals = torch.stack([_E2M1_LUT[u & 0xF], _E2M1_LUT[u >> 4]], dim=-1).reshape(packed.shape[0], -1)
    return vals * scale.float().repeat_interleave(block, 1)


def fp8_qdq(w: torch.Tensor, block=(128, 128), hf_compatible: bool = True) -> torch.Tensor:
    return fp8_dequantize(*fp8_quantize(w, block, hf_compatible), block)


def fp4_qdq(w: torch.Tensor) -> torch.Tensor:
    return fp4_dequantize(*fp4_quantize(w))


# ------------------------------------------------------------------------------------------------------------------
# 6. Official naming (ARCHITECTURE §13)
# ------------------------------------------------------------------------------------------------------------------

# HF module path (below `model.layers.L.`) -> official (below `layers.L.`); order matters (longest first).
_LAYER_RENAMES = [
    ("self_attn.compressor.indexer.scorer.weights_proj.", "attn.indexer.weights_proj."),
    ("self_attn.compressor.indexer.q_b_proj.", "attn.indexer.wq_b."),
    ("self_attn.compressor.indexer.kv_proj.", "attn.indexer.compressor.wkv."),
    ("self_attn.compressor.indexer.gate_proj.", "attn.indexer.compressor.wgate."),
    ("self_attn.compressor.indexer.kv_norm.", "attn.indexer.compressor.norm."),
    ("self_attn.compressor.indexer.position_bias", "attn.indexer.compressor.ape"),
    ("self_attn.compressor.kv_proj.", "attn.compressor.wkv."),
    ("self_attn.compressor.gate_proj.", "attn.compressor.wgate."),
    ("self_attn.compressor.kv_norm.", "attn.compressor.norm."),
    ("self_attn.compressor.position_bias", "attn.compressor.ape"),
    ("self_attn.sinks", "attn.attn_sink"),
    ("self_attn.q_a_proj.", "attn.wq_a."),
    ("self_attn.q_a_norm.", "attn.q_norm."),
    ("self_attn.q_b_proj.", "attn.wq_b."),
    ("self_attn.kv_proj.", "attn.wkv."),
    ("self_attn.kv_norm.", "attn.kv_norm."),
    ("self_attn.o_a_proj.", "attn.wo_a."),
    ("self_attn.o_b_proj.", "attn.wo_b."),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.gate.tid2eid", "ffn.gate.tid2eid"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.shared_experts.gate_proj.", "ffn.shared_experts.w1."),
    ("mlp.shared_experts.up_proj.", "ffn.shared_experts.w3."),
    ("mlp.shared_experts.down_proj.", "ffn.shared_experts.w2."),
    ("input_layernorm.", "attn_norm."),
    ("post_attention_layernorm.", "ffn_norm."),
    ("attn_hc.fn", "hc_attn_fn"), ("attn_hc.base", "hc_attn_base"), ("attn_hc.scale", "hc_attn_scale"),
    ("ffn_hc.fn", "hc_ffn_fn"), ("ffn_hc.base", "hc_ffn_base"), ("ffn_hc.scale", "hc_ffn_scale"),
]
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
# FP8 linears of ARCHITECTURE §10.1 (official suffixes, relative to a block prefix)
FP8_LINEARS = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
               "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight",
               "ffn.shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
# fp32 class of ARCHITECTURE §10.1 (kept fp32 even in a bf16 checkpoint)
_FP32_CLASS = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")


def _layer_official(rest: str) -> str:
    for src, dst in _LAYER_RENAMES:
        if rest.startswith(src):
            return dst + rest[len(src):]
    raise KeyError(f"no official name for layer tensor {rest!r}")


def official_state_dict(model_or_sd, prefix_map=None) -> dict[str, torch.Tensor]:
    """HF state dict (or model) -> official names with per-expert w1/w2/w3, unquantized fp32 tensors.

    `prefix_map` maps HF layer prefixes `model.layers.L.` to official ones (default `layers.L.`).
    """
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    out = {}
    for name, t in sd.items():
        if "rotary_emb" in name:
            continue
        t = t.detach()
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = re.match(r"^(model\.layers\.\d+\.)(.*)$", name)
        if not m:
            raise KeyError(f"unexpected HF tensor {name}")
        pre = (prefix_map or {}).get(m.group(1), m.group(1)[len("model."):])
        rest = m.group(2)
        if rest == "mlp.experts.gate_up_proj":
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{pre}ffn.experts.{e}.w1.weight"] = t[e, :inter]
                out[f"{pre}ffn.experts.{e}.w3.weight"] = t[e, inter:]
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"{pre}ffn.experts.{e}.w2.weight"] = t[e]
        else:
            out[pre + _layer_official(rest)] = t
    return out


def _is_fp8_linear(name: str) -> bool:
    return any(name.endswith("." + s) or name == s for s in FP8_LINEARS)


def _is_routed_expert(name: str) -> bool:
    return re.search(r"\.ffn\.experts\.\d+\.w[123]\.weight$", name) is not None


def _bf16_class(name: str) -> bool:
    return (not _FP32_CLASS.search(name)) and not name.endswith("tid2eid")


def _expert_format(cfg: ModelConfig) -> str | None:
    """On-disk format of routed experts in a quantized checkpoint: "fp4", "fp8" or None (plain)."""
    return cfg.expert_dtype if cfg.expert_dtype in ("fp4", "fp8") else None


def _snap(name: str, t: torch.Tensor, quantize: bool, bf16: bool, block, expert_fmt) -> torch.Tensor:
    """fp32 value that the checkpoint tensor `name` (official naming) decodes to."""
    t = t.detach().float()
    if quantize and _is_fp8_linear(name):
        return fp8_qdq(t, block)
    if quantize and expert_fmt and _is_routed_expert(name):
        return fp4_qdq(t) if expert_fmt == "fp4" else fp8_qdq(t, block)
    if bf16 and _bf16_class(name):
        return t.to(torch.bfloat16).float()
    return t


@torch.no_grad()
def quantize_weights_(model: DeepseekV4ForCausalLM, cfg: ModelConfig, quantize: bool = True,
                      bf16: bool = False) -> None:
    """Replace the weights in place by what an official checkpoint written by `save_official` decodes to:
    quantize -> FP8 linears (ARCHITECTURE §10.1) by fp8_qdq (128x128 UE8M0 blocks) and routed experts by fp4_qdq (1x32) /
    fp8_qdq (cfg.expert_dtype); bf16 -> every other bf16-class tensor (ARCHITECTURE §10.1) rounded to bf16. Idempotent."""
    block, expert_fmt = tuple(cfg.weight_block_size or (128, 128)), _expert_format(cfg)
    for name, p in model.named_parameters():
        if "mlp.experts." in name:  # stacked [E, out, in]; gate_up_proj rows = [w1; w3], quantized separately
            fake = "layers.0.ffn.experts.0.w1.weight"
            halves = 2 if name.endswith("gate_up_proj") else 1
            rows = p.shape[1] // halves
            for e in range(p.shape[0]):
                for h in range(halves):
                    part = p[e, h * rows:(h + 1) * rows]
                    part.copy_(_snap(fake, part, quantize, bf16, block, expert_fmt))
            continue
        (oname,) = official_state_dict({name: p}).keys()
        p.copy_(_snap(oname, p, quantize, bf16, block, expert_fmt))


def _encode(sd: dict[str, torch.Tensor], quantize: bool, bf16: bool, block, expert_fmt) -> dict:
    out = {}
    for name, t in sd.items():
        t = t.detach().cpu().contiguous()
        if name.endswith("tid2eid"):
            out[name] = t.to(torch.int32)
        elif quantize and (_is_fp8_linear(name) or (expert_fmt and _is_routed_expert(name))):
            q, sc = fp4_quantize(t) if (expert_fmt == "fp4" and _is_routed_expert(name)) else fp8_quantize(t, block)
            out[name], out[name[:-len("weight")] + "scale"] = q, sc
        elif bf16 and _bf16_class(name):
            out[name] = t.to(torch.bfloat16)
        else:
            out[name] = t.float()
    return {k: v.contiguous() for k, v in out.items()}


def random_mtp_official(model: DeepseekV4ForCausalLM, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 MTP weights (official `mtp.0.*` names, ARCHITECTURE §12.1); HF has no MTP module, so these only exercise
    loaders. The block is sliding-only with a score-routed MoE (gate.bias), same randomization rules."""
    hcfg = copy.deepcopy(model.config)
    L = hcfg.num_hidden_layers
    hcfg.num_hidden_layers = L + 1
    hcfg.layer_types = list(hcfg.layer_types) + ["sliding_attention"]
    hcfg.mlp_layer_types = list(hcfg.mlp_layer_types) + ["moe"]
    D = hcfg.hidden_size
    holder = torch.nn.Module()
    holder.layer = hf_v4.DeepseekV4DecoderLayer(hcfg, L)
    holder.e_proj = torch.nn.Linear(D, D, bias=False)
    holder.h_proj = torch.nn.Linear(D, D, bias=False)
    holder.enorm = hf_v4.DeepseekV4RMSNorm(D)
    holder.hnorm = hf_v4.DeepseekV4RMSNorm(D)
    holder.norm = hf_v4.DeepseekV4RMSNorm(D)
    holder.hc_head = hf_v4.DeepseekV4HyperHead(hcfg)
    holder.float()
    randomize_(holder, seed)
    sd = holder.state_dict()
    layer = {f"model.layers.{L}.{k[len('layer.'):]}": v for k, v in sd.items() if k.startswith("layer.")}
    out = official_state_dict(layer, prefix_map={f"model.layers.{L}.": "mtp.0."})
    heads = {"hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
    for k, v in sd.items():
        if not k.startswith("layer."):
            out["mtp.0." + heads.get(k, k)] = v
    return out


def save_official(model: DeepseekV4ForCausalLM, directory: str | os.PathLike, cfg: ModelConfig, quantize: bool,
                  dtype: torch.dtype = torch.float32, mtp_seed: int | None = 1234) -> dict[str, torch.Tensor]:
    """Write `model` in the official checkpoint layout (ARCHITECTURE §13) + an upstream config.json.

    The model is first snapped IN PLACE (`quantize_weights_`) so that it equals what the file decodes to
    (a no-op for quantize=False, dtype=float32).
    quantize=True: FP8 linears of ARCHITECTURE §10.1 as float8_e4m3fn + `<name>.scale` float8_e8m0fnu (128x128 blocks);
    routed experts as packed FP4 (int8 [out, in/2], even element in the low nibble) + e8m0 [out, in/32] scales for
    cfg.expert_dtype "fp4", 128x128 FP8 for "fp8", plain for None/"bf16"; config.json with quantization_config
    (+ expert_dtype). quantize=False: plain tensors, no quantization keys, torch_dtype = dtype.
    dtype: storage of the bf16-class tensors of ARCHITECTURE §10.1 (float32 or bfloat16); hc_*, attn_sink, ape, gate.bias stay
    fp32; tid2eid is int32.
    mtp_seed: also write random `mtp.0.*` weights (`random_mtp_official`) when cfg has an MTP layer (None: skip).
    Returns the written {name: tensor}.
    """
    assert dtype in (torch.float32, torch.bfloat16), dtype
    block, expert_fmt, bf16 = tuple(cfg.weight_block_size or (128, 128)), _expert_format(cfg), dtype == torch.bfloat16
    if quantize or bf16:
        quantize_weights_(model, cfg, quantize=quantize, bf16=bf16)
    sd = official_state_dict(model)
    if mtp_seed is not None and cfg.num_mtp_layers:
        mtp = random_mtp_official(model, mtp_seed)
        sd.update({k: _snap(k, v, quantize, bf16, block, expert_fmt) for k, v in mtp.items()})
    tensors = _encode(sd, quantize, bf16, block, expert_fmt)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    conf = cfg.to_json_dict()
    if not quantize:
        for k in _QUANT_KEYS:
            conf.pop(k, None)
        conf["torch_dtype"] = "bfloat16" if bf16 else "float32"
    else:
        conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                                       "activation_scheme": "dynamic", "scale_fmt": "ue8m0"}
        conf.pop("expert_dtype", None)
        if expert_fmt:
            conf["expert_dtype"] = expert_fmt
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    return tensors


def load_official(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> DeepseekV4ForCausalLM:
    """`DeepseekV4ForCausalLM.from_pretrained(directory, dtype=dtype)` on CPU, eval mode; asserts nothing is missing.

    For a quantized directory HF's FP8 quantizer (pre-quantized, no GPU) switches to `dequantize=True` itself and
    dequantizes FP8 (128x128) and packed-FP4 (1x32) weights to `dtype`; `mtp.*` tensors are dropped
    (`_keys_to_ignore_on_load_unexpected`). The quantizer's environment check requires `accelerate` although the
    dequantize path never uses it; when it is not installed we patch that check for the duration of the call.
    """
    with _accelerate_check_bypass(), _quiet_transformers():
        model, info = DeepseekV4ForCausalLM.from_pretrained(directory, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys", "error_msgs")}
    assert not problems, f"from_pretrained({directory}) did not load cleanly: {problems}"
    if dtype == torch.float32:
        # With a pre-quantized checkpoint HF keeps every NON-quantized tensor in its file dtype (bf16 stays bf16,
        # even for `_keep_in_fp32_modules_strict` norms) although dtype=float32 was asked for; the forward then fails
        # with a bf16/fp32 matmul mismatch. Upcasting afterwards is exact.
        model = model.to(torch.float32)
    return model.eval()


@contextlib.contextmanager
def _accelerate_check_bypass():
    from transformers.quantizers import quantizer_finegrained_fp8 as qmod
    orig = qmod.is_accelerate_available
    if orig():
        yield
        return
    qmod.is_accelerate_available = lambda *a, **k: True
    try:
        yield
    finally:
        qmod.is_accelerate_available = orig


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def random_tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=n).tolist()
