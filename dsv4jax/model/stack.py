"""Layers of one kind stacked and run under one scan, so program size and compile time do not grow with depth
(ARCHITECTURE §3.1).

`ModelConfig.layer_groups()` splits the main layers into groups of repetitions of a unit of layers whose kinds
repeat (V4-Flash: layers 0–1, layer 2, then 20 × (HCA, CSA)). A `LayerStack` holds one group: for each position of
the unit one `Block` whose parameters carry a leading "layers" axis, and runs the repetitions under `jax.lax.scan`.
A group of one repetition holds plain blocks and runs them directly, which is the unscanned form
(`scan_layers=False`: every layer its own group).

Inside the scan nothing is copied per layer that the layer does not need: the caches are the scan's carry and each
layer reads and scatters into its own part in place (`LayerState.at`, model/state.py); the routed experts stay whole
stacks that the MoE kernel indexes by layer (`routed_experts(layer=...)`). The other parameters are the scanned
inputs, sliced per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4jax.config import LayerGroup, ModelConfig
from dsv4jax.model.block import Block
from dsv4jax.model.layout import TokenLayout
from dsv4jax.model.state import LayerState

LAYERS_AXIS = "layers"  # the logical name of the leading axis of stacked parameters (never sharded)


def is_routed_expert(path: tuple, _value=None) -> bool:
    """NNX filter: the routed experts' stacked weights (kept whole inside a scan)."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in ("w1", "w2", "w3")


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one structure -> one module whose every variable is theirs stacked on a new leading axis."""
    graphdef = nnx.split(modules[0])[0]
    states = [nnx.split(module)[1] for module in modules]

    def stack(*variables):
        first = variables[0]
        return first.replace(jnp.stack([v.get_value() for v in variables]),
                             axes=(LAYERS_AXIS, *first.get_metadata()["axes"]))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class LayerStack(nnx.Module):
    """One layer group: `blocks[j]` is position j of the unit, its variables stacked over the repetitions (plain,
    unstacked blocks when the group has one repetition)."""

    def __init__(self, config: ModelConfig, group: LayerGroup, rngs: nnx.Rngs):
        self.group = group
        # Built in layer order, so the random draws match those of an unscanned model.
        blocks = [[Block(config, group.layer(r, j), rngs) for j in range(group.period)]
                  for r in range(group.repeats)]
        if group.repeats == 1:
            self.blocks = nnx.List(blocks[0])
        else:
            self.blocks = nnx.List([stack_modules([blocks[r][j] for r in range(group.repeats)])
                                    for j in range(group.period)])

    def __call__(self, streams: jax.Array, ids: jax.Array, start: jax.Array, num_new: jax.Array,
                 states: tuple[LayerState, ...], layout: TokenLayout) -> tuple[jax.Array, tuple[LayerState, ...]]:
        """streams [B,S,n,D] through the group's layers; `states`: one stacked LayerState per unit position."""
        if self.group.repeats == 1:
            scopes = [f"layer{self.group.layer(0, j)}" for j in range(self.group.period)]
            return _run_unit(self.blocks, streams, ids, start, num_new, states, layout, 0, None, scopes)

        graphdef, experts, scanned = nnx.split(self.blocks, is_routed_expert, ...)
        scopes = [f"position{j}" for j in range(self.group.period)]

        def step(carry, inputs):
            (streams, states), (params, layer) = carry, inputs
            blocks = nnx.merge(graphdef, experts, params)
            return _run_unit(blocks, streams, ids, start, num_new, states, layout, layer, layer, scopes), None

        layers = jnp.arange(self.group.repeats, dtype=jnp.int32)
        (streams, states), _ = jax.lax.scan(step, (streams, tuple(states)), (scanned, layers))
        return streams, states


def _run_unit(blocks, streams, ids, start, num_new, states, layout, layer, experts_layer, scopes):
    """One repetition of a unit: block j on layer `layer` of stacked state j (`experts_layer`: the routed experts'
    stack index, None when the blocks hold one layer's experts)."""
    new_states = []
    for block, state, scope in zip(blocks, states, scopes):
        with jax.named_scope(scope):
            streams, state = block(streams, ids, start, num_new, state.at(layer), layout, experts_layer)
        new_states.append(state.stacked())
    return streams, tuple(new_states)
