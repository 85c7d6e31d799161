"""Reading and writing safetensors files with every dtype a DeepSeek-V4 checkpoint holds (ARCHITECTURE §10.1, ARCHITECTURE §13).

What the `safetensors` library (0.8.0) does with numpy here:
  * `safetensors.numpy.save_file` writes every dtype we need, ml_dtypes ones included (F8_E4M3, F8_E8M0, BF16), with
    the right dtype string; it serialises from the raw data pointer, so arrays must be C-contiguous (we ensure it).
  * `safe_open(path, framework="numpy").get_tensor` reads F32/F16/BF16/I64/I32/I8/U8 (BF16 only because importing
    ml_dtypes registers the "bfloat16" numpy name), but fails on F8_E4M3/F8_E5M2/F8_E8M0 (it looks for
    `numpy.float8_*`, which numpy does not have). Those dtypes are read here from the documented layout instead:
    8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then raw
    little-endian bytes, offsets relative to the end of the header.
    If an installed version cannot return some other dtype either, `get` falls back to the same raw read.
  * Its errors name neither the file nor the tensor, so we parse and check the header ourselves first (JSON,
    dtypes, shape/offset consistency, offsets inside the file, data section tiled exactly) and raise
    `CheckpointError` with both.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from dsv4jax.checkpoint.errors import CheckpointError

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100_000_000  # same bound as the library; a larger value means a corrupt length field

# safetensors dtype string -> numpy dtype (all little-endian on disk).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}
# Dtypes `safe_open(framework="numpy")` cannot return (see module docstring): read from the raw bytes.
_RAW_READ_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0"})


class SafetensorsFile:
    """One safetensors file, header checked on open. Use as a context manager.

    `.keys()`, `.shape(name)`, `.dtype(name)` (safetensors string, e.g. "F8_E4M3"), `.get(name)` -> np.ndarray
    (ml_dtypes dtypes for BF16/F8_*), `.metadata` (the "__metadata__" dict or {}).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._raw_file = None
        self._library_file = None
        self._entries, self.metadata, self._data_start = _read_header(self.path)

    # context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._library_file is not None:
            self._library_file.__exit__(None, None, None)
            self._library_file = None
        if self._raw_file is not None:
            self._raw_file.close()
            self._raw_file = None

    # header queries --------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)["dtype"]

    # data ------------------------------------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        if entry["dtype"] in _RAW_READ_DTYPES:
            return self._read_raw(name, entry)
        try:
            array = self._library().get_tensor(name)
        except safetensors.SafetensorError as error:
            raise CheckpointError(f"{self.path}: reading tensor {name!r} failed: {error}") from error
        except (AttributeError, TypeError):  # a safetensors version without numpy support for this dtype
            return self._read_raw(name, entry)
        if array.dtype != DTYPES[entry["dtype"]] or array.shape != tuple(entry["shape"]):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} came back as {array.dtype}{array.shape}, header says "
                f"{entry['dtype']}{tuple(entry['shape'])}"
            )
        return array

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _library(self):
        if self._library_file is None:
            try:
                handle = safetensors.safe_open(str(self.path), framework="numpy")
                self._library_file = handle.__enter__()
            except safetensors.SafetensorError as error:
                raise CheckpointError(f"{self.path}: the safetensors library rejected the file: {error}") from error
        return self._library_file

    def _read_raw(self, name: str, entry: dict) -> np.ndarray:
        if self._raw_file is None:
            self._raw_file = open(self.path, "rb")
        begin, end = entry["data_offsets"]
        array = np.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        self._raw_file.seek(self._data_start + begin)
        read = self._raw_file.readinto(memoryview(array.reshape(-1).view(np.uint8)))
        if read != end - begin:  # the file shrank after its header was checked
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated: read {read} of {end - begin} bytes")
        return array


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parse and check the header: (entries, metadata, absolute offset of the data section)."""
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as file:
            length_bytes = file.read(_HEADER_LENGTH_BYTES)
            if len(length_bytes) < _HEADER_LENGTH_BYTES:
                raise CheckpointError(f"{path}: file is {file_size} bytes, too short for the 8-byte header length")
            (header_length,) = struct.unpack("<Q", length_bytes)
            if header_length > min(file_size - _HEADER_LENGTH_BYTES, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: header length {header_length} does not fit in the {file_size}-byte file "
                    "(truncated file or corrupt header)"
                )
            header_bytes = file.read(header_length)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read file: {error}") from error
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: corrupt header (not JSON): {error}") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt header: __metadata__ must map strings to strings")

    data_start = _HEADER_LENGTH_BYTES + header_length
    data_size = file_size - data_start
    entries: dict[str, dict] = {}
    past_end: list[str] = []
    for name, entry in header.items():
        entries[name] = _checked_entry(path, name, entry)
        begin, end = entries[name]["data_offsets"]
        if end > data_size:
            past_end.append(f"{name!r} (data_offsets [{begin}, {end}])")
    if past_end:
        shown = ", ".join(past_end[:3]) + (f" and {len(past_end) - 3} more" if len(past_end) > 3 else "")
        raise CheckpointError(
            f"{path}: file is truncated: tensor {shown} extends past the end of its {data_size}-byte data section"
        )
    _check_data_coverage(path, entries, data_size)
    return entries, metadata, data_start


def _check_data_coverage(path: Path, entries: dict[str, dict], data_size: int) -> None:
    """The format requires the tensors to tile the data section exactly: no holes, no overlap, nothing after."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != position:
            if begin < position:
                problem = "overlaps the previous tensor"
            else:
                problem = f"leaves a hole of {begin - position} bytes"
            raise CheckpointError(f"{path}: corrupt header: tensor {name!r} (data_offsets {[begin, end]}) {problem}")
        position = end
    if position != data_size:
        raise CheckpointError(f"{path}: {data_size - position} bytes after the last tensor's data (corrupt file?)")


def _checked_entry(path: Path, name: str, entry) -> dict:
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {problem}")

    if not isinstance(entry, dict):
        raise fail("not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise fail(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise fail(f"bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise fail(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    expected_bytes = math.prod(shape) * DTYPES[dtype].itemsize
    if begin < 0 or end - begin != expected_bytes:
        raise fail(f"data_offsets {offsets} hold {end - begin} bytes, {dtype}{tuple(shape)} needs {expected_bytes}")
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` (numpy / ml_dtypes arrays) as one safetensors file, atomically (temp file + rename)."""
    path = Path(path)
    prepared: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise CheckpointError(f"{path}: invalid tensor name {name!r}")
        array = np.asarray(array)
        if array.dtype.newbyteorder("=") not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot store")
        # The library serialises from the data pointer, so a strided view would be written wrongly (and
        # np.ascontiguousarray would turn a 0-d array into 1-d).
        prepared[name] = array if array.flags.c_contiguous else array.copy(order="C")
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError(f"{path}: metadata must map strings to strings")
        metadata = dict(metadata)
    temporary = path.with_name(path.name + ".tmp")
    try:
        safetensors.numpy.save_file(prepared, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def dtype_name(array: np.ndarray) -> str:
    """safetensors dtype string of a numpy / ml_dtypes array, e.g. "F8_E4M3"."""
    try:
        return _DTYPE_NAMES[np.asarray(array).dtype.newbyteorder("=")]
    except KeyError:
        raise CheckpointError(f"dtype {np.asarray(array).dtype} cannot be stored in safetensors") from None


def read_index(directory: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> file name (relative to `directory`) of a checkpoint directory (ARCHITECTURE §13).

    Uses `model.safetensors.index.json`'s "weight_map" when present (and checks that every shard it names exists);
    otherwise lists the tensors of every `*.safetensors` file in the directory (usually one `model.safetensors`).
    """
    directory = Path(directory)
    index_path = directory / INDEX_FILENAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{index_path}: cannot read index: {error}") from error
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index_path}: no valid 'weight_map' (tensor name -> file name)")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"{index_path}: shard files missing from {directory}: {shown}")
        return dict(weight_map)

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: neither {INDEX_FILENAME} nor any *.safetensors file")
    weight_map: dict[str, str] = {}
    for file in files:
        with SafetensorsFile(file) as opened:
            for name in opened.keys():
                if name in weight_map:
                    raise CheckpointError(
                        f"{directory}: tensor {name!r} is in both {weight_map[name]} and {file.name}"
                    )
                weight_map[name] = file.name
    return weight_map
