"""`python -m dsv4jax.serve` end to end: the real engine on the random-weight model, started once for this module on
127.0.0.1 (a free port), driven by the official `openai` package and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
from served import wait_idle

ROOT = Path(__file__).resolve().parent.parent
# Small and cheap on CPU: one prefill shape and one decode shape (two compiles at warm-up). float32 so that the
# engine's logprobs can be held to the model's own log-softmax tightly.
# The random-weight model: its outputs are noise that never closes </think> nor stops early, which these tests use.
RANDOM_MODEL = str(ROOT / "models" / "dsv4-random-tiny")
SERVER_ARGS = ["--model", RANDOM_MODEL, "--dtype", "float32", "--max-model-len", "512", "--page-tokens", "128", "--prefill-chunk", "64",
               "--prefill-buckets", "64", "--max-prefill-rows", "1", "--max-running-requests", "4",
               "--decode-buckets", "4", "--max-waiting-requests", "64"]
MAX_MODEL_LEN = 512
LOGPROB_TOLERANCE = 1e-3  # paged engine vs one full forward, both float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "dsv4jax.serve", "--port", str(port), *SERVER_ARGS],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was healthy:\n"
                                   + log_path.read_text()[-3000:])
            try:
                if httpx2.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not become healthy in 600 s")
            time.sleep(1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def model_name(server):
    return httpx2.get(server + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference_model():
    """The same model in this process (random weights from the same seed), for log-softmax checks."""
    import dsv4jax
    return dsv4jax.load(RANDOM_MODEL, dtype="float32", progress=False)


def _log_softmax(model, ids: list[int]) -> np.ndarray:
    logits = np.asarray(model.logits(ids), np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)


# ---- models, health, tokenize ----------------------------------------------------------------------------------


def test_models_health_and_tokenize(server, model_name):
    assert "random weights" in model_name  # a model without trained weights is named as what it is
    assert httpx2.get(server + "/health").json() == {"status": "ok"}
    tokens = httpx2.post(server + "/tokenize", json={"prompt": "Hi there"}).json()
    assert tokens["tokens"][0] == 0 and tokens["count"] == len("Hi there") + 1  # BOS + bytes
    assert httpx2.post(server + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Hi there"
    # The chat encoding of SERVING §D.2: the generation prompt ends in </think> (chat) or <think> (thinking).
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    plain = httpx2.post(server + "/tokenize", json=chat).json()["tokens"]
    thinking = httpx2.post(server + "/tokenize",
                           json={**chat, "chat_template_kwargs": {"thinking": True}}).json()["tokens"]
    detok = lambda ids: httpx2.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"]  # noqa: E731
    assert detok(plain) == "<｜User｜>Hi<｜Assistant｜></think>"
    assert detok(thinking) == "<｜User｜>Hi<｜Assistant｜><think>"


# ---- the openai package ------------------------------------------------------------------------------------------


def test_completion_greedy_matches_model_logprobs(client, model_name, reference_model):
    out = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens == len("The capital of France is") + 1
    # Each generated token is the argmax of the model's own distribution and carries its log-softmax.
    prompt = reference_model.encode("The capital of France is")
    generated = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    expected = _log_softmax(reference_model, prompt + generated)
    for i, (token, logprob, top) in enumerate(zip(generated, choice.logprobs.token_logprobs,
                                                  choice.logprobs.top_logprobs)):
        row = expected[len(prompt) - 1 + i]
        assert math.isclose(logprob, row[token], abs_tol=LOGPROB_TOLERANCE), i
        assert row[token] >= row.max() - LOGPROB_TOLERANCE  # greedy picked (one of) the best
        assert 1 <= len(top) <= 4 and math.isclose(max(top.values()), logprob, abs_tol=1e-6)


def test_loglikelihood_echo_matches_log_softmax(server, model_name, reference_model):
    """lm-evaluation-harness local-completions: token-id prompts in a batch, echo, max_tokens=1, logprobs=1."""
    prompts = [[0, 72, 101, 108, 108, 111, 44, 32, 119], [0, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140]]
    body = {"model": model_name, "prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1,
            "echo": True, "seed": 1234}
    answer = httpx2.post(server + "/v1/completions", json=body, timeout=120).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for prompt, choice in zip(prompts, answer["choices"]):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1 and logprobs["token_logprobs"][0] is None
        expected = _log_softmax(reference_model, prompt)
        for position in range(1, len(prompt)):
            assert math.isclose(logprobs["token_logprobs"][position], expected[position - 1, prompt[position]],
                                abs_tol=LOGPROB_TOLERANCE), position
            top = logprobs["top_logprobs"][position]
            assert math.isclose(max(top.values()), expected[position - 1].max(), abs_tol=LOGPROB_TOLERANCE)
        assert math.isclose(logprobs["token_logprobs"][-1], expected[-1].max(), abs_tol=LOGPROB_TOLERANCE)
        # lm-eval's score: sum over the continuation (here the last four prompt tokens).
        score = sum(logprobs["token_logprobs"][len(prompt) - 4:-1])
        assert math.isclose(score, sum(expected[p - 1, prompt[p]] for p in range(len(prompt) - 4, len(prompt))),
                            abs_tol=4 * LOGPROB_TOLERANCE)


def test_n_and_seeds(client, model_name):
    def run(seed, n=3):
        out = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=6,
                                        temperature=1.0, n=n, seed=seed)
        assert [c.index for c in out.choices] == list(range(n))
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = run(7)
    assert run(7) == first  # a seed reproduces every choice
    assert len(set(first)) > 1  # n choices are n different samples (seeds 7, 8, 9)
    assert run(8, n=1)[0] == first[1]  # choice j of seed s is seed s + j
    assert run(1234, n=1) != run(4321, n=1)


def _stop_point(text: str) -> int | None:
    """An index ≥ 1 whose character is printable ASCII and does not occur earlier: stopping there cuts the text
    exactly before it."""
    return next((i for i in range(1, len(text)) if text[i].isascii() and text[i].isprintable()
                 and text[i] not in text[:i]), None)


def test_stop_strings(client, model_name):
    free = client.completions.create(model=model_name, prompt="Stop here:", max_tokens=16, temperature=0)
    text = free.choices[0].text
    at = _stop_point(text)
    assert at is not None, f"no character to stop at in {text!r}"
    cut = client.completions.create(model=model_name, prompt="Stop here:", max_tokens=16, temperature=0,
                                    stop=[text[at], "never-appears"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:at]

    messages = [{"role": "user", "content": "Go"}]
    content = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16,
                                             temperature=0).choices[0].message.content
    at = _stop_point(content)
    assert at is not None, f"no character to stop at in {content!r}"
    cut = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                         stop=content[at])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == content[:at]


def test_chat_and_streaming_chat(client, model_name):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.content) == whole.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in choice.logprobs.content)

    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    content, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert roles == ["assistant"] and finish == choice.finish_reason
    assert content == (choice.message.content or "")  # streaming and not give the same text
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_thinking_toggle_splits_reasoning(client, model_name):
    """Thinking on: everything before </think> is reasoning_content (the random model never closes it)."""
    messages = [{"role": "user", "content": "Think."}]
    plain = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0)
    assert not getattr(plain.choices[0].message, "reasoning_content", None)
    for extra in ({"chat_template_kwargs": {"thinking": True}}, {"reasoning_effort": "high"},
                  {"thinking": {"type": "enabled"}}):
        thought = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6,
                                                 temperature=0, extra_body=extra)
        message = thought.choices[0].message
        assert message.reasoning_content and not message.content, extra


def test_streaming_completion_with_usage(server, model_name):
    body = {"model": model_name, "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    whole = httpx2.post(server + "/v1/completions", json={**body, "stream": False, "stream_options": None},
                        timeout=60).json()
    with httpx2.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    text = "".join(c["text"] for chunk in chunks[:-1] for c in chunk["choices"])
    assert text == whole["choices"][0]["text"]
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_prefix_cache_hits_are_reported_in_usage_and_metrics(server, model_name):
    """A prompt that shares a full page (128 tokens here) with an earlier one is served from the prefix cache
    (SERVING §D.8): the same greedy text, `usage.prompt_tokens_details.cached_tokens`, the metrics."""
    rng = np.random.default_rng()
    shared = rng.integers(3, 256, size=200).tolist()
    first, second = shared + [7, 8, 9], shared + [10, 11]
    body = {"model": model_name, "max_tokens": 4, "temperature": 0}
    cold = httpx2.post(server + "/v1/completions", json={**body, "prompt": second}, timeout=60).json()
    httpx2.post(server + "/v1/completions", json={**body, "prompt": first}, timeout=60).raise_for_status()
    with httpx2.stream("POST", server + "/v1/completions", timeout=60, json={
            **body, "prompt": second, "stream": True, "stream_options": {"include_usage": True}}) as response:
        chunks = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line and line != "data: [DONE]"]
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    assert "".join(c["text"] for chunk in chunks[:-1] for c in chunk["choices"]) == cold["choices"][0]["text"]
    metrics = httpx2.get(server + "/metrics").text
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("dsv4jax:prefix_cache_hits "))
    assert hits >= 256  # the warm first prompt and the streamed second one, 128 each at least


# ---- malformed requests ------------------------------------------------------------------------------------------


def _malformed(model: str) -> list[tuple[str, str, str, bytes | None, int]]:
    """(kind, method, path, body, expected status) — at least 20 kinds."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    ok = {"model": model, "prompt": "hi", "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    j = lambda **changes: json.dumps({**ok, **changes}).encode()  # noqa: E731
    jc = lambda **changes: json.dumps({**chat, **changes}).encode()  # noqa: E731
    drop = lambda d, key: json.dumps({k: v for k, v in d.items() if k != key}).encode()  # noqa: E731
    long_prompt = list(range(3, 3 + 200)) * 3  # 600 tokens > max_model_len
    return [
        ("invalid json", "POST", c, b'{"prompt": "hi",', 400),
        ("json array", "POST", c, b"[1, 2]", 400),
        ("empty body", "POST", c, b"", 400),
        ("not utf-8", "POST", c, b"\xff\xfe{", 400),
        ("missing prompt", "POST", c, drop(ok, "prompt"), 400),
        ("prompt number", "POST", c, j(prompt=5), 400),
        ("prompt empty list", "POST", c, j(prompt=[]), 400),
        ("prompt empty string", "POST", c, j(prompt=""), 400),
        ("negative token id", "POST", c, j(prompt=[1, -3]), 400),
        ("token id past vocab", "POST", c, j(prompt=[0, 99999]), 400),
        ("batch with one bad prompt", "POST", c, j(prompt=[[0, 5], [0, 10**6]]), 400),
        ("max_tokens negative", "POST", c, j(max_tokens=-1), 400),
        ("max_tokens string", "POST", c, j(max_tokens="5"), 400),
        ("max_tokens zero", "POST", c, j(max_tokens=0), 400),
        ("max_tokens past context", "POST", c, j(max_tokens=10_000), 400),
        ("prompt past context", "POST", c, j(prompt=long_prompt), 400),
        ("temperature negative", "POST", c, j(temperature=-0.5), 400),
        ("temperature string", "POST", c, j(temperature="hot"), 400),
        ("top_p zero", "POST", c, j(top_p=0), 400),
        ("top_p above one", "POST", c, j(top_p=1.5), 400),
        ("top_k below -1", "POST", c, j(top_k=-5), 400),
        ("min_p above one", "POST", c, j(min_p=2), 400),
        ("n zero", "POST", c, j(n=0), 400),
        ("n huge", "POST", c, j(n=1000), 400),
        ("n boolean", "POST", c, j(n=True), 400),
        ("logprobs too many", "POST", c, j(logprobs=50), 400),
        ("presence_penalty out of range", "POST", c, j(presence_penalty=3), 400),
        ("repetition_penalty zero", "POST", c, j(repetition_penalty=0), 400),
        ("stop wrong type", "POST", c, j(stop=[1, 2]), 400),
        ("stop_token_ids past vocab", "POST", c, j(stop_token_ids=[10**6]), 400),
        ("seed string", "POST", c, j(seed="abc"), 400),
        ("unknown field", "POST", c, j(frobnicate=True), 400),
        ("logit_bias unsupported", "POST", c, j(logit_bias={"5": 10}), 400),
        ("best_of other than n", "POST", c, j(best_of=3), 400),
        ("stream_options without stream", "POST", c, j(stream_options={"include_usage": True}), 400),
        ("unknown model", "POST", c, j(model="gpt-4o"), 404),
        ("chat messages missing", "POST", ch, drop(chat, "messages"), 400),
        ("chat messages empty", "POST", ch, jc(messages=[]), 400),
        ("chat bad role", "POST", ch, jc(messages=[{"role": "robot", "content": "x"}]), 400),
        ("chat image content", "POST", ch,
         jc(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400),
        ("chat ends with assistant", "POST", ch,
         jc(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), 400),
        ("chat tool without id", "POST", ch,
         jc(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}]), 400),
        ("chat top_logprobs without logprobs", "POST", ch, jc(top_logprobs=3), 400),
        ("chat tool_choice required", "POST", ch,
         jc(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required"), 400),
        ("chat bad tool name", "POST", ch, jc(tools=[{"type": "function", "function": {"name": "no spaces"}}]), 400),
        ("chat bad reasoning_effort", "POST", ch, jc(reasoning_effort="extreme"), 400),
        ("chat thinking bad type", "POST", ch, jc(thinking={"type": "sometimes"}), 400),
        ("chat unknown template kwarg", "POST", ch, jc(chat_template_kwargs={"mode": 1}), 400),
        ("chat max_tokens disagree", "POST", ch, jc(max_tokens=2, max_completion_tokens=3), 400),
        ("chat unknown model", "POST", ch, jc(model="other"), 404),
        ("wrong method", "GET", c, None, 405),
        ("no such route", "POST", "/v1/embeddings", b"{}", 404),
        ("detokenize past vocab", "POST", "/detokenize", json.dumps({"tokens": [10**6]}).encode(), 400),
        ("tokenize both inputs", "POST", "/tokenize",
         json.dumps({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}).encode(), 400),
    ]


def test_malformed_requests_change_nothing(server, model_name):
    reference = {"model": model_name, "prompt": "Same answer?", "max_tokens": 6, "temperature": 0.8, "seed": 3}
    before = httpx2.post(server + "/v1/completions", json=reference, timeout=60).json()["choices"][0]["text"]
    kinds = _malformed(model_name)
    assert len(kinds) >= 20
    sent = 0
    with httpx2.Client(base_url=server, timeout=60) as http:
        for round_ in range(4):
            for kind, method, path, body, status in kinds:
                response = http.request(method, path, content=body, headers={"content-type": "application/json"})
                assert response.status_code == status, (kind, response.status_code, response.text)
                error = response.json()["error"]
                assert error["message"] and error["type"], kind
                sent += 1
    assert sent >= 200
    assert httpx2.get(server + "/health").json() == {"status": "ok"}
    after = httpx2.post(server + "/v1/completions", json=reference, timeout=60).json()["choices"][0]["text"]
    assert after == before
    metrics = wait_idle(server)
    assert metrics["dsv4jax:cache_pages_used"] == 0 and metrics["dsv4jax:num_requests_running"] == 0


def test_error_messages_name_the_field(server, model_name):
    response = httpx2.post(server + "/v1/completions", json={"model": model_name, "prompt": "x", "top_p": 7})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_p"
    response = httpx2.post(server + "/v1/completions",
                           json={"model": model_name, "prompt": "x" * 600, "max_tokens": 1})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0).completions.create(
            model="nope", prompt="x", max_tokens=1)


# ---- many clients, some leaving ----------------------------------------------------------------------------------


def test_concurrent_streams_with_disconnects(server, model_name):
    """32 streaming clients, every fourth leaves after its first token: the rest complete and nothing leaks."""
    async def one(i: int):
        body = {"model": model_name, "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 12,
                "temperature": 0.7, "seed": i, "stream": True}
        leaves = i % 4 == 0
        async with httpx2.AsyncClient(base_url=server, timeout=300) as http:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                finish, done = None, False
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line.removeprefix("data: "))
                    for c in chunk["choices"]:
                        finish = c["finish_reason"] or finish
                        if leaves and (c["delta"].get("content") or c["delta"].get("reasoning_content")):
                            return "left"
        return "done" if done and finish in ("stop", "length") else f"incomplete {finish} {done}"

    async def everyone():
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(everyone())
    assert results.count("left") <= 8
    assert all(r == "done" for i, r in enumerate(results) if i % 4), results
    metrics = wait_idle(server)
    assert metrics["dsv4jax:num_requests_running"] == 0
    assert metrics["dsv4jax:num_requests_waiting"] == 0
    assert metrics["dsv4jax:cache_pages_used"] == 0 and metrics["dsv4jax:cache_pages_total"] > 0
    assert metrics["dsv4jax:num_requests_aborted"] >= 1  # the leavers were aborted, not run to the end
    assert httpx2.get(server + "/health").json() == {"status": "ok"}
