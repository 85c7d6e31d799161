"""Streamed sharded loading (`load_sharded`) against the host path (`read_host_params` + `shard_host_params`):
bit for bit and with the same shardings, on 8 fake CPU devices, for official FP8/FP4 and bf16 checkpoints, HF naming
(FP8 linears with `weight_scale_inv`, stacked `gate_up_proj`/`down_proj` experts), and the host fallbacks (scales
whose products would be subnormal, NaN codes). Plus the on-device dequantisation against quant.py on every code.
"""

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsv4jax import quant
from dsv4jax.checkpoint.errors import CheckpointError
from dsv4jax.checkpoint.loader import dequantize_on_device, device_exact, read_host_params
from dsv4jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from dsv4jax.checkpoint.writer import save_checkpoint
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec
from dsv4jax.sharding.params import load_sharded, shard_host_params

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def _mesh(spec):
    config = parse_mesh_spec(spec)
    return config, make_mesh(config, jax.devices()[:config.size])


@pytest.fixture(scope="module")
def model():
    return DeepseekV4(load_config("configs/test-tiny.json", dtype="float32"), nnx.Rngs(3))


@pytest.fixture(scope="module")
def quantized(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp8-fp4")
    save_checkpoint(model, directory, quantize=True)
    return directory


def _tensors(directory):
    with SafetensorsFile(directory / "model.safetensors") as f:
        return {name: f.get(name) for name in f.keys()}


def _write(directory, tensors, config_from, split=False):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text((config_from / "config.json").read_text())
    if not split:
        save_file(tensors, directory / "model.safetensors")
        return directory
    # Two files, scales apart from some of their weights: the index path.
    import json

    names = sorted(tensors)
    weight_map = {n: f"model-{i % 2:05d}.safetensors" for i, n in enumerate(names)}
    for file in set(weight_map.values()):
        save_file({n: tensors[n] for n in names if weight_map[n] == file}, directory / file)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _hf_named(tensors):
    """Official names -> names in HF style (what `hf_to_official` maps back), experts stacked as gate_up/down."""
    out, experts = {}, {}
    for name, value in tensors.items():
        if name.startswith("mtp."):
            continue  # HF has no MTP module
        if ".ffn.experts." in name:
            prefix, e, proj, _ = name.rsplit(".", 3)
            experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = value
            continue
        hf = name.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.")
        hf = "model." + hf if hf.startswith("layers.") else hf
        hf = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
              "norm.weight": "model.norm.weight"}.get(hf, hf)
        if hf.startswith("hc_head_"):
            hf = "model.hc_head.hc_" + hf[len("hc_head_"):]
        if name.endswith(".scale") and name[:-len("scale")] + "weight" in tensors:
            hf = hf[:-len("scale")] + "weight_scale_inv"
        out[hf] = value
    for prefix, projs in experts.items():
        hf = "model." + prefix.replace(".ffn.", ".mlp.")
        n = len(projs["w1"])
        out[hf + ".gate_up_proj"] = np.stack([np.concatenate([projs["w1"][e], projs["w3"][e]]) for e in range(n)])
        out[hf + ".down_proj"] = np.stack([projs["w2"][e] for e in range(n)])
    return out


def _assert_same(directory, spec, dtype="bfloat16"):
    mesh, device_mesh = _mesh(spec)
    config, _, host = read_host_params(directory, dtype, progress=False)
    expected = shard_host_params(host, mesh, device_mesh)
    got_config, _, streamed = load_sharded(directory, mesh, device_mesh, dtype, progress=False, threads=2)
    assert got_config == config
    expected, streamed = dict(nnx.to_flat_state(expected)), dict(nnx.to_flat_state(streamed))
    assert expected.keys() == streamed.keys()
    for path, var in expected.items():
        a, b = var.get_value(), streamed[path].get_value()
        assert a.dtype == b.dtype and a.shape == b.shape and a.sharding == b.sharding, path
        np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(a).view(np.uint8), err_msg=str(path))


@pytest.mark.parametrize("spec", ["ep=8", "cp=2,tp=2,ep=2"])
def test_official_fp8_fp4(quantized, spec, monkeypatch):
    from dsv4jax.checkpoint.loader import Piece

    def no_host_dequantization(self, dtype):
        raise AssertionError(f"{self.name} was dequantised on the host")
    monkeypatch.setattr(Piece, "host_value", no_host_dequantization)  # every FP8/FP4 tensor on the devices
    _assert_same(quantized, spec)


def test_official_unquantized_fp32_two_files(model, quantized, tmp_path):
    save_checkpoint(model, tmp_path / "plain")
    directory = _write(tmp_path / "split", _tensors(tmp_path / "plain"), tmp_path / "plain", split=True)
    _assert_same(directory, "cp=2,tp=2,ep=2", dtype="float32")


def test_hf_naming_fp8_and_stacked_experts(model, quantized, tmp_path):
    # FP8 linears with weight_scale_inv; stacked experts need values: the unquantised ones, in bf16.
    save_checkpoint(model, tmp_path / "plain")
    plain = _tensors(tmp_path / "plain")
    tensors = _tensors(quantized)
    for name in list(tensors):
        if ".ffn.experts." in name:
            tensors.pop(name)
    for name, value in plain.items():
        if ".ffn.experts." in name:
            tensors[name] = value.astype(ml_dtypes.bfloat16)
    hf = _hf_named(tensors)
    assert any(n.endswith("weight_scale_inv") for n in hf) and any(n.endswith("gate_up_proj") for n in hf)
    directory = _write(tmp_path / "hf", hf, quantized)
    for spec in ("ep=8", "cp=2,tp=2,ep=2"):
        _assert_same(directory, spec)


def test_host_fallbacks_give_the_same_bits(quantized, tmp_path):
    tensors = _tensors(quantized)
    scale = tensors["layers.1.ffn.experts.2.w1.scale"].view(np.uint8).copy()
    scale[0, 0] = 0  # 2^-127: subnormal products (flushed on XLA:CPU)
    tensors["layers.1.ffn.experts.2.w1.scale"] = scale.view(ml_dtypes.float8_e8m0fnu)
    codes = tensors["layers.2.attn.wq_a.weight"].view(np.uint8).copy()
    codes[0, 0] = 0x7F  # e4m3 NaN
    tensors["layers.2.attn.wq_a.weight"] = codes.view(ml_dtypes.float8_e4m3fn)
    _assert_same(_write(tmp_path / "odd", tensors, quantized), "ep=8", dtype="float32")


def _same_error(directory, pattern):
    mesh, device_mesh = _mesh("ep=8")
    with pytest.raises(CheckpointError, match=pattern) as host:
        read_host_params(directory, progress=False)
    with pytest.raises(CheckpointError, match=pattern) as streamed:
        load_sharded(directory, mesh, device_mesh, progress=False)
    assert str(streamed.value) == str(host.value)


def test_errors_are_the_host_loader_errors(quantized, tmp_path):
    tensors = _tensors(quantized)
    tensors.pop("layers.3.ffn.experts.5.w3.weight")
    tensors.pop("layers.3.ffn.experts.5.w3.scale")
    tensors["layers.9.attn.wkv.weight"] = tensors["layers.1.attn.wkv.weight"]
    tensors["layers.9.attn.wkv.scale"] = tensors["layers.1.attn.wkv.scale"]
    _same_error(_write(tmp_path / "a", tensors, quantized), "unexpected tensor 'layers.9.attn.wkv.weight'")
    tensors.pop("layers.9.attn.wkv.weight")
    _same_error(_write(tmp_path / "b", tensors, quantized), "scale tensor 'layers.9.attn.wkv.scale' .* has no weight")
    tensors.pop("layers.9.attn.wkv.scale")
    tensors.pop("layers.2.attn.compressor.ape")
    _same_error(_write(tmp_path / "c", tensors, quantized),
                r"missing 2 tensor\(s\): 'layers.2.attn.compressor.ape', 'layers.3.ffn.experts.5.w3.weight'")
    tensors = _tensors(quantized)
    tensors["layers.1.attn.compressor.ape"] = tensors["layers.1.attn.compressor.ape"][:1].copy()
    _same_error(_write(tmp_path / "d", tensors, quantized), r"'layers.1.attn.compressor.ape'.*shape \(1, ")
    tensors = _tensors(quantized)
    tensors["layers.1.attn.wkv.weight"] = tensors["layers.1.attn.wkv.weight"][:, :32].copy()
    _same_error(_write(tmp_path / "e", tensors, quantized), r"'layers.1.attn.wkv.weight'.*shape \(96, 32\), expected")
    tensors = _tensors(quantized)
    tensors.pop("layers.1.attn.wq_a.scale")
    _same_error(_write(tmp_path / "f", tensors, quantized), "FP8 tensor 'layers.1.attn.wq_a.weight' has no '.scale'")


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the largest codes × scales are inf on both sides
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_dequantization_equals_quant_py(dtype):
    rng = np.random.default_rng(0)
    # Every e4m3 code (NaN excluded) under normal-range scales, in a 2×3-block matrix with ragged edges.
    codes = rng.integers(0, 256, (200, 300), dtype=np.uint8)
    codes.reshape(-1)[:256] = np.arange(256)
    codes[(codes & 0x7F) == 0x7F] = 0
    scale = rng.integers(10, 255, (2, 3), dtype=np.uint8)
    assert device_exact("fp8", scale, codes)
    host = quant.dequantize_fp8(codes.view(ml_dtypes.float8_e4m3fn), scale.view(ml_dtypes.float8_e8m0fnu))
    device = dequantize_on_device("fp8", jax.numpy.asarray(codes), jax.numpy.asarray(scale), np.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(device).view(np.uint8), host.astype(dtype).view(np.uint8))
    # Every packed FP4 byte (two E2M1 codes, signed zeros included) with scales from 2 to 254.
    packed = np.tile(np.arange(256, dtype=np.uint8), (253, 1)).view(np.int8)
    scale = np.repeat(np.arange(2, 255, dtype=np.uint8)[:, None], 16, axis=1)
    assert device_exact("fp4", scale)
    host = quant.dequantize_fp4(packed, scale.view(ml_dtypes.float8_e8m0fnu))
    device = dequantize_on_device("fp4", jax.numpy.asarray(packed.view(np.uint8)), jax.numpy.asarray(scale),
                                  np.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(device).view(np.uint8), host.astype(dtype).view(np.uint8))
