"""A server no request can break (SERVING §D.1) and whose scores evaluation harnesses can trust (SERVING §E).

One in-process server for the module: the real engine on the random-weight model (fp32, two compiled shapes), its
HTTP app under uvicorn on 127.0.0.1 in a thread, so that tests can hold the engine still (a gate before each
step) and inject faults. It drives: a fuzzing client (hundreds of malformed requests of every kind, each a 4xx
naming the field, none a 5xx, nothing changed afterwards), every sampling field at its extremes through the
engine, a failure in one request that leaves the others unharmed, admission that tells "never fits" (400) from
"busy" (503) and lets a refused batch crowd out nobody, the request shapes lm-evaluation-harness sends checked
against `python -m dsv4jax.eval loglik` in fp32, and the smaller fixes (event loop, metrics, messages, paths)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2
import numpy as np
import pytest

import dsv4jax
from dsv4jax.serve import engine as engine_module
from dsv4jax.serve.app import build_app
from dsv4jax.serve.async_engine import AsyncEngine
from dsv4jax.serve.engine import Engine, EngineConfig
from dsv4jax.serve.metrics import ServerMetrics
from dsv4jax.tokenizer import BOS_TEXT, EOS_TEXT
from served import metrics as read_metrics, uvicorn_thread, wait_idle

ROOT = Path(__file__).resolve().parent.parent
RANDOM_MODEL = ROOT / "models" / "dsv4-random-tiny"  # the smallest model the server tests use (byte tokenizer)
TINY_MODEL = ROOT / "models" / "dsv4-tiny"
MAX_MODEL_LEN = 512
RUNNING, WAITING = 8, 4  # capacity 12: the admission tests need free slots beside a short queue
CONFIG = EngineConfig(max_running_requests=RUNNING, max_model_len=MAX_MODEL_LEN, page_tokens=128, prefill_chunk=64,
                      prefill_buckets=(64,), max_prefill_rows=1, decode_buckets=(RUNNING,),
                      max_waiting_requests=WAITING)
VOCAB = 512  # models/dsv4-random-tiny
LOGPROB_TOLERANCE = 1e-3  # paged engine vs the evaluator's full forward, both fp32
JSON = {"content-type": "application/json"}


class _Gate:
    """Holds the engine thread before its next step while closed (requests then queue up, deterministically)."""

    def __init__(self, engine):
        self.open = threading.Event()
        self.open.set()
        step = engine.step

        def gated():
            self.open.wait()
            return step()

        engine.step = gated

    @contextlib.contextmanager
    def closed(self):
        self.open.clear()
        try:
            yield
        finally:
            self.open.set()


class _Tracebacks(logging.Handler):
    """Records logged with a traceback (uvicorn's "Exception in ASGI application")."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def served():
    model = dsv4jax.load(RANDOM_MODEL, dtype="float32", progress=False)
    engine = Engine(model, CONFIG)
    engine.warmup()
    gate = _Gate(engine)
    async_engine = AsyncEngine(engine, ServerMetrics()).start()
    app = build_app(async_engine, model, max_model_len=MAX_MODEL_LEN)
    tracebacks = _Tracebacks()
    logging.getLogger("uvicorn.error").addHandler(tracebacks)
    try:
        with uvicorn_thread(app) as port:
            yield SimpleNamespace(base=f"http://127.0.0.1:{port}", port=port, engine=engine,
                                  async_engine=async_engine, model=model, gate=gate, tracebacks=tracebacks)
    finally:
        async_engine.shutdown()
        logging.getLogger("uvicorn.error").removeHandler(tracebacks)


def _post(base: str, path: str, body, timeout: float = 120) -> httpx2.Response:
    """POST a body as JSON text with ASCII escapes, so lone surrogates travel as JSON does them (\\ud800)."""
    return httpx2.post(base + path, content=json.dumps(body).encode(), headers=JSON, timeout=timeout)


GREEDY = {"prompt": "Same answer every time?", "max_tokens": 8, "temperature": 0, "logprobs": 2}


def _greedy(base: str) -> str:
    """The fixed greedy completion, as the bytes of its choices (ids and timestamps aside)."""
    response = _post(base, "/v1/completions", GREEDY)
    assert response.status_code == 200, response.text
    return json.dumps(response.json()["choices"], sort_keys=True)


# ---- the fuzzing client -----------------------------------------------------------------------------------------


def _deep(opening: str, closing: str, depth: int, inner: str = "1") -> bytes:
    return (opening * depth + inner + closing * depth).encode()


def _fuzz_cases(rng: random.Random) -> list[tuple[str, str, str, bytes, dict, int, str | None]]:
    """(kind, method, path, body, headers, expected status, field the error must name or None), generated from
    the table below: every field's wrong types and out-of-range extremes (several values per kind, drawn with
    `rng`), broken and deeply nested JSON, invalid Unicode, huge bodies, wrong methods and content types."""
    c, ch, tok, detok = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
    ok = {"prompt": "hi", "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    big = 2 ** 63
    # Per endpoint: field -> bad values (all must be a 400 naming the field).
    completion_fields = {
        "n": [0, -1, 17, big, 1.5, "2", True, None, [1]],
        "temperature": [-1e-9, 100.0001, 10 ** 400, "hot", True, [0.5], {"x": 1}],
        "top_p": [0, -0.1, 1.0000001, "1", False],
        "top_k": [-2, 2 ** 31, 10 ** 20, -(10 ** 20), 1.5, "5"],
        "min_p": [-0.1, 1.1, "0", 10 ** 30],
        "seed": [big, -big - 1, 10 ** 30, 1.5, "1"],
        "max_tokens": [-1, 2 ** 31, 10 ** 20, 5000, "5", 1.0, 0],
        "logprobs": [-1, 21, 10 ** 9, True, "1"],
        "prompt_logprobs": [-1, 21, 2 ** 40],
        "presence_penalty": [-2.01, 2.01, 1e300, "0"],
        "frequency_penalty": [-2.5, 3, -(10 ** 30)],
        "repetition_penalty": [0, -1, 10.01, 1e308],
        "logit_bias": [{"abc": 1}, {"5": 101}, {"5": "x"}, {"-1": 1}, {str(10 ** 20): 1}, [1, 2], {"5": -101},
                       {"5": 1}],
        "stop": [[""], ["x" * 1025], ["a"] * 17, 5, [1], [None], ""],
        "stop_token_ids": [[-1], [VOCAB], [2 ** 31], list(range(257)), "1", [1.5]],
        "best_of": [0, 17, 3],
        "min_tokens": [-1, 2 ** 31, 5],
        "echo": ["yes", 1],
        "stream": ["true", 0],
        "add_special_tokens": ["no", None],
        "prompt": [[VOCAB], [-1], [2 ** 31], [[0, 5], [0, VOCAB + 7]], [[]], [[0, "a"]], [], "", 5, None,
                   "\ud800", "ok\udfffok", ["ok", "\udc00"], [True], {"text": "hi"}, "x" * (MAX_MODEL_LEN * 60),
                   [[0, 5]] * 13],
        "model": [5, "gpt-4o", ["x"]],
        "user": [5],
        "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, 5],
        "suffix": ["tail"],
        "frobnicate": [True],  # unknown fields are refused by name
        "return_tokens_as_token_ids": ["true"],
    }
    chat_fields = {
        "messages": [[], "hi", [{"role": "robot", "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": "\ud800"}], [{"role": "user", "content": [{"type": "text",
                                                                                            "text": "\udbff"}]}],
                     [{"role": "user", "content": "hi", "name": "\udfff"}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}],
                     [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                     [{"role": "user", "content": "a"},
                      {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                          "name": "f", "arguments": "[" * 100_000}}]},
                      {"role": "tool", "tool_call_id": "c", "content": "r"}],
                     [{"role": "user", "content": "a"},
                      {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                          "name": "f", "arguments": _deep('{"a":', "}", 150).decode()}}]},
                      {"role": "tool", "tool_call_id": "c", "content": "r"}],
                     [{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]],
        "max_completion_tokens": [5000, -1, 2 ** 31, "5", 0],
        "max_tokens": [5000, -3],
        "top_k": [10 ** 20, 2 ** 31],
        "n": [13, 17, 0],
        "logprobs": ["yes", 1],
        "top_logprobs": [21, -1],
        "tools": [[{"type": "function", "function": {"name": "f", "description": "\ud800"}}],
                  [{"type": "function", "function": {"name": "no spaces"}}],
                  [{"type": "function", "function": {"name": "f", "parameters": json.loads(
                      _deep('{"a":', "}", 120, "{}"))}}],
                  [{"type": "code"}], "f"],
        "tool_choice": ["required", "sometimes"],
        "reasoning_effort": ["extreme", 1],
        "thinking": [{"type": "sometimes"}, True],
        "chat_template_kwargs": [{"mode": 1}, {"thinking": "yes"}],
        "response_format": [{"type": "xml"}],
        "temperature": [-1, float("nan")],
    }
    tokenize_fields = {
        "prompt": ["\ud800", 5, ["a"]],
        "messages": [[{"role": "user", "content": "\udfff"}], []],
        "add_special_tokens": ["x"],
        "tools": [[{"type": "function", "function": {"name": "f", "description": "\udc80"}}]],
    }
    detokenize_fields = {"tokens": [[-1], [VOCAB], [2 ** 31], "abc", [1.5], None, [[1]]]}

    cases = []

    def field_cases(path, base, fields, kind_prefix):
        for name, values in fields.items():
            for value in values:
                body = dict(base)
                if value is None and name in base:
                    body.pop(name)  # a required field left out
                    expected = name
                else:
                    body[name] = value
                    expected = name
                if name == "stream_options" and value == {"include_usage": True}:
                    expected = "stream_options"
                text = json.dumps(body, allow_nan=True).encode()
                status = 404 if (name == "model" and isinstance(value, str)) else 400
                cases.append((f"{kind_prefix} {name}", "POST", path, text, JSON, status, expected))

    field_cases(c, ok, completion_fields, "completions")
    field_cases(ch, chat, chat_fields, "chat")
    field_cases(tok, {"prompt": "hi"}, tokenize_fields, "tokenize")
    field_cases(detok, {"tokens": [3, 4]}, detokenize_fields, "detokenize")
    cases.append(("tokenize both inputs", "POST", tok,
                  json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).encode(), JSON, 400,
                  None))
    cases.append(("tokenize neither input", "POST", tok, b"{}", JSON, 400, None))

    valid = json.dumps({**ok, "temperature": 0.5}).encode()
    posts = [c, ch, tok, detok]
    for path in posts:
        # Broken JSON: random cuts of a valid body, stray bytes, the wrong top-level type.
        for _ in range(3):
            cut = rng.randrange(1, len(valid) - 1)
            cases.append(("truncated json", "POST", path, valid[:cut], JSON, 400, None))
        for raw in (b"", b"{", b"}", b"{'prompt': 'hi'}", b'{"prompt": "hi",}', b"nul", b"NaN", b"[1, 2]",
                    b'"hello"', b"42", b"null", b"true"):
            cases.append(("not a json object", "POST", path, raw, JSON, 400, None))
        # Invalid Unicode: bytes that are not UTF-8 (stray, overlong, an encoded surrogate, cut in two).
        for raw in (b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xc0\xaf"}', b'{"prompt": "\xed\xa0\x80"}',
                    b'{"prompt": "\xe2\x82"}', b"\xff\xfe{\x00}\x00"):
            cases.append(("invalid utf-8", "POST", path, raw, JSON, 400, None))
        # Deep nesting, as the body itself and inside a field the validators accept as any JSON.
        depth = rng.choice([1_000, 10_000, 100_000])
        cases.append(("deeply nested arrays", "POST", path, b"[" * depth, JSON, 400, None))
        cases.append(("deeply nested objects", "POST", path, b'{"a":' * depth, JSON, 400, None))
        cases.append(("nested past the limit", "POST", path,
                      b'{"metadata": ' + _deep('{"a":', "}", rng.randrange(101, 900)) + b"}", JSON, 400,
                      "metadata"))
        # Content types that are not JSON.
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/xml"):
            cases.append(("wrong content type", "POST", path, valid, {"content-type": media}, 415,
                          "content-type"))
    # Huge bodies (past the 32 MiB limit): one declared, one chunked without a length.
    huge = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    cases.append(("huge body", "POST", c, huge, JSON, 413, None))
    cases.append(("huge chunked body", "POST", ch, iter([huge[i:i + (4 << 20)] for i in range(0, len(huge), 4 << 20)]),
                  JSON, 413, None))
    # Wrong methods on every route, and routes that do not exist.
    for method, path in [("GET", c), ("PUT", ch), ("DELETE", tok), ("GET", detok), ("POST", "/health"),
                         ("POST", "/v1/models"), ("PATCH", "/metrics"), ("POST", "/server_info"),
                         ("POST", "/tokenizer_info"), ("PUT", "/v1/models")]:
        cases.append(("wrong method", method, path, b"{}" if method != "GET" else None, JSON, 405, None))
    for path in ("/v1/embeddings", "/v2/completions", "/v1/completions/extra", "/", "/v1", "/%ff", "/health/x"):
        cases.append(("no such route", "POST", path, b"{}", JSON, 404, None))
    return cases


def test_fuzzing_client_gets_4xx_naming_the_field_and_changes_nothing(served, seed):
    rng = random.Random(seed)
    before = _greedy(served.base)
    metrics_before = read_metrics(served.base)
    cases = _fuzz_cases(rng)
    rng.shuffle(cases)
    kinds = {kind for kind, *_ in cases}
    assert len(cases) >= 300 and len(kinds) >= 30, (len(cases), len(kinds))
    failures = []
    with httpx2.Client(base_url=served.base, timeout=120) as http:
        for kind, method, path, body, headers, status, field in cases:
            response = http.request(method, path, content=body, headers=headers)
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                failures.append((kind, path, response.status_code, response.text[:200]))
                continue
            named = field is None or field in (error.get("param") or "") or field in error["message"]
            if response.status_code != status or not error.get("message") or not error.get("type") or not named:
                failures.append((kind, path, field, response.status_code, error))
    assert not failures, f"{len(failures)} of {len(cases)} malformed requests were mishandled: {failures[:10]}"
    assert httpx2.get(served.base + "/health").json() == {"status": "ok"}
    assert _greedy(served.base) == before  # byte-identical after the storm
    after = wait_idle(served.base)
    assert after["dsv4jax:cache_pages_used"] == 0 and after["dsv4jax:num_requests_failed"] == 0
    # Nothing was submitted, so nothing was abandoned or refused as busy.
    for name in ("dsv4jax:num_requests_abandoned_total", "dsv4jax:num_requests_rejected_total"):
        assert after[name] == metrics_before[name], name
    assert not served.tracebacks.records, served.tracebacks.records[0].getMessage()


# ---- every field at its extremes, through the engine ---------------------------------------------------------


def test_every_field_at_its_extremes_runs_through_the_engine(served):
    """Each value validation accepts is safe on the device: greedy or sampled, the request completes, its tokens
    are in the vocabulary and its logprobs finite, and the engine goes on (the 503 engine_dead of an int32
    overflow in top_k must never come back)."""
    base = {"prompt": "Extremes", "max_tokens": 3, "temperature": 1.0, "seed": 1, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    extremes = [
        {"top_k": 2 ** 31 - 1}, {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"top_k": VOCAB}, {"top_k": VOCAB + 1},
        {"temperature": 0}, {"temperature": 1e-300}, {"temperature": 1e-6}, {"temperature": 2e-5},
        {"temperature": 100},
        {"top_p": 1e-300}, {"top_p": 1e-45}, {"top_p": 1.0}, {"min_p": 0}, {"min_p": 1}, {"min_p": 1e-300},
        {"seed": -2 ** 63}, {"seed": 2 ** 63 - 1}, {"seed": 0},
        {"presence_penalty": -2}, {"presence_penalty": 2}, {"frequency_penalty": -2}, {"frequency_penalty": 2},
        {"repetition_penalty": 1e-300}, {"repetition_penalty": 1e-3}, {"repetition_penalty": 10},
        {"logprobs": 0}, {"logprobs": 20}, {"echo": True, "logprobs": 20}, {"prompt_logprobs": 20},
        {"stop": ["x" * 1024] * 16}, {"stop_token_ids": list(range(256))}, {"stop_token_ids": [VOCAB - 1]},
        {"n": RUNNING + WAITING}, {"max_tokens": 12, "prompt": [5] * (MAX_MODEL_LEN - 12), "ignore_eos": True},
        {"prompt": [VOCAB - 1] * (MAX_MODEL_LEN - 1), "max_tokens": 1},
        {"prompt": [0], "max_tokens": 1, "echo": True}, {"prompt": [[0, 5]] * (RUNNING + WAITING)},
        {"logit_bias": {}}, {"min_tokens": 0}, {"best_of": 1},
    ]
    for change in extremes:
        body = {**base, **change}
        response = _post(served.base, "/v1/completions", body)
        assert response.status_code == 200, (change, response.text[:300])
        for choice in response.json()["choices"]:
            assert choice["finish_reason"] in ("stop", "length"), change
            tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
            assert all(0 <= t < VOCAB for t in tokens), change
            assert all(lp is None or (math.isfinite(lp) and lp <= 0) for lp in choice["logprobs"]["token_logprobs"])
    chat_extremes = [{"top_k": 2 ** 31 - 1}, {"temperature": 1e-300}, {"top_logprobs": 20, "logprobs": True},
                     {"max_completion_tokens": 1, "max_tokens": None}, {"n": RUNNING + WAITING}, {"repetition_penalty": 1e-300},
                     {"seed": 2 ** 63 - 1}, {"stop": "x" * 1024}]
    for change in chat_extremes:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 1.0, **change}
        response = _post(served.base, "/v1/chat/completions", body)
        assert response.status_code == 200, (change, response.text[:300])
    assert httpx2.get(served.base + "/health").json() == {"status": "ok"}
    assert wait_idle(served.base)["dsv4jax:num_requests_failed"] == 0


# ---- isolation ----------------------------------------------------------------------------------------------


POISON_SEED = 424242


@contextlib.contextmanager
def _poisoned_decode(engine):
    """A decode step whose batch holds a request seeded POISON_SEED fails, as a device error would: the whole
    batch's step raises, not just that row."""
    original = engine._executable

    def executable(kind, rows, chunk=None):
        run = original(kind, rows, chunk)
        if kind != "decode":
            return run

        def checked(params, caches, batch, *rest):
            if POISON_SEED in np.asarray(batch.sampling.seed).tolist():
                raise FloatingPointError("the device step failed (injected)")
            return run(params, caches, batch, *rest)
        return checked

    engine._executable = executable
    try:
        yield
    finally:
        del engine._executable


@contextlib.contextmanager
def _patched(owner, name, replacement):
    raw = owner.__dict__[name]  # as stored (a staticmethod stays one)
    setattr(owner, name, replacement)
    try:
        yield getattr(raw, "__func__", raw)
    finally:
        setattr(owner, name, raw)


def test_a_failing_request_fails_alone_and_the_engine_goes_on(served):
    bodies = [{"prompt": f"Request {i} of three", "max_tokens": 5, "temperature": 0} for i in range(3)]
    alone = [_post(served.base, "/v1/completions", b).json()["choices"][0]["text"] for b in bodies]
    poisoned = {**bodies[1], "temperature": 0.7, "seed": POISON_SEED}
    failed_before = read_metrics(served.base)["dsv4jax:num_requests_failed"]
    results = {}

    def send(name, body, path="/v1/completions"):
        results[name] = _post(served.base, path, body)

    with _poisoned_decode(served.engine):
        with served.gate.closed():  # all five queue up, then decode in one batch
            threads = [threading.Thread(target=send, args=(i, b))
                       for i, b in enumerate([bodies[0], poisoned, bodies[2]])]
            threads.append(threading.Thread(target=send, args=("stream", {**poisoned, "stream": True})))
            threads.append(threading.Thread(target=send, args=(
                "chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "seed": POISON_SEED},
                "/v1/chat/completions")))
            for t in threads:
                t.start()
            deadline = time.time() + 10
            while served.engine.stats()["waiting"] < 5 and time.time() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join(60)
    failed = results[1]
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["code"] == "generation_failed" and "FloatingPointError" in error["message"], error
    assert results["chat"].status_code == 500
    stream = results["stream"]
    assert stream.status_code == 200
    events = [line.removeprefix("data: ") for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_failed"
    # The others in the same batch finished as they would have alone; the engine is healthy.
    assert [results[i].json()["choices"][0]["text"] for i in (0, 2)] == [alone[0], alone[2]]
    assert httpx2.get(served.base + "/health").json() == {"status": "ok"} and served.async_engine.healthy
    metrics = wait_idle(served.base)
    assert metrics["dsv4jax:num_requests_failed"] == failed_before + 3 and metrics["dsv4jax:cache_pages_used"] == 0

    # Building a batch on the host (the OverflowError of an int32 cast) and one request's bookkeeping after the
    # device step fail that request only, too.
    def from_params(params, seeds):
        if any(p is not None and p.seed == POISON_SEED for p in params):
            raise OverflowError("Python int too large to convert to C int (injected)")
        return original_rows(params, seeds)

    def commit(self, r, out, row, count):
        if r.sampling.seed == POISON_SEED + 1:
            raise RuntimeError("bookkeeping failed (injected)")
        return original_commit(self, r, out, row, count)

    with _patched(engine_module.SamplingRows, "from_params", staticmethod(from_params)) as original_rows, \
            _patched(Engine, "_commit", commit) as original_commit:
        host = _post(served.base, "/v1/completions", poisoned)
        bookkeeping = _post(served.base, "/v1/completions", {**poisoned, "seed": POISON_SEED + 1})
        fine = _post(served.base, "/v1/completions", bodies[0])
    assert host.status_code == 500 and "OverflowError" in host.json()["error"]["message"]
    assert bookkeeping.status_code == 500 and "bookkeeping failed" in bookkeeping.json()["error"]["message"]
    assert fine.json()["choices"][0]["text"] == alone[0]
    assert httpx2.get(served.base + "/health").json() == {"status": "ok"}


# ---- admission -------------------------------------------------------------------------------------------------


def test_admission_never_fits_is_400_busy_is_503_and_refusals_crowd_out_nobody(served):
    capacity = RUNNING + WAITING
    # Never fits: n × prompts past what the engine ever holds; the message names n, the prompt count, the limit.
    response = _post(served.base, "/v1/completions", {"prompt": [[0, 5]] * 4, "n": 4, "max_tokens": 1})
    assert response.status_code == 400 and "retry-after" not in response.headers
    error = response.json()["error"]
    assert error["code"] == "batch_too_large" and "n=4" in error["message"] and "4 prompts" in error["message"]
    assert str(capacity) in error["message"]
    response = _post(served.base, "/v1/completions", {"prompt": [[0, 5]] * 400, "max_tokens": 1})
    assert response.status_code == 400 and "400 prompts" in response.json()["error"]["message"]
    before = read_metrics(served.base)

    async def clients(count, body):
        async with httpx2.AsyncClient(base_url=served.base, timeout=120) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(count)))

    body = {"prompt": "One client of many", "max_tokens": 2, "temperature": 0}
    answers = {}
    with served.gate.closed():
        # 40 clients at once while the engine is held: the 8 free running slots and the 4 waiting places take
        # 12 of them (the queue limit counts only requests that will wait), the rest hear 503 with Retry-After.
        runner = threading.Thread(target=lambda: answers.update(first=asyncio.run(clients(40, body))))
        runner.start()
        deadline = time.time() + 30
        while served.engine.stats()["waiting"] < capacity and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the refused ones are answered at once
        queued = served.engine.stats()["waiting"]
        # A batch that does not fit now is refused whole (503: busy, it would fit later) ...
        batch = _post(served.base, "/v1/completions", {"prompt": [[0, 5]] * 2, "n": 2, "max_tokens": 1})
        assert queued == capacity, queued
    runner.join(120)
    statuses = sorted(a.status_code for a in answers["first"])
    assert statuses == [200] * capacity + [503] * (40 - capacity), statuses
    busy = next(a for a in answers["first"] if a.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"
    assert batch.status_code == 503 and batch.headers["retry-after"] == "1"
    wait_idle(served.base)
    # ... and leaves nothing behind: with 2 places left, a refused batch of 4 does not take them from others.
    with served.gate.closed():
        runner = threading.Thread(target=lambda: answers.update(second=asyncio.run(clients(capacity - 2, body))))
        runner.start()
        deadline = time.time() + 30
        while served.engine.stats()["waiting"] < capacity - 2 and time.time() < deadline:
            time.sleep(0.01)
        refused = _post(served.base, "/v1/completions", {"prompt": [[0, 5]] * 4, "max_tokens": 1})
        others = {}
        late = [threading.Thread(target=lambda i=i: others.update({i: _post(served.base, "/v1/completions", body)}))
                for i in range(2)]
        for t in late:
            t.start()
        deadline = time.time() + 30
        while served.engine.stats()["waiting"] < capacity and time.time() < deadline:
            time.sleep(0.01)
    runner.join(120)
    for t in late:
        t.join(60)
    assert refused.status_code == 503
    assert [others[i].status_code for i in range(2)] == [200, 200]
    assert all(a.status_code == 200 for a in answers["second"])
    after = wait_idle(served.base)
    # Refusals are counted once per HTTP request and never as abandoned.
    assert after["dsv4jax:num_requests_abandoned_total"] == before["dsv4jax:num_requests_abandoned_total"]
    assert after["dsv4jax:num_requests_rejected_total"] == before["dsv4jax:num_requests_rejected_total"] + 28 + 2


def test_a_disconnect_is_abandoned_once(served):
    before = read_metrics(served.base)["dsv4jax:num_requests_abandoned_total"]
    with served.gate.closed():
        with pytest.raises(httpx2.TimeoutException):
            _post(served.base, "/v1/completions", {"prompt": "leaving", "max_tokens": 4}, timeout=0.5)
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(served.base + "/v1/chat/completions", timeout=0.5, json={
                "messages": [{"role": "user", "content": "leaving"}], "max_tokens": 4, "stream": True})
        time.sleep(0.3)
    after = wait_idle(served.base)
    assert after["dsv4jax:num_requests_abandoned_total"] == before + 2
    assert after["dsv4jax:cache_pages_used"] == 0


# ---- evaluation harnesses ------------------------------------------------------------------------------------


def _loglik(pairs: list[tuple], tmp_path) -> list[float]:
    """`python -m dsv4jax.eval loglik` (in this process) on (context, continuation) pairs, fp32."""
    from dsv4jax.eval.__main__ import main

    data, out = tmp_path / "pairs.jsonl", tmp_path / "scores.json"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in pairs))
    assert main(["loglik", "--data", str(data), "--model", str(RANDOM_MODEL), "--dtype", "float32",
                 "--batch-size", "32", "--out", str(out)]) == 0
    return [r["logprob"] for r in json.loads(out.read_text())["results"]]


def test_lm_eval_request_shapes_score_as_the_evaluator(served, tmp_path):
    """The payloads lm-evaluation-harness's local-completions sends for loglikelihood (and rolling
    loglikelihood), with the context length counted as its tokenizers count it, give the per-token logprobs of
    `dsv4jax.eval loglik` (fp32). The BOS rule (SERVING §E): a text prompt gets BOS first
    (add_special_tokens, as the model directory's HF tokenizer adds it) unless it starts with BOS already; echo
    returns the prompt's tokens including that BOS, whose logprob is None."""
    tokenizer = served.model.tokenizer
    texts = [("The capital of France is", " Paris"), ("def add(a, b):", "\n    return a + b"), ("", "hello world")]
    ids_cases, text_cases = [], []  # (payload prompt, ctxlen as lm-eval counts it, context ids, continuation ids)
    for context, continuation in texts:
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
        with_bos = [0] + ctx  # lm-eval's add_bos_token=True, or its prefix token for an empty context
        if ctx:  # tokenized requests, lm-eval's default: the ids as its tokenizer made them, no BOS
            ids_cases.append((ctx + cont, len(ctx), ctx, cont))
        ids_cases.append((with_bos + cont, len(with_bos), with_bos, cont))  # tokenized, BOS counted
        # Text requests (tokenized_requests=False): lm-eval decodes its ids to text, so with BOS counted the text
        # starts with BOS's string; a client whose tokenizer adds BOS (the HF default) sends the plain text.
        text_cases.append((BOS_TEXT + context + continuation, len(with_bos), with_bos, cont))
        text_cases.append((context + continuation, len(with_bos), with_bos, cont))
    whole = texts[1][0] + texts[1][1]  # rolling: one window, the whole text after the prefix token
    rolling = ([0] + tokenizer.encode(whole), 1, [0], tokenizer.encode(whole))
    ids_cases.append(rolling)
    cases = ids_cases + text_cases
    per_token = [(c + x[:k], [x[k]]) for _, _, c, x in cases for k in range(len(x))]
    expected = _loglik([(c, x) for _, _, c, x in cases] + per_token, tmp_path)
    totals = expected[:len(cases)]
    for max_tokens in (1, 0):
        answers = []
        for group in (ids_cases, text_cases):  # one batched request per kind, as lm-eval sends a batch
            payload = {"model": served.model.name, "prompt": [p for p, *_ in group], "temperature": 0,
                       "max_tokens": max_tokens, "logprobs": 1, "seed": 1234, "echo": True}
            response = _post(served.base, "/v1/completions", payload)
            assert response.status_code == 200, response.text
            answers += sorted(response.json()["choices"], key=lambda c: c["index"])
        singles = iter(expected[len(cases):])
        for (prompt, ctxlen, ctx, cont), choice, total in zip(cases, answers, totals):
            logprobs = choice["logprobs"]
            assert logprobs["token_logprobs"][0] is None  # the first prompt token has nothing before it
            assert len(logprobs["token_logprobs"]) == len(ctx) + len(cont) + max_tokens, prompt
            if max_tokens == 0:
                assert choice["finish_reason"] == "length" and len(logprobs["tokens"]) == len(ctx) + len(cont)
            # lm-eval's parse_logprobs: token_logprobs[ctxlen:-1] with max_tokens=1 (the generated one dropped).
            end = len(logprobs["token_logprobs"]) - max_tokens
            scored, tops = logprobs["token_logprobs"][ctxlen:end], logprobs["top_logprobs"][ctxlen:end]
            assert len(scored) == len(cont)
            for logprob, top in zip(scored, tops):
                assert math.isclose(logprob, next(singles), abs_tol=LOGPROB_TOLERANCE), prompt
                assert max(top.values()) >= logprob - 1e-6  # is_greedy compares with max(top_logprobs)
            assert math.isclose(sum(scored), total, abs_tol=len(cont) * LOGPROB_TOLERANCE), prompt


def test_remote_tokenizer_endpoints_answer_as_lm_eval_reads_them(served):
    """lm-eval's tokenizer_backend=remote: GET /tokenizer_info (vLLM's shape) and /tokenize with
    add_special_tokens=false give BOS and EOS ids; /tokenize and /detokenize match the completions' rule."""
    info = httpx2.get(served.base + "/tokenizer_info").json()
    assert info["tokenizer_class"] and info["bos_token"] == BOS_TEXT and info["eos_token"] == EOS_TEXT
    assert info["add_bos_token"] is True and info["model_max_length"] == MAX_MODEL_LEN
    ids = lambda text, special: _post(served.base, "/tokenize", {"prompt": text, "add_special_tokens": special})  # noqa: E731
    assert ids(info["bos_token"], False).json()["tokens"] == [0]
    assert ids(info["eos_token"], False).json()["tokens"] == [1]
    text = "Rolling windows"
    plain, special = ids(text, False).json()["tokens"], ids(text, True).json()["tokens"]
    assert special == [0] + plain and ids(BOS_TEXT + text, True).json()["tokens"] == special  # no double BOS
    assert _post(served.base, "/detokenize", {"tokens": special}).json()["prompt"] == text
    echo = _post(served.base, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert len(echo.json()["choices"][0]["logprobs"]["tokens"]) == len(special)
    assert echo.json()["choices"][0]["logprobs"]["tokens"][0] == BOS_TEXT


def test_a_hugging_face_tokenizer_from_the_model_directory_encodes_as_the_server(served):
    """models/dsv4-tiny ships tokenizer_config.json (BOS/EOS) beside tokenizer.json: transformers.AutoTokenizer and
    `tokenizers` loaded from the directory count exactly the tokens the server's BOS rule gives."""
    import tokenizers
    import transformers

    from dsv4jax.serve.app import ServerState, _encode_text
    from dsv4jax.tokenizer import JsonTokenizer, hf_tokenizer_config

    hf = transformers.AutoTokenizer.from_pretrained(TINY_MODEL)
    raw = tokenizers.Tokenizer.from_file(str(TINY_MODEL / "tokenizer.json"))
    served_tokenizer = JsonTokenizer(TINY_MODEL / "tokenizer.json")
    config = json.loads((TINY_MODEL / "config.json").read_text())
    assert json.loads((TINY_MODEL / "tokenizer_config.json").read_text()) == hf_tokenizer_config(
        served_tokenizer, config["bos_token_id"], config["eos_token_id"], config["max_position_embeddings"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.bos_token, hf.eos_token) == (0, 1, BOS_TEXT, EOS_TEXT)
    state = ServerState(engine=None, model=SimpleNamespace(tokenizer=served_tokenizer, config=SimpleNamespace(
        bos_token_id=0, eos_token_id=1, vocab_size=config["vocab_size"])), served_names=["dsv4-tiny"],
        max_model_len=4096)
    for text in ["def fibonacci(n):\n    return n", "  leading spaces", "émoji ✓ 🐍", "<｜User｜>Hi<｜Assistant｜>",
                 "x"]:
        server_ids = asyncio.run(_encode_text(state, text, "prompt"))
        assert hf(text).input_ids == server_ids == raw.encode(text).ids, text
        assert hf(text, add_special_tokens=False).input_ids == server_ids[1:], text


def test_the_training_export_writes_the_hugging_face_tokenizer_files(tmp_path):
    import transformers

    from dsv4jax.tokenizer import JsonTokenizer, write_hf_tokenizer
    from dsv4jax.train.bpe import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main():\n    print('hello world')\n" * 50)
    train_tokenizer([corpus], 400, tmp_path / "trained.json")
    export = tmp_path / "export"
    export.mkdir()
    write_hf_tokenizer(tmp_path / "trained.json", export, 0, 1, 2048)
    hf = transformers.AutoTokenizer.from_pretrained(export)
    text = "def main(): print('hi')"
    assert hf(text).input_ids == [0] + JsonTokenizer(export / "tokenizer.json").encode(text)
    assert hf.eos_token == EOS_TEXT and hf.model_max_length == 2048


# ---- the smaller fixes ---------------------------------------------------------------------------------------


def test_large_prompts_never_block_the_event_loop(served):
    """A 10 MB prompt is refused before tokenizing (it cannot fit the context) and a long /tokenize runs in a
    worker thread: /health keeps answering meanwhile."""
    huge = "a" * (10 << 20)
    results = {}

    def send(name, path, body):
        results[name] = httpx2.post(served.base + path, content=json.dumps(body).encode(), headers=JSON,
                                    timeout=120)

    senders = [threading.Thread(target=send, args=("completion", "/v1/completions", {"prompt": huge})),
               threading.Thread(target=send, args=("tokenize", "/tokenize", {"prompt": huge[:3 << 20]}))]
    for t in senders:
        t.start()
    slowest = 0.0
    while any(t.is_alive() for t in senders):
        began = time.perf_counter()
        assert httpx2.get(served.base + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.02)
    for t in senders:
        t.join()
    assert results["completion"].status_code == 400
    assert results["completion"].json()["error"]["code"] == "context_length_exceeded"
    assert results["tokenize"].json()["count"] == (3 << 20) + 1
    assert slowest < 2.0, slowest


def test_messages_paths_and_disconnects(served):
    response = _post(served.base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                           "max_completion_tokens": 5000})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "max_completion_tokens"
    assert "max_completion_tokens is 5000" in error["message"] and "max_tokens" not in error["message"].replace(
        "max_completion_tokens", "")
    # A trailing slash is the same route (no body-less 307); an unknown one is a JSON 404.
    assert httpx2.get(served.base + "/v1/models/").json()["data"]
    slash = _post(served.base, "/v1/completions/", {"prompt": "x", "max_tokens": 1})
    assert slash.status_code == 200 and slash.json()["choices"]
    missing = httpx2.get(served.base + "/v1/nothing/")
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    # A client that goes away mid-body: no traceback in the server's log.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
            time.sleep(0.1)
    time.sleep(0.3)
    assert not served.tracebacks.records, served.tracebacks.records[0].getMessage()
    assert httpx2.get(served.base + "/health").json() == {"status": "ok"}
