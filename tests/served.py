"""Helpers for the HTTP server tests: the app under uvicorn in a thread, and `/metrics` read back."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx2
import uvicorn


@contextlib.contextmanager
def uvicorn_thread(app):
    """Serve `app` on 127.0.0.1 (a free port) in a daemon thread; yields the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def metrics(base: str) -> dict[str, float]:
    """The server's /metrics as {name: value}."""
    values = {}
    for line in httpx2.get(base + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_idle(base: str, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs, waits or holds pages (or after `timeout` seconds)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(base)
        idle = (m["dsv4jax:num_requests_running"], m["dsv4jax:num_requests_waiting"],
                m["dsv4jax:cache_pages_used"]) == (0, 0, 0)
        if idle or time.time() > deadline:
            return m
        time.sleep(0.2)
