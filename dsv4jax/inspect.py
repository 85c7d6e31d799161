"""Looking inside a forward pass (notebooks): which compressed rows the lightning indexer selects, and how the
router spreads tokens over experts. With recording switched on, the model sows both as `nnx.Intermediate`;
these functions run one jitted forward under `nnx.capture` and collect them."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4jax.checkpoint.names import path_key
from dsv4jax.model import init_state
from dsv4jax.model.inspection import set_recording


@nnx.jit
def _captured(model, ids, state, num_new):
    _, intermediates = nnx.capture(lambda m: m(ids, state, num_new), nnx.Intermediate)(model)
    return intermediates


def _capture(model, prompt) -> tuple[dict, int]:
    ids = model.encode(prompt)
    # Recording needs each layer run as itself, not inside a scan: every layer its own group (ARCHITECTURE §3.1).
    module = nnx.merge(model.graphdef, model.params).with_scan_layers(False)
    set_recording(module, True)
    width = -(-len(ids) // 64) * 64
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(ids)] = ids
    intermediates = _captured(module, jnp.asarray(padded), init_state(module.config, 1, width),
                              jnp.array([len(ids)], jnp.int32))
    flat = {path_key(path): np.asarray(var.get_value()[0])
            for path, var in nnx.to_flat_state(intermediates)}
    return flat, len(ids)


def indexer_selection(model, prompt) -> dict[int, np.ndarray]:
    """For each CSA layer: the compressed rows [S, top-k] each query of the prompt attends (−1 = unused)."""
    captured, length = _capture(model, prompt)
    return {int(name.split(".")[1]): rows[0, :length] for name, rows in captured.items()
            if name.endswith("indexer_rows") and name.startswith("groups.")}  # group L holds layer L


def expert_routing(model, prompt) -> dict[int, np.ndarray]:
    """For each main layer: the experts [S, k] chosen for each token of the prompt."""
    captured, length = _capture(model, prompt)
    return {int(name.split(".")[1]): experts[0, :length] for name, experts in captured.items()
            if name.endswith("routed_experts") and name.startswith("groups.")}
