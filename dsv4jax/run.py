"""The one way the model reaches the devices: a `Runner` carries every call, on one device or over a mesh.

The calls are pure functions of (params, state, inputs). `target` runs a chunk of tokens (a prefill chunk, a
decode step, a speculative verify) and `mtp` the MTP module; both return hidden states, pre-head streams and the
new state, and compose into larger jitted functions (the engine's steps, evaluation). `forward`, `prefill` and
`decode` are those calls with the LM head, jitted once per shape (`forward_fn` etc. unjitted).

Over a mesh every call is the unchanged model inside one `shard_map` (PARALLELISM §0): parameters enter with
their rules-table specs, the state with its batch over dp (caches replicated over cp, tp and ep, PARALLELISM §1),
a prompt chunk as [batch over dp, tokens over cp] in rank-major order (PARALLELISM §1.1, PARALLELISM §1.2) and
anything else by batch over dp.
`check_vma=False`: values such as the gathered caches are replicated over cp by construction (every rank computes
them from the same all-gathered inputs), which the varying-axes checker cannot prove.

`graphdef` comes from one `nnx.split(model)` outside any loop; the calls merge it back inside the trace, so the
NNX modules only describe the computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv4jax.model.layout import TokenLayout
from dsv4jax.model.state import DecodeState


_JITTED: dict = {}


def last_real(values: jax.Array, num_new: jax.Array) -> jax.Array:
    """values [B,S,...] -> values[b, num_new[b]−1]."""
    index = jnp.maximum(num_new - 1, 0)
    return jax.vmap(lambda v, i: v[i])(values, index)


class Runner:
    """Runs one model (its `graphdef`) on one device (`mesh=None`) or over a mesh ("cp=2,ep=2" or a MeshConfig,
    over `devices`, default all), with the kernel implementation `kernels` ("auto", "reference" or "pallas")."""

    def __init__(self, graphdef: nnx.GraphDef, mesh=None, devices=None, *, kernels: str = "auto",
                 compiler_options: dict | None = None):
        from dsv4jax.sharding.mesh import MeshConfig, make_mesh, parse_mesh_spec

        self.graphdef, self.kernels = graphdef, kernels
        self._options = tuple(sorted((compiler_options or {}).items()))
        TokenLayout(kernels)  # validates the choice now, not at the first trace
        self.mesh: MeshConfig | None = parse_mesh_spec(mesh) if isinstance(mesh, str) else mesh
        self.device_mesh = None if self.mesh is None else make_mesh(self.mesh, devices)
        if self._key() not in _JITTED:  # equal runners share their compiled paths
            jit = functools.partial(jax.jit, compiler_options=compiler_options)
            _JITTED[self._key()] = (jit(self.forward_fn), jit(self.prefill_fn), jit(self.decode_fn),
                                    jit(self.mtp_forward_fn))
        self.forward, self.prefill, self.decode, self.mtp_forward = _JITTED[self._key()]

    # Equal runners (same model, mesh, kernels, options) are interchangeable, also as static arguments of a jit.
    def _key(self):
        return self.graphdef, self.mesh, self.device_mesh, self.kernels, self._options

    def __eq__(self, other):
        return isinstance(other, Runner) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # ---- placement -------------------------------------------------------------------------------------------
    @property
    def alignment(self) -> int:
        """Prompt chunks are split over cp in lengths that are multiples of this (1 without cp)."""
        from dsv4jax.sharding.context import alignment

        return 1 if self.mesh is None else alignment(self.mesh.cp_mode, self.mesh.cp)

    def check_chunk(self, length: int, what: str = "a prompt chunk") -> None:
        """MeshError naming the fix if chunks of `length` tokens cannot be split over cp."""
        if length % self.alignment:
            from dsv4jax.sharding.mesh import MeshError

            raise MeshError(f"{what} of {length} tokens cannot be split over cp={self.mesh.cp} ({self.mesh.cp_mode}); "
                            f"make chunk lengths multiples of {self.alignment}")

    def check_batch(self, rows: int) -> None:
        """MeshError naming the fix if `rows` sequences cannot be split over dp."""
        if self.mesh is not None and rows % self.mesh.dp:
            from dsv4jax.sharding.mesh import MeshError

            raise MeshError(f"batch {rows} is not a multiple of dp={self.mesh.dp}; pad it to a multiple of dp")

    def place_params(self, params: nnx.State) -> nnx.State:
        """Parameters on the devices by the rules table (MeshError if the mesh does not divide the model);
        abstract ones (ShapeDtypeStructs) stay abstract, which is enough to lower and compile before loading."""
        if self.mesh is None:
            return params
        self.mesh.check_model(nnx.merge(self.graphdef, params).config)
        if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
            return params
        from dsv4jax.sharding.rules import param_shardings

        return jax.device_put(params, param_shardings(params, self.mesh, self.device_mesh))

    def place_state(self, state):
        """A decode state with its batch over dp."""
        if self.mesh is None:
            return state
        from dsv4jax.sharding.rules import state_shardings

        return jax.device_put(state, state_shardings(state, self.mesh, self.device_mesh))

    def replicate(self, tree):
        """Any pytree, a full copy on every device (the serving engine's caches: dp = 1)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.device_mesh, P()))

    # ---- the calls (traceable: compose them into larger jitted functions) ------------------------------------
    def target(self, params, state: DecodeState, ids, num_new, prefill: bool = True):
        """The target model over ids [B,S] at positions state.lengths + 0..S−1 (num_new [B] real): (hidden [B,S,D],
        streams [B,S,n,D], state). `prefill`: a prompt chunk, which a mesh splits over cp; otherwise (decode,
        verify) every cp rank runs the whole call (PARALLELISM §1: decode is not split)."""
        def body(model, layout, state, ids, num_new):
            return model(ids, state, num_new, layout)

        return self._call(body, params, state, (ids,), (num_new,), ids.shape[1], prefill)

    def mtp(self, params, state: DecodeState, streams, next_ids, num_new, prefill: bool = True):
        """The MTP module over main-model streams [B,S,n,D] paired with the next tokens [B,S] (ARCHITECTURE §12.1):
        (hidden, MTP streams, MTP state); under cp its prefill is split like the target's (PARALLELISM §5)."""
        def body(model, layout, state, streams, next_ids, num_new):
            return model.mtp_forward(streams, next_ids, state, num_new, layout)

        return self._call(body, params, state, (streams, next_ids), (num_new,), next_ids.shape[1], prefill)

    def logits(self, params, hidden):
        """fp32 logits of hidden states (the head is replicated, so no mesh is needed)."""
        return nnx.merge(self.graphdef, params).logits(hidden)

    def _call(self, body, params, state, tokens: tuple, rows: tuple, chunk: int, prefill: bool):
        if self.mesh is None:
            return body(nnx.merge(self.graphdef, params), TokenLayout(self.kernels), state, *tokens, *rows)
        from dsv4jax.sharding.layout import ShardedLayout
        from dsv4jax.sharding.rules import param_specs, spec, state_specs

        split = prefill and self.mesh.cp > 1
        if split:
            self.check_chunk(chunk)
            layout = ShardedLayout.prefill(self.mesh, chunk, self.kernels)
            tokens = tuple(layout.split.to_rank_major(t) for t in tokens)
        else:
            layout = ShardedLayout.replicated(self.mesh, self.kernels)
        graphdef, batch = self.graphdef, spec(("batch",), self.mesh)
        token_spec = spec(("batch", "prefill_tokens" if split else "decode_tokens"), self.mesh)
        states = state_specs(state, self.mesh)

        def mapped(params, state, *args):
            return body(nnx.merge(graphdef, params), layout, state, *args)

        in_specs = (param_specs(params, self.mesh), states, *(token_spec,) * len(tokens), *(batch,) * len(rows))
        return jax.shard_map(mapped, mesh=self.device_mesh, in_specs=in_specs, out_specs=(batch, batch, states),
                             check_vma=False)(params, state, *tokens, *rows)

    # ---- the paths with the LM head: `forward` etc. are these jitted; the *_fn compose into larger jits ---------
    def forward_fn(self, params, state, ids, num_new):
        """All-position fp32 logits [B,S,V], pre-head streams [B,S,n,D] (token order) and the new state."""
        hidden, streams, state = self.target(params, state, ids, num_new)
        return self.logits(params, hidden), streams, state

    def prefill_fn(self, params, state, ids, num_new):
        """A (possibly continued) prefill chunk: logits of each row's last real token [B,V], streams, state."""
        hidden, streams, state = self.target(params, state, ids, num_new)
        return self.logits(params, last_real(hidden, num_new)), streams, state

    def decode_fn(self, params, state, ids, active):
        """One token per sequence, ids [B]; rows with active == False leave their state unchanged."""
        hidden, streams, state = self.target(params, state, ids[:, None], active.astype(jnp.int32), prefill=False)
        return self.logits(params, hidden[:, 0]), streams[:, 0], state

    def mtp_forward_fn(self, params, mtp_state, streams, next_ids, num_new):
        """The MTP module over a prompt chunk: fp32 logits [B,S,V], MTP streams, MTP state."""
        hidden, mtp_streams, mtp_state = self.mtp(params, mtp_state, streams, next_ids, num_new)
        return self.logits(params, hidden), mtp_streams, mtp_state

