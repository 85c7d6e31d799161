"""The kernel choice per call (`implementation=` of each op) and the guards on dsv4jax/pallas: no environment reads,
no debugging scripts in the package. On the CPU "auto" is the reference and "pallas" runs the Mosaic GPU interpreter.
"""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import rel_l2

import dsv4jax.pallas as pallas
from dsv4jax import compat
from dsv4jax.pallas.indexer_topk import indexer_topk, indexer_topk_reference
from dsv4jax.pallas.moe_gmm import routed_experts, routed_experts_reference
from dsv4jax.pallas.sparse_attention import sparse_attention, sparse_attention_reference

PACKAGE = Path(pallas.__file__).resolve().parent
ROOT = PACKAGE.parent


def _attention(H=16, d=128, B=1, S=2, N=80, K=40, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, S, H, d), dtype)
    kv = jax.random.normal(ks[1], (B, N, d), dtype)
    idx = jax.random.randint(ks[2], (B, S, K), -1, N, dtype=jnp.int32)
    return q, kv, idx, jax.random.normal(ks[3], (H,), jnp.float32), d ** -0.5


def _indexer(d=32, B=1, S=4, H=8, N=16):
    ks = jax.random.split(jax.random.key(4), 3)
    return (jax.random.normal(ks[0], (B, S, H, d), jnp.bfloat16), jax.random.normal(ks[1], (B, S, H), jnp.float32),
            jax.random.normal(ks[2], (B, N, d), jnp.bfloat16), jnp.full((B, S), N, jnp.int32), 4)


def _moe(dtype=jnp.float32, T=5, E=4, D=128, I=128):
    ks = jax.random.split(jax.random.key(5), 6)
    x = jax.random.normal(ks[0], (T, D), dtype)
    experts = jax.random.randint(ks[1], (T, 2), 0, E, dtype=jnp.int32)
    weights = jax.random.uniform(ks[2], (T, 2))
    w1 = (jax.random.normal(ks[3], (E, I, D)) * D ** -0.5).astype(dtype)
    w3 = (jax.random.normal(ks[4], (E, I, D)) * D ** -0.5).astype(dtype)
    w2 = (jax.random.normal(ks[5], (E, D, I)) * I ** -0.5).astype(dtype)
    return x, experts, weights, w1, w3, w2, 1.5


OPS = {
    "sparse_attention": (sparse_attention, _attention, lambda q, kv, idx, sink, scale: sparse_attention_reference(
        q, kv, idx, sink, scale)),
    "indexer_topk": (indexer_topk, _indexer, indexer_topk_reference),
    "routed_experts": (routed_experts, _moe, routed_experts_reference),
}


@pytest.mark.parametrize("op", list(OPS))
def test_unknown_implementation_is_refused(op):
    fn, inputs, _ = OPS[op]
    with pytest.raises(ValueError, match=f"{op}: implementation='triton'; choose one of auto, reference, pallas"):
        fn(*inputs(), implementation="triton")


UNSUPPORTED = {  # op -> (inputs the kernel does not take, the reason in the message)
    "sparse_attention": (lambda: _attention(d=64), "d must be 128, 256 or 512"),
    "indexer_topk": (lambda: _indexer(d=32), "d must be 64 or 128"),
    "routed_experts": (lambda: _moe(jnp.float32), "dtype"),
}


@pytest.mark.parametrize("op", list(OPS))
def test_pallas_refuses_unsupported_calls(op):
    fn, _, _ = OPS[op]
    inputs, reason = UNSUPPORTED[op]
    with pytest.raises(ValueError, match=f"{op}: the Pallas kernel does not support this call.*{reason}"):
        fn(*inputs(), implementation="pallas")


@pytest.mark.parametrize("op", list(OPS))
def test_auto_and_reference_run_the_reference_on_the_cpu(op):
    fn, inputs, reference = OPS[op]
    args = UNSUPPORTED[op][0]() if op == "routed_experts" else inputs()
    expected = np.asarray(reference(*args))
    for implementation in ("auto", "reference"):
        np.testing.assert_array_equal(np.asarray(fn(*args, implementation=implementation)), expected)
    np.testing.assert_array_equal(np.asarray(fn(*args)), expected)  # "auto" is the default


def test_sparse_attention_pallas_matches_the_reference():
    """The public function with "pallas" runs the kernel (interpreted here) and agrees with "reference"."""
    args = _attention()
    try:
        got = jax.block_until_ready(sparse_attention(*args, implementation="pallas"))
    finally:
        compat.reset_interpret_state()
    ref = sparse_attention(*args, implementation="reference")
    assert rel_l2(got.astype(jnp.float32), ref.astype(jnp.float32)) <= 2e-2


def test_the_choice_travels_with_the_layout(monkeypatch):
    """The model hands `TokenLayout.kernels` to the attention, indexer and routed-expert ops of every layer."""
    from flax import nnx

    from dsv4jax.config import load_config
    from dsv4jax.model import DeepseekV4, attention, indexer, init_state, moe
    from dsv4jax.model.layout import KERNEL_CHOICES, TokenLayout

    assert KERNEL_CHOICES is pallas.KERNEL_CHOICES
    seen = []

    def recording(real, name):
        def op(*args, implementation="auto", **kwargs):
            seen.append((name, implementation))
            return real(*args, implementation="reference", **kwargs)
        return op

    monkeypatch.setattr(attention, "sparse_attention", recording(attention.sparse_attention, "sparse_attention"))
    monkeypatch.setattr(indexer, "indexer_topk", recording(indexer.indexer_topk, "indexer_topk"))
    monkeypatch.setattr(moe, "routed_experts", recording(moe.routed_experts, "routed_experts"))
    config = load_config(ROOT.parent / "configs" / "test-tiny.json", dtype="float32")
    model = DeepseekV4(config, nnx.Rngs(0))
    ids = jnp.zeros((1, 8), jnp.int32)
    model(ids, init_state(config, 1, 8), layout=TokenLayout(kernels="pallas"))
    assert {name for name, _ in seen} == {"sparse_attention", "indexer_topk", "routed_experts"}
    assert {implementation for _, implementation in seen} == {"pallas"}


def test_sm_count_falls_back_off_the_gpu():
    assert pallas.sm_count(77) == 77 and pallas.sm_count() == pallas.FALLBACK_SMS


def test_no_global_kernel_switch():
    assert not hasattr(pallas, "use") and not hasattr(pallas, "implementation")


def _environment_reads(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: from os import {alias.name}" for alias in node.names
                      if alias.name in ("environ", "getenv", "putenv", "environb")]
    return found


def test_nothing_under_pallas_reads_the_environment():
    files = sorted(PACKAGE.rglob("*.py"))
    assert files
    assert [hit for path in files for hit in _environment_reads(path)] == []


def test_no_debugging_scripts_in_the_package():
    assert sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("debug_*.py")) == []
