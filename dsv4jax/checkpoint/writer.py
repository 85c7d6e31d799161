"""Write a model as an official-format checkpoint (ARCHITECTURE §13): config.json + safetensors.

With `quantize=True` the FP8 linears of ARCHITECTURE §10.1 are stored as e4m3 + 128×128 UE8M0 scales and routed experts as
packed FP4 + 1×32 scales, like the released checkpoints; otherwise every tensor keeps its dtype.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx

from dsv4jax import quant
from dsv4jax.checkpoint.names import checkpoint_layout, flat_values, official_names
from dsv4jax.checkpoint.safetensors_io import save_file
from dsv4jax.config import save_config

# ARCHITECTURE §10.1: the FP8 linears (everything else is bf16/fp32, the routed experts FP4).
FP8_LINEAR = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|e_proj|h_proj)\.weight$")
ROUTED_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
# ARCHITECTURE §10.1: these stay fp32 on disk; the rest of the unquantised tensors are bf16.
FP32_TENSOR = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")


def official_tensors(model: nnx.Module, quantize: bool) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    flat = {key: np.asarray(value) for key, value in flat_values(nnx.state(model, nnx.Not(nnx.Intermediate))).items()}
    for key, value in checkpoint_layout(model.config, flat, lambda stacked, r: stacked[r]).items():
        for name, expert in official_names(key, value.shape[0] if value.ndim else 0):
            tensor = value if expert is None else value[expert]
            if quantize and FP8_LINEAR.search(name):
                tensors[name], tensors[name[:-len("weight")] + "scale"] = quant.quantize_fp8(tensor)
            elif quantize and ROUTED_EXPERT.search(name):
                tensors[name], tensors[name[:-len("weight")] + "scale"] = quant.quantize_fp4(tensor)
            elif tensor.dtype.kind in "iu":
                tensors[name] = tensor.astype(np.int32)
            elif FP32_TENSOR.search(name) or not quantize:
                tensors[name] = tensor.astype(np.float32) if quantize else tensor
            else:
                tensors[name] = tensor.astype(ml_dtypes.bfloat16)
    return tensors


def save_checkpoint(model: nnx.Module, directory: str | os.PathLike, quantize: bool = False) -> None:
    """Write `model` to `directory` in official naming (one `model.safetensors`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if quantize:
        config = config.replace(weight_block_size=(128, 128), expert_dtype="fp4")
    else:
        config = config.replace(weight_block_size=None, expert_dtype=None)
    save_config(config, directory / "config.json")
    save_file(official_tensors(model, quantize), directory / "model.safetensors")
