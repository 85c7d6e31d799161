"""The MoE sub-layer's jaxpr under each placement, to check that a refactor leaves the traced computation as it was.

    python -m bench.moe_jaxprs OUT_DIR             # writes one normalised jaxpr text per case
    diff -r BEFORE_DIR AFTER_DIR                  # the comparison

Cases: one device; gather mode (cp=2,ep=2 prefill and decode, tp=2, dp=2 with DP attention); all-to-all mode
(cp=2,ep=2 prefill and decode) with the dense CPU exchange and with the GPU's ragged exchange (forced here:
`ragged_all_to_all` traces on CPU although it cannot run there). Tracing only, on 8 fake CPU devices.
Variables are renamed in order of first appearance, so only the computation is compared.
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from dsv4jax.config import load_config  # noqa: E402
from dsv4jax.model.moe import MoE  # noqa: E402
from dsv4jax.sharding import all_to_all  # noqa: E402
from dsv4jax.sharding.layout import ShardedLayout  # noqa: E402
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec  # noqa: E402
from dsv4jax.sharding.rules import param_specs  # noqa: E402

CONFIG = load_config("configs/test-tiny.json", dtype="float32")
LAYER = 1  # score routing (layer 0 is a hash layer: traced too, as `-hash` cases)

# name: (mesh spec, mesh options, prefill (tokens split over dp and cp) or decode (over dp))
CASES = {
    "gather-cp2-ep2-prefill": ("cp=2,ep=2", {}, True),
    "gather-cp2-ep2-decode": ("cp=2,ep=2", {}, False),
    "gather-tp2": ("tp=2", {}, True),
    "gather-dp2-tp2-dp-attention": ("dp=2,tp=2", {"dp_attention": True}, False),
    "all-to-all-cp2-ep2-prefill": ("cp=2,ep=2", {"moe_mode": "all_to_all"}, True),
    "all-to-all-cp2-ep2-decode": ("cp=2,ep=2", {"moe_mode": "all_to_all"}, False),
}


def normalised(text: str) -> str:
    """Rename jaxpr variables (a, b, …, ba, …) in order of first appearance."""
    names: dict[str, str] = {}

    def rename(match):
        return names.setdefault(match.group(0), f"v{len(names)}")

    return re.sub(r"(?<![\w.])[a-z]{1,3}(?![\w.(=\[])(?=[\s:,)\]]|$)", rename, text)


def layout_call(moe, x, ids, layout):
    if hasattr(layout, "moe_collectives"):  # one composition: the layout hands the MoE its collectives
        return moe(x, ids, layout.moe_collectives)
    return layout.moe(moe, x, ids)


def trace(layer: int, spec: str | None, options: dict, prefill: bool) -> str:
    moe = MoE(CONFIG, layer, jnp.float32, nnx.Rngs(0))
    graphdef, params = nnx.split(moe)
    x = jnp.zeros((4, 16, CONFIG.hidden_size), jnp.float32)
    ids = jnp.zeros((4, 16), jnp.int32)
    if spec is None:
        return str(jax.make_jaxpr(lambda p, x, ids: nnx.merge(graphdef, p)(x, ids))(params, x, ids))
    mesh = parse_mesh_spec(spec, **options)
    device_mesh = make_mesh(mesh, jax.devices()[:mesh.size])
    layout = ShardedLayout.prefill(mesh, 16) if prefill else ShardedLayout.replicated(mesh)
    tokens = P("dp", "cp") if prefill else P("dp")

    def body(p, x, ids):
        return layout_call(nnx.merge(graphdef, p), x, ids, layout)

    mapped = jax.shard_map(body, mesh=device_mesh, in_specs=(param_specs(params, mesh), tokens, tokens),
                           out_specs=tokens, check_vma=False)
    return str(jax.make_jaxpr(mapped)(params, x, ids))


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cases = {"one-device": (None, {}, True), **CASES}
    dense = all_to_all._dense_exchange
    for layer, suffix in ((LAYER, ""), (0, "-hash")):
        for name, (spec, options, prefill) in cases.items():
            texts = {name: trace(layer, spec, options, prefill)}
            if "all-to-all" in name:  # the GPU exchange, forced
                all_to_all._dense_exchange = all_to_all._ragged_exchange
                try:
                    texts[name.replace("all-to-all", "all-to-all-ragged")] = trace(layer, spec, options, prefill)
                finally:
                    all_to_all._dense_exchange = dense
            for case, text in texts.items():
                with open(os.path.join(out_dir, case + suffix + ".jaxpr"), "w") as f:
                    f.write(normalised(text) + "\n")
                print(f"{case + suffix}: {text.count(chr(10))} lines")


if __name__ == "__main__":
    main(sys.argv[1])
