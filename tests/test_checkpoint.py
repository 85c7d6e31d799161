"""Checkpoint round trips through the official format, and clear errors for broken checkpoints."""

import numpy as np
import pytest
from flax import nnx

from dsv4jax.checkpoint.errors import CheckpointError
from dsv4jax.checkpoint.loader import load_model
from dsv4jax.checkpoint.safetensors_io import SafetensorsFile, save_file
from dsv4jax.checkpoint.writer import save_checkpoint
from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4


@pytest.fixture(scope="module")
def model():
    return DeepseekV4(load_config("configs/test-tiny.json", dtype="float32"), nnx.Rngs(7))


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("official")
    save_checkpoint(model, directory)
    return directory


def _flat(model):
    return {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def test_unquantized_round_trip_is_exact(model, checkpoint):
    loaded = load_model(checkpoint, dtype="float32", progress=False)
    expected, got = _flat(model), _flat(loaded)
    assert expected.keys() == got.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_quantized_checkpoint_holds_fp8_and_fp4(model, tmp_path):
    save_checkpoint(model, tmp_path, quantize=True)
    with SafetensorsFile(tmp_path / "model.safetensors") as f:
        assert f.dtype("layers.1.attn.wq_a.weight") == "F8_E4M3"
        assert f.dtype("layers.1.attn.wq_a.scale") == "F8_E8M0"
        assert f.dtype("layers.1.ffn.experts.3.w2.weight") == "I8"
        assert f.shape("layers.1.ffn.experts.3.w2.scale") == (64, 1)
        assert f.dtype("layers.1.hc_attn_fn") == "F32"
        assert any(k.startswith("mtp.0.") for k in f.keys())
    loaded = load_model(tmp_path, dtype="float32", progress=False)
    # Loading the quantized checkpoint again is a fixed point of quantize∘dequantize.
    save_checkpoint(loaded, tmp_path / "again", quantize=True)
    reloaded = load_model(tmp_path / "again", dtype="float32", progress=False)
    for path, value in _flat(loaded).items():
        np.testing.assert_array_equal(_flat(reloaded)[path], value, err_msg=str(path))


def _rewrite(checkpoint, tmp_path, edit):
    with SafetensorsFile(checkpoint / "model.safetensors") as f:
        tensors = {name: f.get(name) for name in f.keys()}
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_named(checkpoint, tmp_path):
    broken = _rewrite(checkpoint, tmp_path, lambda t: t.pop("layers.2.attn.compressor.ape"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): 'layers.2.attn.compressor.ape'"):
        load_model(broken, progress=False)


def test_missing_expert_is_named(checkpoint, tmp_path):
    broken = _rewrite(checkpoint, tmp_path, lambda t: t.pop("layers.3.ffn.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match="'layers.3.ffn.experts.5.w3.weight'"):
        load_model(broken, progress=False)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    def edit(tensors):
        tensors["layers.1.attn.wkv.weight"] = tensors["layers.1.attn.wkv.weight"][:, :32].copy()
    with pytest.raises(CheckpointError, match=r"'layers.1.attn.wkv.weight'.*shape \(96, 32\), expected \(96, 64\)"):
        load_model(_rewrite(checkpoint, tmp_path, edit), progress=False)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    def edit(tensors):
        tensors["layers.9.attn.wkv.weight"] = tensors["layers.1.attn.wkv.weight"]
    with pytest.raises(CheckpointError, match="unexpected tensor 'layers.9.attn.wkv.weight'"):
        load_model(_rewrite(checkpoint, tmp_path, edit), progress=False)


def test_truncated_file_is_named(checkpoint, tmp_path):
    data = (checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path, progress=False)


def test_orbax_converted_round_trip(model, tmp_path):
    from dsv4jax.checkpoint.converted import restore_converted, save_converted

    save_converted(model, tmp_path / "converted")
    restored = restore_converted(tmp_path / "converted")
    assert restored.config == model.config
    expected, got = _flat(model), _flat(restored)
    assert expected.keys() == got.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
