"""The one runner (dsv4jax/run.py) and the seams around it: counted in the tree, and the kernel choice per call."""

import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import dsv4jax.model.attention as attention_module
import dsv4jax.model.indexer as indexer_module
import dsv4jax.model.moe as moe_module
from dsv4jax.pallas.indexer_topk import indexer_topk_reference
from dsv4jax.pallas.moe_gmm.reference import routed_experts_reference
from dsv4jax.pallas.sparse_attention.reference import sparse_attention_reference
from dsv4jax.run import Runner
from dsv4jax.serve.engine import Engine, EngineConfig
from engine_models import random_model

PACKAGE = Path(__file__).resolve().parent.parent / "dsv4jax"


def _modules(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _calls_named(tree, name: str) -> int:
    return sum(1 for node in ast.walk(tree) if isinstance(node, ast.Call)
               and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name))


def test_the_model_has_one_shard_map_call_site_in_the_runner():
    sites = {str(path.relative_to(PACKAGE)): n for path, tree in _modules(PACKAGE)
             if (n := _calls_named(tree, "shard_map"))}
    assert sites == {"run.py": 1}, sites


def test_sharding_never_imports_serving_or_evaluation():
    offenders = []
    for path, tree in _modules(PACKAGE / "sharding"):
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("dsv4jax.serve", "dsv4jax.eval"))]
    assert not offenders, offenders


def test_importing_dsv4jax_changes_no_environment_variable():
    script = "import os; before = dict(os.environ); import dsv4jax, dsv4jax.serve, dsv4jax.sharding, dsv4jax.run; " \
             "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_runner_rejects_an_unknown_kernel_choice_and_checks_chunks():
    from dsv4jax.sharding.mesh import MeshError

    model = random_model()
    with pytest.raises(ValueError, match="kernels='triton'; choose one of auto, reference, pallas"):
        Runner(model.graphdef, kernels="triton")
    runner = Runner(model.graphdef, "cp=4", devices=__import__("jax").devices()[:4])
    assert runner.alignment == 4
    with pytest.raises(MeshError, match="multiples of 4"):
        runner.check_chunk(6)
    assert Runner(model.graphdef) == Runner(model.graphdef) != Runner(model.graphdef, kernels="reference")


def test_two_engines_compiling_in_threads_get_the_kernels_each_asked_for(monkeypatch):
    """Each kernel op records the implementation it was traced with, and by which thread (then runs the
    reference, which every shape supports): two engines warming up at once in two threads, one asking for the
    Pallas kernels and one for the references, each see only their own choice."""
    seen, lock = [], threading.Lock()

    def recording(reference):
        def op(*args, implementation="auto", **kwargs):
            with lock:
                seen.append((threading.current_thread().name, implementation))
            return reference(*args, **kwargs)
        return op

    monkeypatch.setattr(attention_module, "sparse_attention", recording(sparse_attention_reference))
    monkeypatch.setattr(indexer_module, "indexer_topk", recording(indexer_topk_reference))
    def unstacked_reference(*args, layer=None, **kwargs):  # test-tiny has no scanned group: no stacked experts
        assert layer is None
        return routed_experts_reference(*args, **kwargs)

    monkeypatch.setattr(moe_module, "routed_experts", recording(unstacked_reference))

    model = random_model()
    config = EngineConfig(max_running_requests=2, max_model_len=256, page_tokens=128, prefill_chunk=32,
                          prefill_buckets=(32,), max_prefill_rows=1, prefill_row_buckets=(1,), decode_buckets=(2,))
    engines = {choice: Engine(model, config, runner=Runner(model.graphdef, kernels=choice))
               for choice in ("pallas", "reference")}
    barrier, errors = threading.Barrier(2), []

    def warm(choice):
        try:
            barrier.wait()
            engines[choice].warmup(threads=2)
        except Exception as error:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=warm, args=(choice,), name=choice) for choice in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert {name for name, _ in seen} == {"pallas", "reference"}
    assert all(name == implementation for name, implementation in seen), sorted(set(seen))
    assert all(engine.compiles == 2 for engine in engines.values())
