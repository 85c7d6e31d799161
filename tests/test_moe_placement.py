"""Where the MoE's experts live (dsv4jax/model/moe.py `ExpertPlacement`, `Collectives`) on 8 fake CPU devices, fp32:
pairs of experts held elsewhere are computed nowhere, every placement gives the one-device MoE, and the mesh code
(dsv4jax/sharding/) composes nothing of the MoE itself."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv4jax.config import load_config
from dsv4jax.model.moe import ONE_DEVICE, ExpertPlacement, MoE
from dsv4jax.sharding.layout import ShardedLayout
from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec
from dsv4jax.sharding.moe import MoECollective
from dsv4jax.sharding.rules import param_specs
from numerics import rel_l2

CFG = load_config("configs/test-tiny.json", dtype="float32")  # 8 routed experts, top-2, one shared expert
TOL = 1e-6
SHARDING = pathlib.Path(__file__).resolve().parents[1] / "dsv4jax" / "sharding"

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def _moe(layer: int):
    moe = MoE(CFG, layer, jnp.float32, nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(9), (4, 16, CFG.hidden_size), jnp.float32)
    ids = jax.random.randint(jax.random.key(10), (4, 16), 0, CFG.vocab_size)
    return moe, x, ids


def _shard_mapped(moe, spec: str, options: dict, token_spec, body):
    """jit(shard_map(body)) over the mesh `spec`, with the MoE's parameters sharded as in the model."""
    mesh = parse_mesh_spec(spec, **options)
    device_mesh = make_mesh(mesh, jax.devices()[:mesh.size])
    graphdef, params = nnx.split(moe)

    def mapped(params, x, ids):
        return body(mesh, nnx.merge(graphdef, params), x, ids)

    fn = jax.shard_map(mapped, mesh=device_mesh, in_specs=(param_specs(params, mesh), token_spec, token_spec),
                       out_specs=token_spec, check_vma=False)
    return lambda x, ids: np.asarray(jax.jit(fn)(params, x, ids))


def test_placement_localizes_its_block_and_drops_the_rest():
    experts = jnp.asarray([[0, 3], [4, 7], [5, 2]], jnp.int32)
    block = ExpertPlacement(count=2, offset=jnp.int32(4))  # experts 4, 5 of 8
    assert block.drop_id == 2
    np.testing.assert_array_equal(block.localize(experts), [[2, 2], [0, 2], [1, 2]])
    np.testing.assert_array_equal(block.owner(experts), [[0, 1], [2, 3], [2, 1]])
    np.testing.assert_array_equal(block.local(experts), [[0, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(ExpertPlacement(8).localize(experts), experts)  # one device: ids are local


@needs_8
@pytest.mark.parametrize("spec", ["ep=4", "cp=2,ep=2"])
def test_pairs_of_experts_held_elsewhere_are_computed_nowhere(spec):
    """Each device gives the routing weights of other devices' pairs as NaN: its routed partial stays finite (those
    pairs carry the drop id and are skipped), and the partials add up to the one-device routed output."""
    moe, x, ids = _moe(1)
    flat = x.reshape(-1, x.shape[-1])
    experts, weights = moe.gate(flat, ids.reshape(-1))
    expected = np.asarray(moe.experts(flat, experts, weights))

    def body(mesh, moe, x, ids):
        c = MoECollective.for_tokens(mesh, ())  # tokens replicated: every device sees every pair
        experts, weights = moe.gate(x, ids)
        placement = c.placement(moe.experts.count)
        held_here = (experts >= placement.offset) & (experts < placement.offset + placement.count)
        poisoned = jnp.where(held_here, weights, jnp.nan)
        partial = c.exchange(x, experts, poisoned, placement, moe.experts)
        return jax.lax.psum(partial, c.expert_axes)

    out = _shard_mapped(moe, spec, {}, P(), body)(flat, ids.reshape(-1))
    assert np.isfinite(out).all()
    assert rel_l2(out, expected) <= TOL


PLACEMENTS = {  # name: (mesh spec, options, prefill: tokens split over dp and cp; else over dp only)
    "gather-cp2-ep2-prefill": ("cp=2,ep=2", {}, True),
    "gather-cp2-ep2-decode": ("cp=2,ep=2", {}, False),
    "gather-tp2": ("tp=2", {}, True),
    "gather-dp2-tp2-dp-attention": ("dp=2,tp=2", {"dp_attention": True}, False),
    "all-to-all-cp2-ep2-prefill": ("cp=2,ep=2", {"moe_mode": "all_to_all"}, True),
    "all-to-all-cp2-ep2-decode": ("cp=2,ep=2", {"moe_mode": "all_to_all"}, False),
    "all-to-all-dp2-ep4": ("dp=2,ep=4", {"moe_mode": "all_to_all"}, False),
}


@needs_8
@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "score"])
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_every_placement_gives_the_one_device_moe(name, layer):
    spec, options, prefill = PLACEMENTS[name]
    moe, x, ids = _moe(layer)
    expected = np.asarray(moe(x, ids, ONE_DEVICE))

    def body(mesh, moe, x, ids):
        layout = ShardedLayout.prefill(mesh, x.shape[1] * mesh.cp) if prefill else ShardedLayout.replicated(mesh)
        return moe(x, ids, layout.moe_collectives)

    out = _shard_mapped(moe, spec, options, P("dp", "cp") if prefill else P("dp"), body)(x, ids)
    print(f"\n[{name} {layer=}] rel {rel_l2(out, expected):.1e}")
    assert rel_l2(out, expected) <= TOL


def _sources():
    return sorted(SHARDING.glob("*.py"))


def test_the_mesh_code_never_reaches_into_the_moe():
    """dsv4jax/sharding/ contributes collectives over arrays: no `.gate`, `.experts`, `.shared_experts`."""
    found = [f"{path.name}:{node.lineno} .{node.attr}" for path in _sources()
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in ("gate", "experts", "shared_experts")]
    assert not found, found


def test_the_moe_collectives_do_not_import_each_other_in_a_cycle():
    def imports(name):
        tree = ast.parse((SHARDING / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert "dsv4jax.sharding.all_to_all" in imports("moe")
    assert "dsv4jax.sharding.moe" not in imports("all_to_all")
