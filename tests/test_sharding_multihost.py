"""Multi-host: two processes × 4 CPU devices joined by `jax.distributed` on 127.0.0.1 (gloo)
give the same CP prefill logits as one process with 8 devices (`dsv4jax/sharding/multihost.py` shows the command)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv4jax.sharding.multihost import demo_prefill_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "test-tiny.json")
MESH = "cp=4,ep=2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() < 8, reason="the one-process reference needs 8 devices")
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "logits.npy"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # each process sets its 4 CPU devices
    command = [sys.executable, "-m", "dsv4jax.sharding.multihost", "--coordinator", f"127.0.0.1:{free_port()}",
               "--num-processes", "2", "--local-devices", "4", "--mesh", MESH, "--config", CONFIG, "--out", str(out),
               "--heartbeat-timeout", "600"]  # CI runs this beside another test worker on 2 cores
    processes = [subprocess.Popen(command + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in processes]
    for p, log in zip(processes, logs):
        assert p.returncode == 0, log[-3000:]
    assert all("process" in log and "/2: 8 devices" in log for log in logs), logs
    two = np.load(out)
    one = demo_prefill_logits(MESH, CONFIG)
    r = float(np.linalg.norm(two.astype(np.float64) - one) / np.linalg.norm(one))
    print(f"\n[multi-host] 2 processes × 4 devices vs 1 process × 8: logits rel {r:.1e}")
    assert r <= 1e-5
