import os
import sys
import time

import pytest

# Tests import their support modules (hf_oracle) by name.
sys.path.insert(0, os.path.dirname(__file__))

# CPU compile time dominates the suite: XLA's backend optimisations buy nothing for these tiny models and cost
# several seconds per compiled shape (numerics move by ~1e-6, far inside every tolerance here).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# Eight fake CPU devices for the sharding tests (tests/test_sharding*.py); set before JAX initialises.
# Single-device code keeps running on device 0.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# XLA:CPU sizes its thread pool from NPROC; with the 2 cores here the Mosaic GPU interpreter's warpgroup threads
# can starve each other and hang. It must be set before JAX starts, hence here.
os.environ.setdefault("NPROC", "8")

# The command-line programs cache compiled executables (dsv4jax/compilation_cache.py); the servers and CLIs the
# tests start keep theirs in a directory of this run, never in the user's ~/.cache.
if "DSV4JAX_COMPILATION_CACHE" not in os.environ:
    import tempfile

    os.environ["DSV4JAX_COMPILATION_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="dsv4jax-test-"), "xla")


@pytest.fixture
def seed():
    """A fresh seed per test run (random inputs differ from run to run)."""
    return int(time.time_ns() % (2 ** 31))


# `make test` runs two workers, each taking a whole file at a time (--dist loadfile) in collection order. A long
# file left to the end runs alone while the other worker idles, so the longest files start first (their serial
# times on the 2-core machine, largest first: about 6, 4, 3, 3, 2.5 and 2 minutes).
LONGEST_FIRST = ("test_sharding_multihost.py", "test_sharding.py", "test_engine.py", "test_eval.py", "test_train.py",
                 "test_prefix_cache.py", "test_preemption.py", "test_batch_invariance.py",
                 "test_pallas_sparse_attention.py", "test_decode_consistency.py", "test_layer_groups.py",
                 "test_api.py", "test_notebook.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole and in order
