"""Decode-state consistency (ARCHITECTURE §11): one forward function serves full prefill, chunked prefill,
one-token decode and right-padded batches of sequences at different positions; all must agree (fp32).

Config: ratios (0, 4, 128, 4 | MTP 0), 16 indexer heads (no top-k ties, ARCHITECTURE §8.5), window 16, index_topk 4, and
≥ 300 tokens so every HCA layer (m = 128) emits rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4jax.config import load_config
from dsv4jax.model import DeepseekV4, init_state
from dsv4jax.model.state import layer_state
from numerics import rel_l2

CFG = load_config("configs/test-tiny.json", dtype="float32")  # ratios (0, 4, 128, 4) + MTP, 16 indexer heads
MAX_LEN = 320  # one state shape everywhere: each (batch, chunk) pair compiles once
TOL = 1e-5
# LLVM optimisation off for these jits only: compiles ~3x faster on CPU; every compared path uses the same options.
JIT_OPTIONS = {"xla_backend_optimization_level": 0}


def tokens(seed: int, shape) -> np.ndarray:
    # numpy on the host side: slicing jax arrays eagerly would compile one tiny program per slice.
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape).astype(np.int32)


def real_entries(state, row: int, length: int, mtp: bool = False) -> dict:
    """The state entries of batch row `row` that hold real positions 0..length−1: the window-ring slots of the
    last w positions, the compressor-ring slots of the last coff·m positions, and the emitted rows."""
    state = jax.device_get(state)
    out = {"lengths": state.lengths[row]}
    layer_ids = [CFG.mtp_layer] if mtp else range(CFG.num_hidden_layers)
    for i, layer in enumerate(layer_state(state, CFG, layer_id, mtp) for layer_id in layer_ids):
        ratio = CFG.compress_ratio(CFG.mtp_layer if mtp else i)
        w = layer.window.shape[1]
        out[f"{i}.window"] = layer.window[row, [p % w for p in range(max(0, length - w), length)]]
        for name, comp, m in (("compressor", layer.compressor, ratio), ("indexer", layer.indexer, 4)):
            if comp is None:
                continue
            ring = comp.kv.shape[1]
            slots = [p % ring for p in range(max(0, length - ring), length)]
            out[f"{i}.{name}.kv"] = comp.kv[row, slots]
            out[f"{i}.{name}.gate"] = comp.gate[row, slots]
            out[f"{i}.{name}.rows"] = comp.rows[row, :length // m]
    return out


def state_rel(a, b) -> float:
    """Largest per-entry relative L2 difference of two `real_entries` dicts."""
    assert a.keys() == b.keys()
    return max(rel_l2(a[k], b[k]) for k in a)


def states_bitwise_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


class Runner:
    """Jitted model calls (`nnx.merge` inside the jit; one compile per shape)."""

    def __init__(self):
        model = DeepseekV4(CFG, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        # Norm weights start at 1: randomise them so a missing or misplaced norm weight would show.
        key = iter(jax.random.split(jax.random.key(7), 64))
        self.params = jax.tree_util.tree_map_with_path(
            lambda p, x: x * (1 + 0.2 * jax.random.normal(next(key), x.shape))
            if "norm']['weight']" in jax.tree_util.keystr(p) else x, params)

        def forward(params, ids, state, num_new):
            m = nnx.merge(graphdef, params)
            hidden, streams, state = m(ids, state, num_new)
            return m.logits(hidden), streams, state

        def mtp(params, streams, next_ids, state, num_new):
            m = nnx.merge(graphdef, params)
            hidden, streams, state = m.mtp_forward(streams, next_ids, state, num_new)
            return m.logits(hidden), streams, state

        self._forward = jax.jit(forward, compiler_options=JIT_OPTIONS)
        self._mtp = jax.jit(mtp, compiler_options=JIT_OPTIONS)

    def forward(self, ids, state, num_new=None):
        """-> (logits, streams) as numpy arrays, and the new state."""
        if num_new is None:
            num_new = np.full(ids.shape[0], ids.shape[1])
        logits, streams, state = self._forward(self.params, ids, state, np.asarray(num_new, np.int32))
        return np.asarray(logits), np.asarray(streams), state

    def mtp(self, streams, next_ids, state, num_new=None):
        if num_new is None:
            num_new = np.full(next_ids.shape[0], next_ids.shape[1])
        logits, streams, state = self._mtp(self.params, streams, next_ids, state, np.asarray(num_new, np.int32))
        return np.asarray(logits), np.asarray(streams), state


@pytest.fixture(scope="module")
def run():
    return Runner()


def fresh(batch: int, mtp: bool = False):
    return init_state(CFG, batch, MAX_LEN, mtp=mtp)


def test_decode_steps_match_full_prefill(run):
    ids = tokens(1, (2, 316))
    full, _, full_state = run.forward(ids, fresh(2))
    logits, _, state = run.forward(ids[:, :300], fresh(2))
    outs = [logits]
    for t in range(300, 316):
        logits, _, state = run.forward(ids[:, t:t + 1], state)
        outs.append(logits)
    decoded = np.concatenate(outs, axis=1)
    r_all, r_steps = rel_l2(decoded, full), rel_l2(decoded[:, 300:], full[:, 300:])
    r_state = max(state_rel(real_entries(state, b, 316), real_entries(full_state, b, 316)) for b in range(2))
    print(f"\n[decode] logits rel all={r_all:.2e} decode-steps={r_steps:.2e}; state rel={r_state:.2e}")
    assert r_all <= TOL and r_steps <= TOL
    assert r_state <= TOL
    np.testing.assert_array_equal(state.lengths, [316, 316])


def test_chunked_prefill_matches_full_prefill(run):
    ids = tokens(2, (2, 316))
    full, _, full_state = run.forward(ids, fresh(2))
    state, outs, start, sizes = fresh(2), [], 0, []
    while start < 316:
        size = min((37, 100)[len(sizes) % 2], 316 - start)  # 37, 100, 37, 100, 37, 5
        logits, _, state = run.forward(ids[:, start:start + size], state)
        outs.append(logits)
        sizes.append(size)
        start += size
    r = rel_l2(np.concatenate(outs, axis=1), full)
    per_row = [(real_entries(state, b, 316), real_entries(full_state, b, 316)) for b in range(2)]
    r_state = max(state_rel(a, b) for a, b in per_row)
    worst = max(((k, rel_l2(a[k], b[k])) for a, b in per_row for k in a), key=lambda kv: kv[1])
    print(f"\n[chunked {sizes}] logits rel={r:.2e}; state rel={r_state:.2e} (worst entry {worst[0]})")
    assert r <= TOL
    assert r_state <= TOL
    np.testing.assert_array_equal(state.lengths, [316, 316])


# Row 1 completes HCA row 1 (position 255) and row 2 CSA rows during the decode steps; row 2 is shorter than the window.
LENGTHS = (300, 253, 10)


def test_right_padded_batch_matches_single_sequences(run):
    ids = tokens(3, (3, max(LENGTHS)))
    batch_logits, _, batch_state = run.forward(ids, fresh(3), LENGTHS)
    np.testing.assert_array_equal(batch_state.lengths, LENGTHS)
    singles, figures = [], []
    for i, length in enumerate(LENGTHS):
        logits, _, state = run.forward(ids[i:i + 1, :length], fresh(1))
        figures.append(rel_l2(batch_logits[i, :length], logits[0]))
        singles.append(state)
    print(f"\n[padded batch {LENGTHS}] prefill rel per sequence: " + ", ".join(f"{r:.2e}" for r in figures))
    assert max(figures) <= TOL

    next_ids = tokens(33, (3, 4))
    step_figures = []
    for k in range(4):  # every row continues at its own position
        batch_logits, _, batch_state = run.forward(next_ids[:, k:k + 1], batch_state, (1, 1, 1))
        for i in range(3):
            logits, _, singles[i] = run.forward(next_ids[i:i + 1, k:k + 1], singles[i])
            step_figures.append(rel_l2(batch_logits[i], logits[0]))
    r_state = max(state_rel(real_entries(batch_state, i, n + 4), real_entries(singles[i], 0, n + 4))
                  for i, n in enumerate(LENGTHS))
    print(f"[padded batch] 4 decode steps: max rel={max(step_figures):.2e}; state rel={r_state:.2e}")
    assert max(step_figures) <= TOL
    assert r_state <= TOL
    np.testing.assert_array_equal(batch_state.lengths, np.array(LENGTHS) + 4)


def test_padding_never_leaks(run):
    """Other pad tokens, and garbage in every state slot that holds no real position yet, change nothing real."""
    ids_a = tokens(4, (3, max(LENGTHS)))
    ids_b = ids_a.copy()
    rng = np.random.default_rng(44)
    for i, length in enumerate(LENGTHS):
        ids_b[i, length:] = (ids_a[i, length:] + rng.integers(1, CFG.vocab_size, max(LENGTHS) - length)) % CFG.vocab_size
    leaves, treedef = jax.tree.flatten(fresh(3))
    keys = jax.random.split(jax.random.key(5), len(leaves))
    garbage = jax.tree.unflatten(treedef, [
        leaf if leaf.dtype == jnp.int32 else 3 * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys)])  # lengths stay 0: nothing in it is real

    logits_a, _, state_a = run.forward(ids_a, fresh(3), LENGTHS)
    for name, ids, start_state in (("pad ids", ids_b, fresh(3)), ("pad ids + garbage state", ids_b, garbage)):
        logits_b, _, state_b = run.forward(ids, start_state, LENGTHS)
        for i, length in enumerate(LENGTHS):
            assert np.array_equal(logits_a[i, :length], logits_b[i, :length]), (name, i)
            assert states_bitwise_equal(real_entries(state_a, i, length), real_entries(state_b, i, length)), (name, i)
        # ... and the next decode step reads only real entries.
        step = tokens(55, (3, 1))
        next_a, _, _ = run.forward(step, state_a, (1, 1, 1))
        next_b, _, _ = run.forward(step, state_b, (1, 1, 1))
        assert np.array_equal(next_a, next_b), name
    print("\n[padding] real logits and real state entries bitwise equal")


def test_mtp_state_step_by_step_matches_whole_sequence(run):
    ids = tokens(5, (2, 317))
    _, streams, _ = run.forward(ids[:, :316], fresh(2))
    next_ids = ids[:, 1:]  # hidden of position t is paired with token t+1 (ARCHITECTURE §12.1)
    full, full_streams, full_state = run.mtp(streams, next_ids, fresh(2, mtp=True))
    logits, mtp_streams, state = run.mtp(streams[:, :300], next_ids[:, :300], fresh(2, mtp=True))
    outs, stream_outs = [logits], [mtp_streams]
    for t in range(300, 316):
        logits, mtp_streams, state = run.mtp(streams[:, t:t + 1], next_ids[:, t:t + 1], state)
        outs.append(logits)
        stream_outs.append(mtp_streams)
    r = rel_l2(np.concatenate(outs, axis=1), full)
    r_streams = rel_l2(np.concatenate(stream_outs, axis=1), full_streams)
    r_state = max(state_rel(real_entries(state, b, 316, mtp=True), real_entries(full_state, b, 316, mtp=True))
                  for b in range(2))
    print(f"\n[mtp] prefill 300 + 16 steps vs whole: logits rel={r:.2e}, streams rel={r_streams:.2e}, "
          f"state rel={r_state:.2e}")
    assert r <= TOL and r_streams <= TOL
    assert r_state <= TOL
    np.testing.assert_array_equal(state.lengths, [316, 316])
