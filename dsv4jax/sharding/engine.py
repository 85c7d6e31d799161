"""The run paths under a mesh: pure jitted functions whose body is the unchanged model inside one `shard_map`.

Parameters enter with their rules-table specs (MoE weights split, the rest replicated), the decode state with
its batch over dp (caches replicated over cp/tp/ep, §1), tokens as [B over dp, S over cp] for a prefill chunk
(put in rank-major order by `SequenceSplit.to_rank_major` before the shard_map) and [B over dp] for decode.
`check_vma=False`: values such as the gathered caches are replicated over cp by construction (every rank
computes them from the same all-gathered inputs), which the varying-axes checker cannot prove.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv4jax.run import last_real
from dsv4jax.sharding.layout import ShardedLayout
from dsv4jax.sharding.mesh import MeshConfig
from dsv4jax.sharding.rules import param_specs, state_specs

TOKENS = P("dp", "cp")  # [batch over dp, prefill tokens over cp]
BATCH = P("dp")


class ShardedRunner:
    """CP prefill, decode and MTP prefill of one model on one mesh; each path is compiled once per shape."""

    def __init__(self, graphdef: nnx.GraphDef, mesh: MeshConfig, device_mesh, compiler_options: dict | None = None):
        self.graphdef, self.mesh, self.device_mesh = graphdef, mesh, device_mesh
        self._jit = functools.partial(jax.jit, compiler_options=compiler_options)
        self._cache: dict = {}

    def _shard_map(self, body, in_specs, out_specs):
        return jax.shard_map(body, mesh=self.device_mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _compiled(self, key, build):
        if key not in self._cache:
            self._cache[key] = self._jit(build())
        return self._cache[key]

    # ---- prefill (context parallel) --------------------------------------------------------------------------
    def forward(self, params, state, ids, num_new):
        """A prefill chunk ids [B,S] (S a multiple of the CP alignment, B of dp) at positions state.lengths + …:
        fp32 logits of every position [B,S,V], pre-head streams [B,S,n,D] (token order) and the new state."""
        return self._compiled(("forward", ids.shape[1]), lambda: self._forward_fn(ids.shape[1]))(
            params, state, ids, num_new)

    def prefill(self, params, state, ids, num_new):
        """As `forward`, but only the logits of each row's last real token [B,V] (what serving needs)."""
        return self._compiled(("prefill", ids.shape[1]), lambda: self._forward_fn(ids.shape[1], last_only=True))(
            params, state, ids, num_new)

    def _forward_fn(self, chunk: int, last_only: bool = False):
        layout = ShardedLayout.prefill(self.mesh, chunk)
        graphdef = self.graphdef

        def body(params, state, ids, num_new):
            model = nnx.merge(graphdef, params)
            hidden, streams, state = model(ids, state, num_new, layout)
            if last_only:
                hidden = last_real(hidden, num_new)
            return model.logits(hidden), streams, state

        def run(params, state, ids, num_new):
            if layout.split:
                ids = layout.split.to_rank_major(ids)
            specs = state_specs(state, self.mesh)
            return self._shard_map(body, (param_specs(params, self.mesh), specs, TOKENS, BATCH),
                                   (BATCH, BATCH, specs))(params, state, ids, num_new)
        return run

    # ---- decode (replicated over cp, §1) ---------------------------------------------------------------------
    def decode(self, params, state, ids, active):
        """One token per sequence ids [B]: logits [B,V], streams [B,n,D], state (inactive rows unchanged)."""
        return self._compiled(("decode",), self._decode_fn)(params, state, ids, active)

    def _decode_fn(self):
        layout = ShardedLayout.replicated(self.mesh)
        graphdef = self.graphdef

        def body(params, state, ids, active):
            model = nnx.merge(graphdef, params)
            hidden, streams, state = model(ids[:, None], state, active.astype(jnp.int32), layout)
            return model.logits(hidden[:, 0]), streams[:, 0], state

        def run(params, state, ids, active):
            specs = state_specs(state, self.mesh)
            return self._shard_map(body, (param_specs(params, self.mesh), specs, BATCH, BATCH),
                                   (BATCH, BATCH, specs))(params, state, ids, active)
        return run

    # ---- MTP prefill under CP (§5: the draft model's prefill is split and gathered like the target's) -------
    def mtp_forward(self, params, mtp_state, streams, next_ids, num_new):
        """The MTP module over main-model streams [B,S,n,D] paired with next tokens [B,S] (token order):
        fp32 logits [B,S,V], MTP streams [B,S,n,D], MTP state."""
        return self._compiled(("mtp", next_ids.shape[1]), lambda: self._mtp_fn(next_ids.shape[1]))(
            params, mtp_state, streams, next_ids, num_new)

    def _mtp_fn(self, chunk: int):
        layout = ShardedLayout.prefill(self.mesh, chunk)
        graphdef = self.graphdef

        def body(params, state, streams, next_ids, num_new):
            model = nnx.merge(graphdef, params)
            hidden, mtp_streams, state = model.mtp_forward(streams, next_ids, state, num_new, layout)
            return model.logits(hidden), mtp_streams, state

        def run(params, state, streams, next_ids, num_new):
            if layout.split:
                streams, next_ids = layout.split.to_rank_major(streams), layout.split.to_rank_major(next_ids)
            specs = state_specs(state, self.mesh)
            return self._shard_map(body, (param_specs(params, self.mesh), specs, TOKENS, TOKENS, BATCH),
                                   (BATCH, BATCH, specs))(params, state, streams, next_ids, num_new)
        return run

    def lower_forward(self, params, state, ids, num_new):
        """The lowered CP prefill (for inspecting its collectives: `.compile().as_text()`)."""
        return self._jit(self._forward_fn(ids.shape[1])).lower(params, state, ids, num_new)
