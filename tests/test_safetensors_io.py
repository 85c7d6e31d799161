"""dsv4jax.checkpoint.safetensors_io: every dtype of a V4 checkpoint (ARCHITECTURE §10.1), clear errors, index."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from dsv4jax.checkpoint.errors import CheckpointError
from dsv4jax.checkpoint.safetensors_io import SafetensorsFile, read_index, save_file


def every_checkpoint_dtype(rng) -> dict[str, np.ndarray]:
    """One tensor per dtype a V4 checkpoint holds, named by its safetensors dtype string."""
    all_bytes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return {
        "F8_E4M3": all_bytes.view(ml_dtypes.float8_e4m3fn),  # NaN codes too
        "F8_E8M0": all_bytes.view(ml_dtypes.float8_e8m0fnu),
        "I8": rng.integers(-128, 128, (7, 5), dtype=np.int8),
        "BF16": rng.standard_normal((3, 130)).astype(ml_dtypes.bfloat16),
        "F32": rng.standard_normal((4, 6)).astype(np.float32),
        "F16": rng.standard_normal((9,)).astype(np.float16),
        "I32": rng.integers(-(2**31), 2**31, (129, 6), dtype=np.int32),
        "I64": rng.integers(-(2**62), 2**62, (5, 6), dtype=np.int64),
        "U8": rng.integers(0, 256, (2, 3, 4), dtype=np.uint8),
    }


def assert_same_bytes(actual: np.ndarray, expected: np.ndarray):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def test_round_trip_of_every_dtype(tmp_path):
    tensors = every_checkpoint_dtype(np.random.default_rng(0))
    tensors["transposed_view"] = tensors["F32"].T  # not C-contiguous: must still be written by value
    tensors["scalar"] = np.array(3.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=ml_dtypes.float8_e4m3fn)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    with SafetensorsFile(path) as file:
        assert file.keys() == sorted(tensors)
        assert file.metadata == {"format": "pt"}
        for name, expected in tensors.items():
            if name in every_checkpoint_dtype(np.random.default_rng(0)):
                assert file.dtype(name) == name
            assert file.shape(name) == expected.shape
            assert_same_bytes(file.get(name), expected.copy(order="C"))
        with pytest.raises(KeyError, match="nope"):
            file.get("nope")


def test_reads_float8_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    bf16 = torch.linspace(-3, 3, 12).to(torch.bfloat16)
    path = tmp_path / "torch.safetensors"
    tensors = {"w": codes.view(torch.float8_e4m3fn), "s": codes.clone().view(torch.float8_e8m0fnu), "b": bf16}
    torch_save_file(tensors, str(path))
    with SafetensorsFile(path) as file:
        assert (file.dtype("w"), file.dtype("s"), file.dtype("b")) == ("F8_E4M3", "F8_E8M0", "BF16")
        assert file.get("w").dtype == ml_dtypes.float8_e4m3fn and file.get("s").dtype == ml_dtypes.float8_e8m0fnu
        np.testing.assert_array_equal(file.get("w").view(np.uint8), codes.numpy())
        np.testing.assert_array_equal(file.get("s").view(np.uint8), codes.numpy())
        np.testing.assert_array_equal(file.get("b").view(np.int16), bf16.view(torch.int16).numpy())


def header_of(path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"first": np.ones((64,), np.float32), "last": np.ones((64,), np.float32)}, path)
    length, header = header_of(path)
    tensor_entries = [(n, e) for n, e in header.items() if n != "__metadata__"]
    last_name, last = max(tensor_entries, key=lambda item: item[1]["data_offsets"])
    begin, end = last["data_offsets"]
    data = path.read_bytes()
    path.write_bytes(data[: 8 + length + (begin + end) // 2])  # cut in the middle of the last tensor's data
    with pytest.raises(CheckpointError, match="truncated") as caught:
        SafetensorsFile(path)
    message = str(caught.value)
    assert path.name in message and repr(last_name) in message
    assert repr({"first", "last"}.difference({last_name}).pop()) not in message
    assert isinstance(caught.value, ValueError)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match="header length 1000") as caught:
        SafetensorsFile(path)
    assert "short.safetensors" in str(caught.value)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        SafetensorsFile(path)


def test_corrupt_header_names_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    garbage = b"\x00\xffnot json at all"
    path.write_bytes(struct.pack("<Q", len(garbage)) + garbage + bytes(16))
    with pytest.raises(CheckpointError, match="not JSON") as caught:
        SafetensorsFile(path)
    assert "broken.safetensors" in str(caught.value)


def test_inconsistent_header_entry_names_tensor(tmp_path):
    path = tmp_path / "bad_entry.safetensors"
    header = json.dumps({"layers.0.attn.wq_a.weight": {"dtype": "F8_E4M3", "shape": [4, 4], "data_offsets": [0, 8]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wq_a\.weight'.*needs 16"):
        SafetensorsFile(path)
    header = json.dumps({"x": {"dtype": "F4_E2M1", "shape": [2], "data_offsets": [0, 1]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(1))
    with pytest.raises(CheckpointError, match="unsupported dtype 'F4_E2M1'"):
        SafetensorsFile(path)


def test_holes_and_trailing_bytes_are_rejected(tmp_path):
    path = tmp_path / "trailing.safetensors"
    save_file({"a": np.ones(4, ml_dtypes.float8_e4m3fn)}, path)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor"):
        SafetensorsFile(path)
    header = json.dumps({"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(4))
    with pytest.raises(CheckpointError, match="'b'.*hole of 2 bytes"):
        SafetensorsFile(path)


def test_save_rejects_unstorable_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="'z'.*complex128"):
        save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "z.safetensors")
    assert not list(tmp_path.iterdir())


def test_read_index_with_index_file(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": np.zeros(2, np.float32)}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index = {"metadata": {"total_size": 16}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert read_index(tmp_path) == weight_map
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing.*model-00002-of-00002"):
        read_index(tmp_path)


def test_read_index_without_index_file(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        read_index(tmp_path)
    tensors = {"embed.weight": np.zeros((2, 2), ml_dtypes.bfloat16), "norm.weight": np.ones(2, np.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert read_index(tmp_path) == {"embed.weight": "model.safetensors", "norm.weight": "model.safetensors"}
    save_file({"norm.weight": np.ones(2, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="'norm.weight' is in both"):
        read_index(tmp_path)
