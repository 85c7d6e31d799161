"""The persistent compilation cache of the command-line programs: a second process loads what the first compiled."""

import os
import subprocess
import sys
import textwrap

import pytest

from dsv4jax import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from dsv4jax import compilation_cache
    events = []
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    compilation_cache.enable(sys.argv[1], min_compile_seconds=0)
    x = jax.random.normal(jax.random.key(int(sys.argv[2])), (64, 64))
    y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(x)
    print(sum(e.endswith("cache_hits") for e in events), sum(e.endswith("cache_misses") for e in events),
          float(y.sum()))
""")


def run(directory, seed):
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(directory), str(seed)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hits, misses, total = done.stdout.split()
    return int(hits), int(misses), float(total)


def test_second_process_loads_the_compiled_program(tmp_path):
    hits, compiled, first = run(tmp_path / "cache", 1)
    assert hits == 0 and compiled >= 1
    assert len(list((tmp_path / "cache").iterdir())) >= compiled
    hits, misses, second = run(tmp_path / "cache", 2)  # same programs, new inputs
    assert (hits, misses) == (compiled, 0)
    assert second != first


def test_none_turns_it_off_and_a_bad_directory_is_named(tmp_path):
    assert compilation_cache.enable("none") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="--compilation-cache .*file/xla: cannot create it"):
        compilation_cache.enable(str(blocker / "xla"))
