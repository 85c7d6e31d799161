"""Named-mesh parallelism on 8 fake CPU devices, fp32: every mesh gives the single-device results.

For each mesh: a batch of 3 sequences (lengths not divisible by the CP size) is prefilled in one CP chunk,
continued by a second CP chunk on top of the cached prefix (chunked prefill under CP), then decoded for 8
steps; logits, the real cache entries and the decode logits must equal the single-device run (rel L2 ≤ 1e-5).
Plus: the two SGLang bugs (#27191 slice-before-reduce, #24947 hash ids not permuted) are shown to break
parity, the compiled CP prefill holds the expected collectives, and parameter bytes shrink under ep/tp.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.sharding.data import shape_prefill
from dsv4jax.run import Runner as ModelRunner
from dsv4jax.sharding.mesh import MeshConfig, MeshError, make_mesh, parse_mesh_spec
from dsv4jax.sharding.moe import moe_partial, reduce_scatter_rows
from dsv4jax.sharding.params import device_bytes, init_sharded, shard_host_params
from numerics import rel_l2
from test_decode_consistency import CFG, JIT_OPTIONS, MAX_LEN, TOL, Runner, real_entries, state_rel, tokens

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")

FIRST = (157, 151, 139)  # first CP chunk per sequence (none divisible by 2, 4 or 8)
SECOND = (151, 157, 149)  # second chunk on top of the cached prefix: totals 308, 308, 288 (HCA rows at 128, 256)
DECODE_STEPS = 8

# Each CP mode at more than one size: round-robin at 2 (with tp and ep) and 8, zigzag at 4 (and at 4 with ep in
# test_engine.py).
MESHES = {
    "cp4-zigzag": ("cp=4", {"cp_mode": "zigzag"}),
    "cp8": ("cp=8", {}),
    "dp2-tp4": ("dp=2,tp=4", {}),
    "dp4-dp-attention": ("dp=4,tp=2", {"dp_attention": True}),
    "ep8": ("ep=8", {}),
    "dp2-cp2-ep2": ("dp=2,cp=2,ep=2", {}),
    "cp2-tp2-ep2": ("cp=2,tp=2,ep=2", {}),
    # MoE all-to-all mode (PARALLELISM §3.2): the dense all_to_all exchange on CPU (ragged_all_to_all is GPU-only)
    "dp2-cp2-ep2-all-to-all": ("dp=2,cp=2,ep=2", {"moe_mode": "all_to_all"}),
}


def mesh_of(spec: str, **options):
    config = parse_mesh_spec(spec, **options)
    return config, make_mesh(config, jax.devices()[:config.size])


@pytest.fixture(scope="module")
def reference():
    """The single-device run (device 0) and the host copy of its parameters."""
    run = Runner()
    graphdef = nnx.split(nnx.eval_shape(lambda: DeepseekV4(CFG, nnx.Rngs(0))))[0]
    first, second = tokens(101, (3, max(FIRST))), tokens(102, (3, max(SECOND)))
    steps = tokens(103, (3, DECODE_STEPS))
    logits1, streams1, state1 = run.forward(first, init_state(CFG, 3, MAX_LEN), FIRST)
    logits2, _, state2 = run.forward(second, state1, SECOND)
    decoded, state = [], state2
    for k in range(DECODE_STEPS):
        logits, _, state = run.forward(steps[:, k:k + 1], state)
        decoded.append(logits[:, 0])
    return dict(run=run, graphdef=graphdef, host_params=jax.device_get(run.params), first=first, second=second,
                steps=steps, logits1=logits1, streams1=streams1, state1=state1, logits2=logits2, state2=state2,
                decoded=np.stack(decoded, 1), final=state)


def real_logits_rel(ours, ref, lengths) -> float:
    return max(rel_l2(np.asarray(ours)[i, :n], ref[i, :n]) for i, n in enumerate(lengths))


def cache_rel(ours, ref, lengths) -> float:
    return max(state_rel(real_entries(ours, i, n), real_entries(ref, i, n)) for i, n in enumerate(lengths))


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_matches_single_device(reference, name):
    spec, options = MESHES[name]
    mesh, device_mesh = mesh_of(spec, **options)
    ref = reference
    runner = ModelRunner(ref["graphdef"], mesh, device_mesh.devices.flat, compiler_options=JIT_OPTIONS)
    params = shard_host_params(ref["host_params"], mesh, device_mesh)

    ids, num_new = shape_prefill(ref["first"], FIRST, mesh)
    state = init_state(CFG, ids.shape[0], MAX_LEN)
    logits, streams, state = runner.forward(params, state, ids, num_new)
    r_prefill = real_logits_rel(logits, ref["logits1"], FIRST)
    r_streams = real_logits_rel(streams, ref["streams1"], FIRST)
    r_cache = cache_rel(state, ref["state1"], FIRST)

    ids, num_new = shape_prefill(ref["second"], SECOND, mesh)  # same padded chunk length: no new compile
    logits, _, state = runner.forward(params, state, ids, num_new)
    totals = [a + b for a, b in zip(FIRST, SECOND)]
    r_prefix = real_logits_rel(logits, ref["logits2"], SECOND)
    r_prefix_cache = cache_rel(state, ref["state2"], totals)

    batch = ids.shape[0]
    active = np.arange(batch) < 3
    steps = np.zeros((batch, DECODE_STEPS), np.int32)
    steps[:3] = ref["steps"]
    decoded = []
    for k in range(DECODE_STEPS):
        step_logits, _, state = runner.decode(params, state, steps[:, k], active)
        decoded.append(np.asarray(step_logits)[:3])
    r_decode = rel_l2(np.stack(decoded, 1), ref["decoded"])
    r_final = cache_rel(state, ref["final"], [n + DECODE_STEPS for n in totals])
    print(f"\n[{name}] prefill {r_prefill:.1e} streams {r_streams:.1e} cache {r_cache:.1e} | prefix-chunk "
          f"{r_prefix:.1e} cache {r_prefix_cache:.1e} | {DECODE_STEPS} decode {r_decode:.1e} cache {r_final:.1e}")
    assert max(r_prefill, r_streams, r_cache, r_prefix, r_prefix_cache, r_decode, r_final) <= TOL
    np.testing.assert_array_equal(np.asarray(state.lengths)[:3], np.array(totals) + DECODE_STEPS)


def test_mtp_prefill_under_cp_matches_single_device(reference):
    """PARALLELISM §5: the MTP module's prefill pass is split over cp and gathered like the main model's."""
    ref = reference
    mesh, device_mesh = mesh_of("cp=4", cp_mode="zigzag")
    runner = ModelRunner(ref["graphdef"], mesh, device_mesh.devices.flat, compiler_options=JIT_OPTIONS)
    params = shard_host_params(ref["host_params"], mesh, device_mesh)
    next_ids = np.zeros_like(ref["first"])
    next_ids[:, :-1] = ref["first"][:, 1:]
    expected, expected_streams, expected_state = ref["run"].mtp(ref["streams1"], next_ids,
                                                                init_state(CFG, 3, MAX_LEN, mtp=True), FIRST)
    ids, num_new = shape_prefill(next_ids, FIRST, mesh)
    streams = np.pad(ref["streams1"], ((0, 0), (0, ids.shape[1] - next_ids.shape[1]), (0, 0), (0, 0)))
    logits, mtp_streams, state = runner.mtp_forward(params, init_state(CFG, 3, MAX_LEN, mtp=True), streams, ids,
                                                    num_new)
    r = real_logits_rel(logits, expected, FIRST)
    r_streams = real_logits_rel(mtp_streams, expected_streams, FIRST)
    r_state = max(state_rel(real_entries(state, i, n, mtp=True), real_entries(expected_state, i, n, mtp=True))
                  for i, n in enumerate(FIRST))
    print(f"\n[mtp cp4 zigzag] logits {r:.1e} streams {r_streams:.1e} state {r_state:.1e}")
    assert max(r, r_streams, r_state) <= TOL


# ---- the MoE collectives in isolation ------------------------------------------------------------------------

def _moe_case(layer: int, mesh_spec: str, **options):
    """A block's MoE, tokens [B,S,D] and ids, the single-device MoE output, the mesh and the sharded MoE params."""
    model = DeepseekV4(CFG.replace(scan_layers=False), nnx.Rngs(3))
    moe = model.groups[layer].blocks[0].ffn  # unscanned: group L is layer L
    x = jax.random.normal(jax.random.key(9), (4, 16, CFG.hidden_size), jnp.float32)
    ids = jnp.asarray(tokens(104, (4, 16)))
    expected = np.asarray(moe(x, ids))
    mesh, device_mesh = mesh_of(mesh_spec, **options)
    graphdef, params = nnx.split(moe)
    return graphdef, shard_host_params(jax.device_get(params), mesh, device_mesh), x, ids, expected, mesh, device_mesh


def _run_moe(graphdef, params, mesh, device_mesh, token_spec, fn, x, ids):
    from dsv4jax.sharding.rules import param_specs

    def body(params, x, ids):
        return fn(nnx.merge(graphdef, params), x, ids)

    mapped = jax.shard_map(body, mesh=device_mesh, in_specs=(param_specs(params, mesh), token_spec, token_spec),
                           out_specs=token_spec, check_vma=False)
    return np.asarray(jax.jit(mapped)(params, x, ids))


def test_moe_output_is_reduced_before_it_is_sliced():
    """SGLang #27191 (DP attention + TP MoE): slicing the gathered rows' *unreduced* partial sums back to each dp
    rank (dp_scatter instead of reduce-scatter) is wrong; the reduce-scatter is exact."""
    from dsv4jax.sharding.moe import MoECollective

    graphdef, params, x, ids, expected, mesh, device_mesh = _moe_case(1, "dp=4,tp=2", dp_attention=True)
    collective = MoECollective.for_tokens(mesh, ("dp",))
    assert collective.gather_axes == ("dp",) and collective.reduce_axes == ("tp",)
    right = _run_moe(graphdef, params, mesh, device_mesh, P("dp"), collective, x, ids)

    def slice_unreduced(moe, x, ids):  # the pre-#27191 V4 path: dp_scatter of a partial sum
        flat = jax.lax.all_gather(x.reshape(-1, x.shape[-1]), "dp", axis=0, tiled=True)
        flat_ids = jax.lax.all_gather(ids.reshape(-1), "dp", axis=0, tiled=True)
        partial = moe_partial(moe, flat, flat_ids, (), ())
        mine = jax.lax.dynamic_slice_in_dim(partial, jax.lax.axis_index("dp") * x.shape[0] * x.shape[1],
                                            x.shape[0] * x.shape[1])
        return jax.lax.psum(mine, "tp").astype(x.dtype).reshape(x.shape)

    wrong = _run_moe(graphdef, params, mesh, device_mesh, P("dp"), slice_unreduced, x, ids)
    print(f"\n[#27191] reduce-scatter rel {rel_l2(right, expected):.1e}; "
          f"slice before reduce rel {rel_l2(wrong, expected):.1e}")
    assert rel_l2(right, expected) <= TOL
    assert rel_l2(wrong, expected) > 0.1


def test_hash_routing_ids_travel_with_gathered_tokens():
    """SGLang #24947: under CP the gathered tokens are rank-major, so hash routing (layer 0) must use ids in the
    same order; ids in token order route the wrong experts."""
    from dsv4jax.sharding.context import SequenceSplit
    from dsv4jax.sharding.moe import MoECollective

    graphdef, params, x, ids, expected, mesh, device_mesh = _moe_case(0, "cp=4")
    split = SequenceSplit("round_robin", 4, 16)
    collective = MoECollective.for_tokens(mesh, ("dp", "cp"))
    assert collective.gather_axes == ("cp",)
    local_x, local_ids = split.to_rank_major(x), split.to_rank_major(ids)
    right = split.from_rank_major(jnp.asarray(
        _run_moe(graphdef, params, mesh, device_mesh, P(None, "cp"), collective, local_x, local_ids)))

    def ids_in_token_order(moe, x, ids):  # gathers the tokens, but routes with un-permuted (token-order) ids
        flat = jax.lax.all_gather(x, "cp", axis=1, tiled=True).reshape(-1, x.shape[-1])
        token_ids = split.from_rank_major(jax.lax.all_gather(ids, "cp", axis=1, tiled=True)).reshape(-1)
        partial = moe_partial(moe, flat, token_ids, ("cp",), (4,)).reshape(x.shape[0], -1, x.shape[-1])
        return reduce_scatter_rows(partial.swapaxes(0, 1), ("cp",), ()).swapaxes(0, 1).astype(x.dtype)

    wrong = split.from_rank_major(jnp.asarray(
        _run_moe(graphdef, params, mesh, device_mesh, P(None, "cp"), ids_in_token_order, local_x, local_ids)))
    print(f"\n[#24947] ids gathered with tokens rel {rel_l2(right, expected):.1e}; token-order ids rel "
          f"{rel_l2(wrong, expected):.1e}")
    assert rel_l2(right, expected) <= TOL
    assert rel_l2(wrong, expected) > 0.1


# ---- mesh checks, compiled collectives, parameter bytes -------------------------------------------------------

@pytest.mark.skipif(jax.default_backend() != "gpu" or jax.device_count() < 2,
                    reason="jax.lax.ragged_all_to_all is not implemented on XLA:CPU; needs ≥ 2 GPUs")
def test_ragged_all_to_all_exchange_matches_the_moe():
    from dsv4jax.sharding.moe import MoECollective

    n = 2 if jax.device_count() < 4 else 4
    graphdef, params, x, ids, expected, mesh, device_mesh = _moe_case(1, f"cp={n}", moe_mode="all_to_all")
    collective = MoECollective.for_tokens(mesh, ("dp", "cp"))
    out = _run_moe(graphdef, params, mesh, device_mesh, P(None, "cp"), collective, x, ids)
    assert rel_l2(out, expected) <= TOL


def test_an_all_to_all_mesh_prefers_the_decomposed_ragged_all_to_all():
    """The one-shot ragged all-to-all kernel is ~10× slower within a host (mesh.py); building an all-to-all mesh
    before XLA starts asks XLA for the decomposition, a user's own setting of that flag stands, and a mesh built
    after XLA started says that the flag came too late. Importing dsv4jax changes no environment variable."""
    import subprocess
    import sys

    from dsv4jax.sharding.mesh import DECOMPOSE_RAGGED_ALL_TO_ALL

    script = """if True:
        import os, sys, warnings
        before = dict(os.environ)
        import dsv4jax
        from dsv4jax.sharding.mesh import make_mesh, parse_mesh_spec
        assert dict(os.environ) == before, "import dsv4jax changed os.environ"
        import jax
        if sys.argv[1] == "late":
            jax.devices()  # XLA starts
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_mesh(parse_mesh_spec("ep=2", moe_mode="all_to_all"))
        print(os.environ["XLA_FLAGS"])
        print(" ".join(str(w.message) for w in caught))
    """

    def run(flags, case="early"):
        out = subprocess.run([sys.executable, "-c", script, case], env=dict(os.environ, XLA_FLAGS=flags),
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    devices = "--xla_force_host_platform_device_count=2"
    assert run(devices) == [f"{devices} {DECOMPOSE_RAGGED_ALL_TO_ALL}", ""]
    own = f"{devices} --xla_gpu_unsupported_enable_ragged_all_to_all_decomposer=false"
    assert run(own) == [own, ""]
    flags, warning = run(devices, "late")
    assert flags == devices and "XLA started before this all-to-all mesh was built" in warning


def test_mesh_spec_errors_name_the_problem_and_the_fix():
    with pytest.raises(MeshError, match="needs 2 devices but 8 are given"):
        make_mesh(parse_mesh_spec("cp=2"))
    with pytest.raises(MeshError, match="unknown mesh axis 'sp'"):
        parse_mesh_spec("sp=2")
    with pytest.raises(MeshError, match="does not divide n_routed_experts=8"):
        MeshConfig(cp=3).check_model(CFG)
    with pytest.raises(MeshError, match="moe_intermediate_size=32 .* lower tp"):
        MeshConfig(tp=3).check_model(CFG)
    with pytest.raises(MeshError, match="all_to_all.*dp_attention=False"):
        MeshConfig(dp=2, dp_attention=True, moe_mode="all_to_all")
    with pytest.raises(MeshError, match="not a multiple of dp=2"):
        ModelRunner(nnx.graphdef(DeepseekV4(CFG.replace(num_hidden_layers=1, compress_ratios=(0, 0)), nnx.Rngs(0))),
                    "dp=2", jax.devices()[:2]).check_batch(3)


def test_compiled_cp_prefill_gathers_caches_and_reduce_scatters_the_moe(reference):
    """The compiled CP prefill all-gathers over cp the K=V rows (head_dim), the compressor inputs (CSA 2·2·d,
    HCA 2·d) and the indexer's compressor inputs (2·2·d_I), and reduce-scatters the MoE output over cp."""
    import re

    mesh, device_mesh = mesh_of("cp=4")
    runner = ModelRunner(reference["graphdef"], mesh, device_mesh.devices.flat, compiler_options=JIT_OPTIONS)
    params = shard_host_params(reference["host_params"], mesh, device_mesh)
    ids, num_new = shape_prefill(reference["first"], FIRST, mesh)
    hlo = runner.forward.lower(params, init_state(CFG, 3, MAX_LEN), ids, num_new).compile().as_text()
    gathered = set()
    for line in hlo.splitlines():
        if re.search(r"\ball-gather(-start)?\(", line):
            result_type = line.split("=")[1].split("all-gather")[0]
            gathered.update(int(d) for d in re.findall(r"f32\[3,160,(\d+)\]", result_type))
    hd, d_i = CFG.head_dim, CFG.index_head_dim
    expected = {"K=V": hd, "CSA compressor": 4 * hd, "HCA compressor": 2 * hd, "indexer compressor": 4 * d_i}
    print(f"\n[hlo] all-gathered widths {sorted(gathered)}; expected {expected}")
    assert set(expected.values()) <= gathered
    assert re.search(r"\breduce-scatter(-start)?\(", hlo), "no reduce-scatter for the MoE output"


@pytest.mark.parametrize("spec,factor", [("ep=8", 8), ("cp=2,tp=2,ep=2", 8), ("dp=2,tp=4", 4)])
def test_parameter_bytes_shrink_under_ep_and_tp(reference, spec, factor):
    mesh, device_mesh = mesh_of(spec)
    params = shard_host_params(reference["host_params"], mesh, device_mesh)
    flat = dict(nnx.to_flat_state(reference["host_params"]))
    moe_bytes = sum(v.get_value().nbytes for p, v in flat.items() if any("experts" in str(k) for k in p))
    other_bytes = sum(v.get_value().nbytes for p, v in flat.items() if not any("experts" in str(k) for k in p))
    for device in device_mesh.devices.flat:
        assert device_bytes(params, device) == other_bytes + moe_bytes // factor


def test_sharded_init_equals_unsharded_and_never_holds_whole_experts():
    config = CFG.replace(num_hidden_layers=1, compress_ratios=(4, 0))  # one CSA layer + MTP: a quick compile
    mesh, device_mesh = mesh_of("ep=8")
    graphdef, params = init_sharded(config, mesh, device_mesh, seed=0)
    # The same initialisers jitted without shardings (jitted random init differs from eager NNX init).
    expected = dict(nnx.to_flat_state(jax.jit(lambda: nnx.split(DeepseekV4(config, nnx.Rngs(0)))[1])()))
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path].get_value()), err_msg=str(path))
        if "experts" in path:  # routed experts: one eighth per device
            assert all(s.data.size * 8 == value.size for s in value.addressable_shards), path


def test_sharded_checkpoint_loading_sends_each_device_its_shards(reference, tmp_path):
    from dsv4jax.checkpoint.loader import load_model
    from dsv4jax.checkpoint.writer import save_checkpoint
    from dsv4jax.sharding.params import load_sharded

    model = nnx.merge(reference["graphdef"], reference["host_params"])
    save_checkpoint(model, tmp_path)
    expected = dict(nnx.to_flat_state(nnx.state(load_model(tmp_path, dtype="float32", progress=False))))
    mesh, device_mesh = mesh_of("cp=2,tp=2,ep=2")
    config, _, params = load_sharded(tmp_path, mesh, device_mesh, dtype="float32", progress=False)
    assert config.n_routed_experts == CFG.n_routed_experts
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path].get_value()), err_msg=str(path))
        if any("experts" in str(k) for k in path):
            assert all(s.data.size * 8 == value.size for s in value.addressable_shards), path
