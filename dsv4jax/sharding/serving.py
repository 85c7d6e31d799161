"""The serving engine's model calls over a mesh: each call is the unchanged model inside one `shard_map`.

The engine keeps every sequence on every rank (dp = 1): caches and batch inputs are replicated, parameters follow
the rules table (MoE weights split over cp × ep and tp). A prompt chunk is split over cp like a context-parallel
prefill (PARALLELISM §1; its MTP pass too, §5); decode, speculative verify and the MTP drafts run replicated over
cp (§1: decode is not split), with the MoE's collectives over the axes that split its weights (§3).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv4jax.serve.steps import ModelCalls
from dsv4jax.sharding.data import chunk_alignment
from dsv4jax.sharding.layout import ShardedLayout
from dsv4jax.sharding.mesh import MeshConfig, MeshError, make_mesh
from dsv4jax.sharding.rules import param_shardings, param_specs

REPLICATED = P()
CHUNK = P(None, "cp")  # [batch, prompt-chunk tokens over cp]


class MeshModelCalls(ModelCalls):
    def __init__(self, graphdef: nnx.GraphDef, mesh: MeshConfig, device_mesh):
        super().__init__(graphdef)
        if mesh.dp != 1:
            raise MeshError(f"the serving engine keeps every sequence on every rank: use dp=1 (got dp={mesh.dp}); "
                            f"spread the model with cp, tp and ep instead")
        self.mesh, self.device_mesh = mesh, device_mesh
        self.alignment = chunk_alignment(mesh)

    @classmethod
    def build(cls, graphdef, params, mesh: MeshConfig | str, devices=None):
        """(calls, params placed by the rules table) for a mesh over `devices` (default: all). Abstract params
        (ShapeDtypeStructs carrying those shardings) stay abstract: enough to lower and compile before loading."""
        from dsv4jax.sharding.mesh import parse_mesh_spec

        mesh = parse_mesh_spec(mesh) if isinstance(mesh, str) else mesh
        device_mesh = make_mesh(mesh, devices)
        calls = cls(graphdef, mesh, device_mesh)
        if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
            return calls, params
        return calls, jax.device_put(params, param_shardings(params, mesh, device_mesh))

    def replicate(self, tree):
        return jax.device_put(tree, NamedSharding(self.device_mesh, REPLICATED))

    def _run(self, body, params, state, tokens: tuple, rest: tuple, layout: ShardedLayout):
        """body(model, state, *tokens, *rest) in a shard_map; `tokens` [B,S,...] are split over cp by `layout`."""
        graphdef = self.graphdef
        if layout.split:
            tokens = tuple(layout.split.to_rank_major(t) for t in tokens)
        token_spec = CHUNK if layout.split else REPLICATED

        def mapped(params, state, *args):
            return body(nnx.merge(graphdef, params), state, layout, *args)

        specs = (param_specs(params, self.mesh), REPLICATED, *(token_spec,) * len(tokens), *(REPLICATED,) * len(rest))
        return jax.shard_map(mapped, mesh=self.device_mesh, in_specs=specs, out_specs=REPLICATED,
                             check_vma=False)(params, state, *tokens, *rest)

    def _layout(self, chunk: int, prefill: bool) -> ShardedLayout:
        if prefill and self.mesh.cp > 1:
            if chunk % self.alignment:
                raise MeshError(f"a prompt chunk of {chunk} tokens cannot be split over cp={self.mesh.cp} "
                                f"({self.mesh.cp_mode}); make prefill chunk sizes multiples of {self.alignment}")
            return ShardedLayout.prefill(self.mesh, chunk)
        return ShardedLayout.replicated(self.mesh)

    def target(self, params, state, ids, num_new, prefill: bool):
        def body(model, state, layout, ids, num_new):
            return model(ids, state, num_new, layout)

        return self._run(body, params, state, (ids,), (num_new,), self._layout(ids.shape[1], prefill))

    def mtp(self, params, state, streams, next_ids, num_new, prefill: bool):
        def body(model, state, layout, streams, next_ids, num_new):
            return model.mtp_forward(streams, next_ids, state, num_new, layout)

        return self._run(body, params, state, (streams, next_ids), (num_new,),
                         self._layout(next_ids.shape[1], prefill))
