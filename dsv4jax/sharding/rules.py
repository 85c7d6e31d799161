"""The one table from logical axis names to mesh axes, for parameters, caches and activations.

Parameters carry logical names as NNX metadata (`nnx.Param(value, axes=("expert", "moe_mlp", "embed"))`).
Attention, router, embedding, head and hyper-connection weights are replicated (attn_tp = 1, PARALLELISM §0);
only the MoE weights are split: routed experts over cp × ep on the expert axis and over tp (and dp under DP
attention) on the intermediate axis; the shared expert's intermediate axis over all MoE axes, so every device
computes a distinct slice of it. Caches and activations: the batch over dp; prefill tokens over cp.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv4jax.sharding.mesh import MeshConfig

# Logical names that stay replicated, listed so that a new name is a loud error rather than silently replicated.
REPLICATED = ("embed", "embed_in", "vocab", "q_lora", "heads_dim", "heads", "head_dim", "group_heads_dim",
              "o_groups_rank", "compress_dim", "compress_row", "index_heads_dim", "index_heads", "hc_mix", "hc_embed",
              "router", "layers", None)


def logical_rules(mesh: MeshConfig) -> dict[str | None, tuple[str, ...]]:
    """logical axis -> mesh axes (empty tuple: replicated)."""
    rules = {name: () for name in REPLICATED}
    rules.update({
        # parameters
        "expert": mesh.expert_axes,  # PARALLELISM §3.1: the CP group owns experts
        "moe_mlp": mesh.moe_mlp_axes,  # PARALLELISM §4: MoE TP (over dp too under DP attention)
        "mlp": mesh.moe_weight_axes,  # shared expert: a distinct slice per MoE device
        # caches and activations
        "batch": ("dp",) if mesh.dp > 1 else (),
        "prefill_tokens": ("cp",) if mesh.cp > 1 else (),
        "decode_tokens": (),  # decode is never split over cp (PARALLELISM §1)
    })
    return rules


def spec(logical_axes: tuple, mesh: MeshConfig) -> P:
    rules = logical_rules(mesh)
    entries = []
    for name in logical_axes:
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to dsv4jax/sharding/rules.py")
        axes = rules[name]
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def param_specs(params: nnx.State, mesh: MeshConfig) -> nnx.State:
    """The PartitionSpec of every parameter, as a state of the same structure (a shard_map in_specs tree)."""
    return jax.tree.map(lambda v: v.replace(spec(v.get_metadata()["axes"], mesh)), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(params: nnx.State, mesh: MeshConfig, device_mesh) -> nnx.State:
    return jax.tree.map(lambda v: v.replace(NamedSharding(device_mesh, spec(v.get_metadata()["axes"], mesh))), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_specs(state, mesh: MeshConfig):
    """Decode state: the batch over dp, caches replicated over cp/tp/ep (PARALLELISM §1: KV replicated). `lengths`
    is [B]; every cache leaf is stacked over its layers, [L, B, ...] (ARCHITECTURE §3.1)."""
    from dsv4jax.model.state import PagedRows

    batch, stacked = spec(("batch",), mesh), spec(("layers", "batch"), mesh)

    def leaf_spec(leaf):  # a paged pool [L, pages, r, d_c] is shared by the batch; its table [B, P] is not stacked
        if isinstance(leaf, PagedRows):
            return PagedRows(pool=spec(("layers",), mesh), table=batch)
        return stacked

    layers = jax.tree.map(leaf_spec, state.layers, is_leaf=lambda x: isinstance(x, PagedRows))
    return dataclasses.replace(state, lengths=batch, layers=layers)


def state_shardings(state, mesh: MeshConfig, device_mesh):
    return jax.tree.map(lambda s: NamedSharding(device_mesh, s), state_specs(state, mesh))
