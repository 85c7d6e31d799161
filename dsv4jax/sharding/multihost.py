"""Several processes, one mesh: `jax.distributed` start-up, global inputs, and a runnable demonstration.

The sharded code is the same as in one process: the mesh spans every process's devices (`jax.devices()`), and
inputs become global arrays with `jax.make_array_from_callback` (each process supplies its devices' slices
from the same host values). On CPU the cross-process collectives use gloo.

Two processes × 4 CPU devices on one machine (the mesh needs 8 devices):

    for i in 0 1; do
      .venv/bin/python -m dsv4jax.sharding.multihost --coordinator 127.0.0.1:12355 --num-processes 2 \\
          --process-id $i --local-devices 4 --mesh cp=4,ep=2 --out /tmp/logits.npy &
    done; wait

One process with 8 devices gives the same logits: `--num-processes 1 --process-id 0 --local-devices 8`.
On GPU hosts leave out --local-devices and use each host's address for --coordinator.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def initialize(coordinator: str, num_processes: int, process_id: int, local_cpu_devices: int | None = None,
               heartbeat_timeout_s: int = 100) -> None:
    """Call before anything else touches JAX. `local_cpu_devices`: fake CPU devices per process (tests).

    `heartbeat_timeout_s`: how long the coordinator waits for a silent process before it stops them all; on an
    overloaded host (a CI machine compiling for several processes on 2 cores) JAX's 100 s default can expire
    although every process is alive.
    """
    if local_cpu_devices:
        jax.config.update("jax_num_cpu_devices", local_cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)


def replicated(tree, device_mesh):
    """Host values (identical in every process) -> global arrays replicated over the mesh."""
    from dsv4jax.sharding.params import host_to_global

    sharding = NamedSharding(device_mesh, P())
    return jax.tree.map(lambda value: host_to_global(value, sharding), tree)


def local_value(array: jax.Array) -> np.ndarray:
    """The value of an output that is replicated over the mesh (every process holds a full copy)."""
    return np.asarray(array.addressable_shards[0].data)


def demo_prefill_logits(mesh_spec: str, config_path: str, lengths=(157, 151, 139), seed: int = 0,
                        **mesh_options) -> np.ndarray:
    """A CP prefill of a fixed batch on the tiny config (fp32, random weights from `seed`): logits [B,S,V]."""
    from dsv4jax.config import load_config
    from dsv4jax.model import init_state
    from dsv4jax.run import Runner
    from dsv4jax.sharding.data import shape_prefill
    from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec
    from dsv4jax.sharding.params import init_sharded

    config = load_config(config_path, dtype="float32")
    mesh = parse_mesh_spec(mesh_spec, **mesh_options)
    graphdef, params = init_sharded(config, mesh, make_mesh(mesh), seed)
    runner = Runner(graphdef, mesh, compiler_options={"xla_backend_optimization_level": 0})
    ids = np.random.default_rng(seed + 1).integers(0, config.vocab_size, (len(lengths), max(lengths))).astype(np.int32)
    ids, num_new = shape_prefill(ids, lengths, mesh)
    state = replicated(init_state(config, ids.shape[0], 320), runner.device_mesh)
    logits, _, _ = runner.forward(params, state, *replicated((ids, num_new), runner.device_mesh))
    return local_value(logits)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", default="127.0.0.1:12355")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--local-devices", type=int, default=None, help="fake CPU devices per process")
    parser.add_argument("--mesh", default="cp=4,ep=2")
    parser.add_argument("--cp-mode", default="round_robin")
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                                         "test-tiny.json"))
    parser.add_argument("--out", default=None, help="process 0 writes the logits here (.npy)")
    parser.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds (jax.distributed)")
    args = parser.parse_args(argv)
    initialize(args.coordinator, args.num_processes, args.process_id, args.local_devices, args.heartbeat_timeout)
    logits = demo_prefill_logits(args.mesh, args.config, cp_mode=args.cp_mode)
    print(f"process {jax.process_index()}/{jax.process_count()}: {jax.device_count()} devices, "
          f"logits {logits.shape}, checksum {float(np.sum(logits.astype(np.float64))):.6f}", flush=True)
    if args.out and jax.process_index() == 0:
        np.save(args.out, logits)
    if args.num_processes > 1:
        jax.distributed.shutdown()  # every process leaves together (a barrier), not one by one at exit


if __name__ == "__main__":
    main()
