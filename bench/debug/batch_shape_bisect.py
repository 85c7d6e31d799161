"""Which op makes a bf16 row's result depend on the batch shape (XLA:CPU)? A debugging script.

    .venv/bin/python bench/debug/batch_shape_bisect.py [--skip-primitives] [--ablation] [--dtype bfloat16]

1. Primitives under jit: row 0 of each dot / reduction the model uses at R rows vs 1 row, and whether XLA:CPU
   compiled it into a YNNPACK fusion ("__ynn_fusion"); a minimal reproduction of the compressor's pooling chain.
2. The untapped Runner (the engine's compiled paths, scanned layers): row 0's max |Δ logprob| for prefill B=1 vs
   B=4, chunk 64 vs 128, decode B=1 vs B=4; and row 0 of every cache the prefill wrote, layer by layer (real
   outputs of the program, so this view does not perturb its fusion).
3. Substitution: every reduction of one model file rewritten as elementwise adds (same math, no reduce op);
   the file whose substitution alone makes the untapped Δ vanish holds the culprit.
4. Tapped, unscanned model: every module call, `jnp.einsum`, `ragged_dot_general`, inverse RMS, Sinkhorn taped
   (monkeypatched here, the package is not edited) and returned as extra jit outputs; row 0 of each tap compared
   in execution order; ORIGIN = output differs while its inputs and tapped children do not. Caveat: the extra
   outputs change XLA's fusion, so this program's shape-dependent ops are not all those of the untapped one.
`--ablation` adds section 2's numbers under other --xla_cpu_experimental_ynn_fusion_type settings (subprocesses).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv4jax.model import init_state  # noqa: E402
from dsv4jax.model.layout import TokenLayout  # noqa: E402
import re  # noqa: E402

from dsv4jax.run import Runner  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# 1. primitives
# ---------------------------------------------------------------------------------------------------------------


def _ynn(f, *args) -> bool:
    """Whether XLA:CPU compiled any of f's ops into a YNNPACK fusion (kind=kCustom, "__ynn_fusion")."""
    return "__ynn_fusion" in jax.jit(f).lower(*args).compile().as_text()


def primitives() -> None:
    from dsv4jax.model.linear import matmul, matmul_fp32
    from dsv4jax.model.mhc import sinkhorn
    from dsv4jax.model.norm import inverse_rms, rms_norm

    rng = np.random.default_rng(0)
    print("== primitives under jit: row 0 of a batch of R rows vs R=1; max|Δ| of row 0 [YNN fusion used: y/n]")
    cases = {  # name: (f(x), row shape, x dtype)
        "sum(x,-1) f32 [R,32]": (lambda x: jnp.sum(x, -1), (32,), np.float32),
        "Block/Attention inverse_rms f32 [R,64,32] (q_norm)": (lambda x: inverse_rms(x, 1e-6), (64, 32), np.float32),
        "mhc.sinkhorn f32 [R,64,4,4] (comb)": (lambda x: sinkhorn(x, 20, 1e-6), (64, 4, 4), np.float32),
        "softmax(-1) f32 [R,64,4,4]": (lambda x: jax.nn.softmax(x, -1), (64, 4, 4), np.float32),
    }
    w96 = jnp.asarray(rng.standard_normal((96, 64)) * 0.125, jnp.bfloat16)
    w24 = jnp.asarray(rng.standard_normal((24, 256)) * 0.02, jnp.float32)
    cases.update({
        "matmul bf16·bf16->f32 [R,64]x[96,64]ᵀ": (lambda x: matmul(x, w96, jnp.float32), (64,), jnp.bfloat16),
        "matmul (Linear) bf16->bf16 [R,64]x[96,64]ᵀ": (lambda x: matmul(x, w96), (64,), jnp.bfloat16),
        "matmul_fp32 bf16 x f32 w [R,256]x[24,256]ᵀ (mHC)": (lambda x: matmul_fp32(x, w24), (256,), jnp.bfloat16),
    })
    sizes = (1, 2, 4, 64, 256)
    for name, (f, shape, dtype) in cases.items():
        x = rng.standard_normal((sizes[-1], *shape)).astype(dtype)
        jf = jax.jit(f)
        ref = np.asarray(jf(jnp.asarray(x[:1]))[0]).astype(np.float64)
        row = []
        for r in sizes:
            d = np.max(np.abs(np.asarray(jf(jnp.asarray(x[:r]))[0]).astype(np.float64) - ref))
            row.append(f"{r}:{d:.1g}{'y' if _ynn(f, jax.ShapeDtypeStruct((r, *shape), dtype)) else 'n'}")
        print(f"  {name:52s} R=" + " ".join(row))
    # the compressor's pooling chain (Compressor.absorb: softmax over the 2m = 8 slots, weighted sum, bf16, RMSNorm)
    w = jnp.asarray(1 + 0.1 * rng.standard_normal(96), jnp.float32)
    chain = jax.jit(lambda g, kv: rms_norm(jnp.sum(jax.nn.softmax(g, axis=2) * kv, axis=2).astype(jnp.bfloat16),
                                           w, 1e-6))
    g, kv = (rng.standard_normal((4, 16, 8, 96)).astype(np.float32) for _ in range(2))
    ref = np.asarray(chain(g[:1], kv[:1])[0]).astype(np.float64)
    row = []
    for b in (1, 2, 3, 4):
        d = np.abs(np.asarray(chain(g[:b], kv[:b])[0]).astype(np.float64) - ref)
        fusions = chain.lower(g[:b], kv[:b]).compile().as_text().count("__ynn_fusion")
        row.append(f"B={b}: {d.max():.3g} ({int((d > 0).sum())}/{d.size}, {fusions} YNN fusions)")
    print("  rms_norm(sum(softmax(g,2)·kv, 2).bf16) f32 [B,16,8,96] -> bf16 [B,16,96]:  " + "  ".join(row))
    # row sums: which R give the same row 0 (the switch is at R·K >= 4096 elements, to a YNN reduce fusion)
    f = jax.jit(lambda x: jnp.sum(x, -1))
    for k in (32, 256):
        x = rng.standard_normal((4096, k)).astype(np.float32)
        classes = {}
        for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 4096):
            classes.setdefault(np.asarray(f(jnp.asarray(x[:r])))[0].tobytes(), []).append(r)
        print(f"  sum over K={k:3d}: R with identical row 0: {list(classes.values())}")
    # a fp32 1-ulp change flips a bf16 output rarely
    f = jax.jit(lambda x: matmul(x, w96))
    x = rng.standard_normal((2048, 64)).astype(jnp.bfloat16)
    one = np.concatenate([np.asarray(f(jnp.asarray(x[i:i + 1]))) for i in range(2048)], 0)
    four = np.concatenate([np.asarray(f(jnp.asarray(x[i:i + 4]))) for i in range(0, 2048, 4)], 0)
    d = np.abs(one.astype(np.float32) - four.astype(np.float32))
    print(f"  Linear bf16 out, 2048 rows 1 at a time vs 4 at a time: {np.mean(d > 0):.1e} of outputs differ (1 bf16 ulp)")


# ---------------------------------------------------------------------------------------------------------------
# 2. the tapped model
# ---------------------------------------------------------------------------------------------------------------

TAPE: list | None = None  # [(name, leaves)] while tracing a tapped call
PATHS: dict = {}  # id(module) -> dotted path, of the module merged inside the trace
STACK: list = []  # names of the module calls being traced
COUNTS: collections.Counter = collections.Counter()


def _arrays(tree) -> list:
    return [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]


def _emit(name: str, out, inputs=(), begin: int | None = None):
    """Tape one call: its output leaves, its input leaves, and where its children's taps begin."""
    if TAPE is None:
        return
    COUNTS[name] += 1
    TAPE.append((f"{name}#{COUNTS[name]}" if COUNTS[name] > 1 else name, _arrays(out), _arrays(inputs),
                 len(TAPE) if begin is None else begin))


def _mark() -> int | None:
    return None if TAPE is None else len(TAPE)


def tap_method(cls, method: str):
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        name = f"{PATHS.get(id(self), '?' + cls.__name__)}.{method}" if method != "__call__" else \
            PATHS.get(id(self), "?" + cls.__name__)
        STACK.append(name)
        begin = _mark()
        try:
            out = original(self, *args, **kwargs)
        finally:
            STACK.pop()
        _emit(f"{name} [{cls.__name__}.{method}]", out, (args, kwargs), begin)
        return out

    setattr(cls, method, wrapper)


def tap_function(module, attr: str, label: str | None = None):
    original = getattr(module, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        begin = _mark()
        out = original(*args, **kwargs)
        _emit(f"{STACK[-1] if STACK else ''}/{label or attr}", out, (args, kwargs), begin)
        return out

    setattr(module, attr, wrapper)
    return wrapper


def install_taps() -> None:
    from dsv4jax.model import attention, block, compressor, indexer, linear, mhc, moe, norm, transformer
    from dsv4jax.pallas import moe_gmm, sparse_attention
    from dsv4jax.pallas.moe_gmm import reference as moe_ref

    for cls, method in [(linear.Linear, "__call__"), (linear.Embedding, "__call__"), (norm.RMSNorm, "__call__"),
                        (mhc.HyperConnection, "pre"), (mhc.HyperConnectionHead, "__call__"),
                        (attention.Attention, "__call__"), (attention.Attention, "_grouped_output"),
                        (compressor.Compressor, "project"), (compressor.Compressor, "absorb"),
                        (indexer.Indexer, "__call__"), (moe.Gate, "__call__"), (moe.Experts, "__call__"),
                        (moe.SharedExpert, "__call__"), (moe.MoE, "__call__"), (block.Block, "__call__"),
                        (transformer.DeepseekV4, "logits")]:
        tap_method(cls, method)
    post = mhc.HyperConnection.post
    mhc.HyperConnection.post = staticmethod(lambda *a: _ret(f"{STACK[-1]}/hc.post", post(*a), a))  # no children
    # Functions, where their callers look them up (module globals).
    for module, attr in [(mhc, "sinkhorn"), (mhc, "stream_mixes"), (mhc, "collapse"), (mhc, "inverse_rms"),
                         (norm, "inverse_rms"), (attention, "rms_normalize"), (attention, "apply_rope"),
                         (attention, "sparse_attention"), (moe, "routed_experts"), (indexer, "indexer_topk"),
                         (moe_ref, "grouped_matmul_reference"), (moe_ref, "clamped_swiglu"),
                         (moe, "clamped_swiglu"), (sparse_attention, "sparse_attention_reference"),
                         (moe_gmm, "routed_experts_reference")]:
        tap_function(module, attr)
    # Every einsum and ragged dot (matmul, matmul_fp32, collapse, attention scores / P·V, wo_a, experts).
    tap_function(jnp, "einsum", "einsum")
    tap_function(jax.lax, "ragged_dot_general", "ragged_dot")


def _ret(name, out, inputs):
    _emit(name, out, inputs)
    return out


@contextlib.contextmanager
def taping():
    global TAPE
    TAPE = []
    COUNTS.clear()
    try:
        yield TAPE
    finally:
        TAPE = None


def tapped_call(graphdef, kind: str):
    """A jitted call returning (fp32 logits [B,S,V], [(tap name, first child tap)], [(outputs, inputs)])."""
    names_box = {}

    def fn(params, state, ids, num_new):
        model = nnx.merge(graphdef, params)
        PATHS.clear()
        PATHS.update({id(m): ".".join(map(str, p)) or "model" for p, m in nnx.iter_modules(model)})
        with taping() as tape:
            if kind == "decode":
                hidden, _, _ = model(ids[:, None], state, num_new, TokenLayout("reference"))
            else:
                hidden, _, _ = model(ids, state, num_new, TokenLayout("reference"))
            logits = model.logits(hidden)  # [B, S, V]
            names_box["names"] = [(name, begin) for name, _, _, begin in tape]
            leaves = [(outs, ins) for _, outs, ins, _ in tape]
        return logits, leaves

    jitted = jax.jit(fn)

    def call(*args):
        logits, leaves = jitted(*args)
        return np.asarray(logits), names_box["names"], leaves

    return call


def row0(a: np.ndarray, b: np.ndarray):
    """Row 0 / the shared tokens: each axis where the shapes differ is cut to the smaller size."""
    if a.ndim != b.ndim:
        return None, None
    cut = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, b.shape))
    return a[cut], b[cut]


def _difference(x, y) -> float | None:
    x, y = row0(np.asarray(x), np.asarray(y))
    if x is None:
        return None
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        return float(np.sum(x != y))
    return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))


SORTED = "ffn.experts/"  # taps inside the routed experts hold rows sorted by expert: not aligned between calls


def compare(title: str, run_a, run_b, real: int, show: int = 4) -> None:
    """Row 0 of every tap: the first differing ones, and the origins: output differs though every input of row 0
    is equal and no tapped child differs (so the op itself, not what it was fed, depends on the shape)."""
    (la, names, taps_a), (lb, names_b, taps_b) = run_a, run_b
    assert names == names_b, "the two runs traced different call sequences"
    differs, lines, origins, flips = {}, [], [], []
    for index, ((name, begin), (outs_a, ins_a), (outs_b, ins_b)) in enumerate(zip(names, taps_a, taps_b)):
        if SORTED in name:
            continue
        outs = [(j, x.dtype, x.shape[1:], _difference(x, y)) for j, (x, y) in enumerate(zip(outs_a, outs_b))]
        outs = [o for o in outs if o[-1]]
        differs[index] = bool(outs)
        if not outs:
            continue
        j, dtype, shape, diff = max(outs, key=lambda o: o[-1])
        line = f"[{index:3d}] {name} out{j} {dtype}[..{','.join(map(str, shape))}] max|Δ| {diff:.3g}"
        lines.append(line)
        flips += [f"{name} out{k}: {d:.0f} ints" for k, t, _, d in outs if np.issubdtype(t, np.integer)]
        if not any(_difference(x, y) for x, y in zip(ins_a, ins_b)) and \
                not any(differs.get(child) for child in range(begin, index)):
            origins.append((name, diff))
    print(f"\n== {title}: {len(differs)} taps compared ({len(names) - len(differs)} inside the routed experts "
          f"skipped: sorted rows), {len(lines)} differ")
    for line in lines[:show]:
        print("   first:  " + line)
    kinds = collections.defaultdict(list)
    for name, diff in origins:  # "groups.2.blocks.0.attn.wq_a/einsum#2" -> op "einsum", where "attn.wq_a"
        path, _, op = name.partition("/") if "/" in name else (name.split(" ")[0], "", name.split(" ")[-1])
        kinds[op.split("#")[0]].append((re.sub(r"^groups\.\d+\.blocks\.\d+\.?", "", path) or "block", diff))
    for op, hits in kinds.items():
        where = sorted({w for w, _ in hits})
        print(f"   ORIGIN {op}: {len(hits)}x, max|Δ| {max(d for _, d in hits):.3g}  in {', '.join(where[:6])}"
              f"{' …' if len(where) > 6 else ''}")
    if flips:
        print(f"   discrete choices that flipped (routing / indexer rows): {'; '.join(flips[:4])}")
    lp = lambda logits: jax.nn.log_softmax(logits[0, :real], axis=-1)  # noqa: E731
    print(f"   tapped program: max|Δ logprob| row 0 over its {real} real tokens = "
          f"{float(jnp.max(jnp.abs(lp(la) - lp(lb)))):.3g}")


def state_rows(states: list, config) -> object:
    """Concatenate B=1 decode states along their batch axis (found by shape from init_state)."""
    one, two = init_state(config, 1, 8), init_state(config, 2, 8)
    axes = jax.tree.map(lambda a, b: [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y][0], one, two)
    return jax.tree.map(lambda axis, *leaves: jnp.concatenate(leaves, axis), axes, *states)


def logprob_delta(a, b) -> float:
    """max |Δ| of row 0's fp32 logprobs (over the vocabulary, and over tokens where a has a token axis)."""
    return float(jnp.max(jnp.abs(jax.nn.log_softmax(a[0], axis=-1) - jax.nn.log_softmax(b[0], axis=-1))))


PROMPT, COMPANIONS, MAX_LEN = 40, (64, 7, 33), 256


def inputs(config):
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, size=PROMPT)
    companions = [rng.integers(3, config.vocab_size, size=m) for m in COMPANIONS]
    return prompt, companions


def padded(rows, width):
    ids = np.zeros((len(rows), width), np.int32)
    for r, seq in enumerate(rows):
        ids[r, :len(seq)] = seq
    return jnp.asarray(ids), jnp.asarray([len(s) for s in rows], jnp.int32)


def runner_deltas(model) -> dict:
    """The ordinary Runner (scanned layers, untapped, the engine's compiled paths): row 0's max |Δ logprob|."""
    config, params = model.config, model.params
    runner = Runner(model.graphdef, kernels="reference")
    prompt, companions = inputs(config)
    logits = lambda out: out[0]  # noqa: E731
    p1 = runner.forward(params, init_state(config, 1, MAX_LEN), *padded([prompt], 64))
    p4 = runner.forward(params, init_state(config, 4, MAX_LEN), *padded([prompt, *companions], 64))
    p128 = runner.forward(params, init_state(config, 1, MAX_LEN), *padded([prompt], 128))
    # decode: each row's state from its own B=1 prefill, so row 0's state is identical at B=1 and B=4
    states = [p1[2]] + [runner.forward(params, init_state(config, 1, MAX_LEN), *padded([seq], 64))[2]
                        for seq in companions]
    nxt = jnp.asarray([int(np.argmax(p1[0][0, PROMPT - 1])), 5, 9, 11], jnp.int32)
    d1 = runner.decode(params, states[0], nxt[:1], jnp.ones((1,), bool))
    d4 = runner.decode(params, state_rows(states, config), nxt, jnp.ones((4,), bool))
    d4i = runner.decode(params, state_rows([states[0]] * 4, config), nxt, jnp.asarray([True, False, False, False]))
    STATE_DIFF[:] = state_differences(p1[2], p4[2], config)
    prefill = lambda out: out[0][:, :PROMPT]  # noqa: E731 (row 0's real tokens)
    return {"prefill B=1 vs B=4 (chunk 64)": logprob_delta(prefill(p1), prefill(p4)),
            "prefill chunk 64 vs 128 (B=1)": logprob_delta(prefill(p1), prefill(p128)),
            "decode B=1 vs B=4 (random companions)": logprob_delta(logits(d1), logits(d4)),
            "decode B=1 vs B=4 (inactive padding rows)": logprob_delta(logits(d1), logits(d4i))}


# ---------------------------------------------------------------------------------------------------------------
# 3. substitution: in one model file at a time, every jnp.sum / mean / max and jax.nn.softmax is replaced by a
#    chain of elementwise adds (maxes) over the reduced axis: same math, no reduce op, so no shape-dependent
#    choice between XLA's loop emitter and a YNNPACK reduce fusion. Does row 0's Δ in the untapped Runner vanish?
# ---------------------------------------------------------------------------------------------------------------


def _by_elementwise(op, x, axis, keepdims):
    axes = sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    out = x
    for a in reversed(axes):
        moved = jnp.moveaxis(out, a, -1)
        out = functools.reduce(op, [moved[..., i] for i in range(moved.shape[-1])])
        if keepdims:
            out = jnp.expand_dims(out, a)
    return out


class _Proxy:
    """A module (jnp, jax, jax.nn) with some attributes replaced."""

    def __init__(self, base, **overrides):
        self._base, self._overrides = base, overrides

    def __getattr__(self, name):
        return self._overrides.get(name) or getattr(self._base, name)


def _inv_sum(x, axis=None, keepdims=False, **kw):
    return jnp.sum(x, axis, keepdims=keepdims, **kw) if axis is None or kw else \
        _by_elementwise(jnp.add, x, axis, keepdims)


def _inv_max(x, axis=None, keepdims=False, **kw):
    return jnp.max(x, axis, keepdims=keepdims, **kw) if axis is None or kw else \
        _by_elementwise(jnp.maximum, x, axis, keepdims)


def _inv_mean(x, axis=None, keepdims=False, **kw):
    if axis is None or kw:
        return jnp.mean(x, axis, keepdims=keepdims, **kw)
    count = np.prod([x.shape[a] for a in ((axis,) if isinstance(axis, int) else axis)])
    return _inv_sum(x, axis, keepdims) / count


def _inv_softmax(x, axis=-1):
    e = jnp.exp(x - jax.lax.stop_gradient(_inv_max(x, axis, True)))
    return e / _inv_sum(e, axis, True)


INV_JNP = _Proxy(jnp, sum=_inv_sum, max=_inv_max, mean=_inv_mean)
INV_JAX = _Proxy(jax, nn=_Proxy(jax.nn, softmax=_inv_softmax))


def _substitutable():
    from dsv4jax.model import compressor, mhc, moe, norm
    from dsv4jax.pallas.sparse_attention import reference as attention_core

    return {"model/compressor.py (Compressor.absorb: softmax pooling)": compressor,
            "model/mhc.py (sinkhorn, HyperConnection.post)": mhc,
            "model/norm.py (inverse_rms: every RMSNorm)": norm,
            "pallas/sparse_attention/reference.py (softmax)": attention_core,
            "model/moe.py (Gate weight normalisation)": moe}


@contextlib.contextmanager
def substituted(files: list):
    saved = []
    for module in files:
        for name, proxy in (("jnp", INV_JNP), ("jax", INV_JAX)):
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, proxy)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def substitution(model, sets=None) -> None:
    config, params = model.config, model.params
    prompt, companions = inputs(config)
    runner = Runner(model.graphdef, kernels="reference")
    files = _substitutable()
    sets = sets or [[name] for name in files][:3] + [list(files)]
    print("\n== substitution in the untapped Runner (scanned): prefill B=1 vs B=4 (chunk 64), row 0's max|Δ logprob|")
    for chosen in sets:
        with substituted([files[name] for name in chosen]):
            forward = jax.jit(lambda *a: runner.forward_fn(*a))  # a fresh trace, with the substitutes
            one = forward(params, init_state(config, 1, MAX_LEN), *padded([prompt], 64))[0][:, :PROMPT]
            four = forward(params, init_state(config, 4, MAX_LEN), *padded([prompt, *companions], 64))[0][:, :PROMPT]
        label = chosen[0] if len(chosen) == 1 else f"all {len(chosen)} files" if len(chosen) == len(files) else \
            "the other " + ", ".join(name.split(" ")[0].split("/")[-1] for name in chosen)
        print(f"  reductions by adds in {label:58s} max|Δ logprob| {logprob_delta(one, four):.3g}", flush=True)


STATE_DIFF: list = []


def state_differences(a, b, config) -> list[str]:
    """Row 0 of every cache the call wrote (real outputs of the untapped program, so no tap alters its fusion):
    per layer, the buffers whose row 0 differs, with max |Δ|."""
    from dsv4jax.model.state import state_stacks

    one, two = init_state(config, 1, 8), init_state(config, 2, 8)
    axes = jax.tree.map(lambda x, y: [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q][0], one, two)
    lines = []
    for layers, la, lb, ax in zip(state_stacks(config), a.layers, b.layers, axes.layers):
        for repeat, layer in enumerate(layers):
            parts = []
            for (path, x), (_, y), (_, axis) in zip(jax.tree_util.tree_leaves_with_path(la),
                                                    jax.tree_util.tree_leaves_with_path(lb),
                                                    jax.tree_util.tree_leaves_with_path(ax)):
                x = np.take(np.asarray(x)[repeat], 0, axis - 1).astype(np.float64)
                y = np.take(np.asarray(y)[repeat], 0, axis - 1).astype(np.float64)
                name = jax.tree_util.keystr(path).replace("['", ".").replace("']", "").lstrip(".")
                d = np.abs(x - y)
                parts.append(f"{name} {d.max():.3g}" + (f" ({int((d > 0).sum())} el.)" if d.max() else ""))
            lines.append(f"layer {layer} (ratio {config.compress_ratio(layer)}): " + ", ".join(parts))
    return lines


YNN_SETTINGS = {  # XLA_FLAGS of the ablation: which op kinds XLA:CPU may hand to YNNPACK
    "default (YNN dots + reductions)": None,
    "YNN dots only (reductions by XLA)": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "YNN reductions only (dots by XLA)": "--xla_cpu_experimental_ynn_fusion_type=reduce",
    "no YNN": "--xla_cpu_experimental_ynn_fusion_type=",
}


def ablation(model, dtype: str) -> None:
    import json
    import subprocess

    print("\n== untapped Runner, row 0's max|Δ logprob| (fp32 logprobs over the vocabulary), per XLA:CPU YNN setting")
    keys = None
    for label, flag in YNN_SETTINGS.items():
        if flag is None:
            deltas = runner_deltas(model)
        else:
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
            out = subprocess.run([sys.executable, __file__, "--runner-only", "--dtype", dtype], env=env,
                                 capture_output=True, text=True, check=True).stdout
            deltas = json.loads(out.strip().splitlines()[-1])
        if keys is None:
            keys = list(deltas)
            print("  " + " " * 36 + " | ".join(f"{k:>22.22s}" for k in keys))
        print(f"  {label:36s}" + " | ".join(f"{deltas[k]:22.3g}" for k in keys), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-primitives", action="store_true")
    parser.add_argument("--ablation", action="store_true",
                        help="also the untapped deltas under 3 other XLA:CPU YNN settings "
                             "(3 subprocesses, about +3.5 min on 2 CPUs)")
    parser.add_argument("--runner-only", action="store_true", help="(internal) print runner_deltas as JSON")
    args = parser.parse_args()
    from engine_models import random_model

    model = random_model(0, args.dtype)
    if args.runner_only:
        import json

        print(json.dumps(runner_deltas(model)))
        return
    began = time.perf_counter()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, dtype {args.dtype}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if not args.skip_primitives:
        primitives()
    if args.ablation:
        ablation(model, args.dtype)
        substitution(model)
    else:
        print("\n== untapped Runner, row 0's max|Δ logprob| (fp32 logprobs over the vocabulary; prefill: over its "
              "real tokens)")
        for key, value in runner_deltas(model).items():
            print(f"  {key:44s} {value:.3g}")
        print("  prefill B=1 vs B=4: row 0 of the caches it wrote (max|Δ|), layer by layer:")
        for line in STATE_DIFF:
            print("    " + line)
        files = list(_substitutable())
        substitution(model, [[files[0]], files[1:]])

    # ---- tapped, unscanned --------------------------------------------------------------------------------
    install_taps()
    module = nnx.merge(model.graphdef, model.params).with_scan_layers(False)
    config = module.config
    graphdef, params = nnx.split(module)
    prompt, companions = inputs(config)
    prefill_t = tapped_call(graphdef, "prefill")
    decode_t = tapped_call(graphdef, "decode")
    a = prefill_t(params, init_state(config, 1, MAX_LEN), *padded([prompt], 64))
    b = prefill_t(params, init_state(config, 4, MAX_LEN), *padded([prompt, *companions], 64))
    compare("prefill B=1 vs B=4, chunk 64, tapped", a, b, PROMPT)
    c = prefill_t(params, init_state(config, 1, MAX_LEN), *padded([prompt], 128))
    compare("prefill chunk 64 vs chunk 128 (B=1), tapped", a, c, PROMPT)

    # decode: row 0's state from its own B=1 prefill (unscanned model), companions' from theirs
    uprefill = jax.jit(lambda p, s, i, k: nnx.merge(graphdef, p)(i, s, k, TokenLayout("reference"))[2])
    states = [uprefill(params, init_state(config, 1, MAX_LEN), *padded([seq], 64)) for seq in [prompt, *companions]]
    tok = int(np.argmax(a[0][0, PROMPT - 1]))
    e = decode_t(params, states[0], jnp.asarray([tok], jnp.int32), jnp.ones((1,), jnp.int32))
    f = decode_t(params, state_rows(states, config), jnp.asarray([tok, 5, 9, 11], jnp.int32), jnp.ones((4,), jnp.int32))
    compare("decode B=1 vs B=4 (row 0 state identical, random companions), tapped", e, f, 1)
    g = decode_t(params, state_rows([states[0]] * 4, config), jnp.full((4,), tok, jnp.int32), jnp.ones((4,), jnp.int32))
    compare("decode B=1 vs B=4 (all 4 rows identical copies of row 0), tapped", e, g, 1, show=0)
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
