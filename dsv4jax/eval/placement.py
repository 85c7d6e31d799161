"""Where an evaluation's forward passes run: one device, or a mesh (each chunk split over cp, MoE weights over
cp × ep and tp, batch rows over dp) through the sharded run paths of dsv4jax/sharding/engine.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dsv4jax.model import init_state
from dsv4jax.run import forward_fn


@jax.jit
def _pick(logits, targets):
    """log p(targets) [B,S] and whether each target is the argmax."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logits, axis=-1) == targets


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _local(graphdef, params, state, ids, num_new, targets):
    logits, _, state = forward_fn(graphdef, params, state, ids, num_new)
    return (*_pick(logits, targets), state)


class Placement:
    def __init__(self, model, mesh=None):
        """mesh: None (one device) or a spec such as "cp=2,tp=2,ep=2" / a MeshConfig over all devices."""
        self.model, self.mesh = model, None
        if mesh is not None:
            from dsv4jax.sharding.engine import ShardedRunner
            from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec
            from dsv4jax.sharding.rules import param_shardings

            self.mesh = parse_mesh_spec(mesh) if isinstance(mesh, str) else mesh
            self.mesh.check_model(model.config)
            self.device_mesh = make_mesh(self.mesh)
            self.params = jax.device_put(model.params, param_shardings(model.params, self.mesh, self.device_mesh))
            self.runner = ShardedRunner(model.graphdef, self.mesh, self.device_mesh)

    def check(self, batch_size: int, width: int) -> None:
        if self.mesh is None:
            return
        from dsv4jax.sharding.data import chunk_alignment
        from dsv4jax.sharding.mesh import MeshError

        self.mesh.check_model(self.model.config, batch=batch_size)
        if width % chunk_alignment(self.mesh):
            raise MeshError(f"chunks of {width} tokens cannot be split over cp={self.mesh.cp} ({self.mesh.cp_mode}); "
                            f"use a chunk length that is a multiple of {chunk_alignment(self.mesh)}")

    def fresh_state(self, batch_size: int, max_len: int):
        state = init_state(self.model.config, batch_size, max_len)
        if self.mesh is None:
            return state
        from dsv4jax.sharding.rules import state_shardings

        return jax.device_put(state, state_shardings(state, self.mesh, self.device_mesh))

    def token_logprobs(self, state, ids, num_new, targets):
        """A chunk ids [B,S] (num_new real) on top of `state`: (log p(targets) [B,S], target is argmax, state)."""
        ids, num_new, targets = jnp.asarray(ids), jnp.asarray(num_new), jnp.asarray(targets)
        if self.mesh is None:
            return _local(self.model.graphdef, self.model.params, state, ids, num_new, targets)
        logits, _, state = self.runner.forward(self.params, state, ids, num_new)
        return (*_pick(logits, targets), state)
