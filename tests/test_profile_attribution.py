"""bench/profile_forward.py's attribution: device events -> HLO instruction -> the model's named scopes."""

import tempfile

import jax
import jax.numpy as jnp

from bench.common import kernel_events
from bench.profile_forward import classify, op_names


def test_profiled_ops_are_attributed_to_their_layer_and_component():
    def forward(x, w):
        with jax.named_scope("layer3"):
            with jax.named_scope("moe"):
                x = jnp.tanh(x @ w) * 2.0
            with jax.named_scope("mhc"):
                x = x / (jnp.sum(x * x, axis=-1, keepdims=True) + 1.0)
        return x

    x, w = jnp.ones((256, 256)), jnp.full((256, 256), 0.01)
    compiled = jax.jit(forward).lower(x, w).compile()
    names = op_names(compiled.as_text())
    assert {classify(name) for name in names.values()} >= {("layer3", "moe"), ("layer3", "mhc")}
    jax.block_until_ready(compiled(x, w))
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        jax.block_until_ready(compiled(x, w))
    seen = {classify(names.get(hlo_op, "")) for _, hlo_op, _ in kernel_events(trace_dir)}
    assert ("layer3", "moe") in seen, seen
    assert classify("jit(call)/layer12/attention/indexer/add") == ("layer12", "indexer")
    assert classify("jit(call)/group2/while/body/position1/moe/dot") == ("group2/position1", "moe")
    assert classify("jit(call)/add") == ("-", "other")
