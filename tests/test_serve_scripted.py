"""The HTTP layer over a scripted engine that follows the Engine API (this fake lives only here): DSML tool calls
through the openai client (streamed and not), the 503 of a full queue, abort on a non-streaming disconnect, and a
dead engine. The real engine's end-to-end tests are in test_serve_api.py."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import httpx2
import openai
import pytest

from dsv4jax.serve.app import build_app
from dsv4jax.serve.async_engine import AsyncEngine
from dsv4jax.serve.chat import DSML, THINK_END
from dsv4jax.serve.engine import AdmissionError, QueueFullError, RequestOutput
from dsv4jax.serve.metrics import ServerMetrics
from dsv4jax.tokenizer import ByteTokenizer
from served import uvicorn_thread

TOOL_SCRIPT = (f"The user wants weather.{THINK_END}Let me check.\n\n<{DSML}tool_calls>\n"
               f'<{DSML}invoke name="get_weather">\n'
               f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>\n'
               f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>\n'
               f"</{DSML}invoke>\n</{DSML}tool_calls>")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@dataclass
class _Running:
    rid: str
    ids: list[int]
    max_tokens: int
    sent: int = 0
    aborted: bool = False


@dataclass
class ScriptedEngine:
    """Emits the byte tokens of `script` for every request, `per_step` tokens a step. `paused` holds all
    requests (for the queue and disconnect tests); `crash` makes the next step raise."""

    script: str = "Hello from the script."
    per_step: int = 3
    max_waiting: int = 4
    paused: bool = False
    crash: bool = False
    tokenizer: ByteTokenizer = field(default_factory=lambda: ByteTokenizer(512))
    requests: dict = field(default_factory=dict)
    aborted: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def submit(self, prompt_ids, sampling, request_id=None):
        if not prompt_ids:
            raise AdmissionError("the prompt is empty")
        with self.lock:
            waiting = sum(1 for r in self.requests.values() if r.sent == 0)
            if waiting >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting")
            self.requests[request_id] = _Running(request_id, self.tokenizer.encode(self.script),
                                                 sampling.max_tokens)
        return request_id

    def abort(self, rid):
        with self.lock:
            if rid in self.requests:
                self.requests[rid].aborted = True

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        if self.crash:
            raise RuntimeError("scripted engine failure")
        outputs = []
        with self.lock:
            for request in list(self.requests.values()):
                if request.aborted:
                    self.aborted.append(request.rid)
                    outputs.append(self._output(request, [], "abort"))
                elif not self.paused:
                    new = request.ids[request.sent:request.sent + self.per_step]
                    request.sent += len(new)
                    limit = min(len(request.ids), request.max_tokens)
                    if request.sent >= limit:
                        new = new[:len(new) - (request.sent - limit)]
                        request.sent = limit
                    reason = None if request.sent < limit else ("stop" if limit == len(request.ids) else "length")
                    outputs.append(self._output(request, new, reason))
                else:
                    continue
                if outputs[-1].finished:
                    del self.requests[request.rid]
        time.sleep(0.005)
        return outputs

    def _output(self, request, new, reason):
        return RequestOutput(request_id=request.rid, token_ids=new, text=self.tokenizer.decode(new), logprobs=None,
                             top_logprobs=None, prompt_logprobs=None, prompt_top_logprobs=None,
                             finished=reason is not None, finish_reason=reason, num_prompt_tokens=1,
                             num_output_tokens=request.sent)

    def stats(self):
        return dict(running=len(self.requests), waiting=0, pages_used=len(self.requests), pages_total=8,
                    drafted_tokens=0, accepted_tokens=0, finished=0, aborted=len(self.aborted))


def _model():
    tokenizer = ByteTokenizer(512)
    return SimpleNamespace(name="scripted", tokenizer=tokenizer,
                           config=SimpleNamespace(vocab_size=512, bos_token_id=0, eos_token_id=1),
                           encode=lambda text: [0] + tokenizer.encode(text))


@contextlib.contextmanager
def serving(engine):
    """The app over `engine`, served by uvicorn in a thread on 127.0.0.1 (a free port)."""
    async_engine = AsyncEngine(engine, ServerMetrics()).start()
    app = build_app(async_engine, _model(), max_model_len=4096)
    try:
        with uvicorn_thread(app) as port:
            yield f"http://127.0.0.1:{port}", async_engine
    finally:
        async_engine.shutdown()


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine()
    with serving(engine) as (base, _):
        yield base, engine


def test_tool_calls_through_the_openai_client(scripted):
    base, engine = scripted
    engine.script = TOOL_SCRIPT
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    request = dict(model="scripted", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                   max_tokens=1000, extra_body={"chat_template_kwargs": {"thinking": True}})
    whole = client.chat.completions.create(**request)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.reasoning_content == "The user wants weather." and message.content == "Let me check."
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}

    calls, content, reasoning, finish = {}, "", "", None
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or call.id
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("The user wants weather.", "Let me check.", "tool_calls")
    assert DSML not in content + reasoning
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 3}

    # tool_choice "none": no parsing, the text is content.
    plain = client.chat.completions.create(**{**request, "tool_choice": "none"})
    assert plain.choices[0].message.tool_calls is None and DSML in plain.choices[0].message.content


def test_full_queue_answers_503_with_retry_after(scripted):
    base, engine = scripted
    engine.script, engine.paused = "x" * 5, True
    answers = []

    def queued():
        answers.append(httpx2.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 3}, timeout=30))

    waiters = [threading.Thread(target=queued) for _ in range(engine.max_waiting)]
    try:
        for waiter in waiters:
            waiter.start()
        deadline = time.time() + 10
        while len(engine.requests) < engine.max_waiting and time.time() < deadline:
            time.sleep(0.02)
        response = httpx2.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
    finally:
        engine.paused = False
        for waiter in waiters:
            waiter.join(30)
    # The queued requests then run to the end.
    assert [a.json()["choices"][0]["text"] for a in answers] == ["xxx"] * engine.max_waiting


def test_a_client_that_leaves_aborts_its_request(scripted):
    base, engine = scripted
    engine.paused = True
    aborted_before = len(engine.aborted)
    try:
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=0.5)
        deadline = time.time() + 10
        while engine.requests and time.time() < deadline:
            time.sleep(0.02)
        assert not engine.requests and len(engine.aborted) == aborted_before + 1
    finally:
        engine.paused = False


def test_batch_submission_is_all_or_nothing(scripted):
    """n=6 with room for 4: the 4 admitted are aborted again and the client gets 503."""
    base, engine = scripted
    engine.paused = True
    try:
        response = httpx2.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 6})
        assert response.status_code == 503
    finally:
        engine.paused = False
    deadline = time.time() + 10
    while engine.requests and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.requests


def test_a_dead_engine_answers_503_and_health_says_so():
    engine = ScriptedEngine()
    with serving(engine) as (base, async_engine):
        assert httpx2.get(base + "/health").status_code == 200
        engine.crash = True
        response = httpx2.post(base + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=10)
        assert response.status_code == 503 and "scripted engine failure" in response.json()["error"]["message"]
        assert httpx2.get(base + "/health").status_code == 503
        again = httpx2.post(base + "/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}, timeout=10)
        assert again.status_code == 503


def test_command_line_refuses_a_mesh_that_cannot_work(capsys):
    from dsv4jax.serve.__main__ import check_mesh, main

    assert check_mesh(None, "round-robin") is None
    assert check_mesh("dp=1,cp=1", "zigzag").cp_mode == "zigzag"
    assert main(["--mesh", "dp=2,ep=4"]) == 2
    assert "use dp=1" in capsys.readouterr().err
    assert main(["--mesh", "cp=2,ep=2"]) == 2  # 4 devices named, 8 present
    assert "needs 4 devices but 8" in capsys.readouterr().err
    assert main(["--mesh", "xx=2"]) == 2
    assert "unknown mesh axis" in capsys.readouterr().err
    assert main(["--default-chat-template-kwargs", "[1]"]) == 2
