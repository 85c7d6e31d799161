"""Named-mesh parallelism for DeepSeek-V4 (docs/PARALLELISM.md).

One concept per file:
- `mesh`: the `dp, cp, tp, ep` mesh from a spec string, with its checks;
- `rules`: the one table of logical axis -> mesh axes (parameters, caches, activations);
- `params`: sharded initialisation and sharded checkpoint loading, per-device bytes;
- `context`: context-parallel token splits (round-robin, zigzag) and their gathers (PARALLELISM §1);
- `moe`: the MoE collectives under CP/DP (gather + reduce-scatter, all-to-all) (PARALLELISM §3, PARALLELISM §4);
- `layout`: the `TokenLayout` the model sees inside `shard_map` (split + MoE collective);
- `data`: host-side padding of a batch to the mesh;
- `multihost`: `jax.distributed` start-up for several processes.
- `all_to_all`: the MoE all-to-all mode (ragged_all_to_all on GPU, a dense all_to_all on CPU).
Collectives appear only in `context`, `moe` and `all_to_all`; the one `shard_map` boundary is the runner's
(dsv4jax/run.py). Nothing here imports `dsv4jax.serve` or `dsv4jax.eval`.

Use (through the one runner, dsv4jax/run.py):

    mesh = parse_mesh_spec("dp=1,cp=4,tp=1,ep=2", cp_mode="zigzag")   # dp_attention=, moe_mode=
    graphdef, params = params.init_sharded(config, mesh, make_mesh(mesh))  # or params.load_sharded(path, ...)
    runner = Runner(graphdef, mesh)                      # MeshError if the sizes do not fit the devices
    ids, num_new = data.shape_prefill(ids, lengths, runner.mesh)       # rows to dp, chunk to C / 2C
    logits, streams, state = runner.prefill(params, runner.place_state(init_state(config, B, max_len)), ids, num_new)
    logits, streams, state = runner.decode(params, state, next_ids, active)
"""

from dsv4jax.sharding.mesh import MeshConfig, MeshError, make_mesh, parse_mesh_spec

__all__ = ["MeshConfig", "MeshError", "make_mesh", "parse_mesh_spec"]
