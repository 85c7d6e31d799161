import os
import sys

# Tests import their support modules (hf_oracle) by name.
sys.path.insert(0, os.path.dirname(__file__))

# CPU compile time dominates the suite: XLA's backend optimisations buy nothing for these tiny models and cost
# several seconds per compiled shape (numerics move by ~1e-6, far inside every tolerance here).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
