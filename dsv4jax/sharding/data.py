"""Host-side shaping of a batch for the mesh: rows padded to a multiple of dp, chunks to the CP alignment.

Pad rows have `num_new` 0 (their state never changes); pad tokens sit past `num_new` (right padding) and get the
positions that follow the real ones, so they never reach a cache and their outputs are dropped (PARALLELISM §1.1, PARALLELISM §9).
"""

from __future__ import annotations

import numpy as np

from dsv4jax.sharding.context import alignment
from dsv4jax.sharding.mesh import MeshConfig


def pad_chunk(ids: np.ndarray, align: int, fill: int = 0) -> np.ndarray:
    """[B, S] -> [B, S'] with S' the next multiple of `align`."""
    pad = -ids.shape[1] % align
    return np.pad(ids, ((0, 0), (0, pad)), constant_values=fill) if pad else ids


def pad_batch(rows: np.ndarray, multiple: int, fill=0) -> np.ndarray:
    """[B, ...] -> [B', ...] with B' the next multiple of `multiple` (dp), extra rows = fill."""
    pad = -rows.shape[0] % multiple
    if not pad:
        return rows
    return np.concatenate([rows, np.full((pad, *rows.shape[1:]), fill, rows.dtype)])


def shape_prefill(ids: np.ndarray, num_new, mesh: MeshConfig) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B,S], num_new [B]) -> padded to the mesh: rows to a multiple of dp, S to the CP alignment."""
    ids = pad_chunk(np.asarray(ids, np.int32), alignment(mesh.cp_mode, mesh.cp))
    return pad_batch(ids, mesh.dp), pad_batch(np.asarray(num_new, np.int32), mesh.dp)
