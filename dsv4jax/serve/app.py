"""The OpenAI-compatible HTTP API over the engine (SERVING §D.1), as an ASGI app.

Endpoints: POST /v1/completions (text, token ids, batches; echo with prompt logprobs for lm-evaluation-harness's
`local-completions`, SERVING §E), POST /v1/chat/completions (the V4 encoding of SERVING §D.2: thinking toggle, reasoning split,
DSML tool calls), both streamed as SSE when asked (ending in a usage chunk with `stream_options.include_usage`, then
`[DONE]`); GET /v1/models, /health, /metrics, /server_info; POST /tokenize, /detokenize.

Every request is validated whole before anything is submitted, so a bad one changes nothing (400 naming the field;
no input gives a 5xx); a batch that can never fit answers 400, a full queue 503 with Retry-After; a request that
fails while running gets a 500 (or a streamed error event) and the others go on; a client that goes away aborts its
requests (their cache pages come back). Parsing and tokenizing large bodies run in a worker thread, so the event
loop (and /health) never waits on them.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from dsv4jax.serve import chat
from dsv4jax.serve.async_engine import AsyncEngine, EngineDeadError
from dsv4jax.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, parse_body)
from dsv4jax.tokenizer import hf_tokenizer_config

MAX_BODY_BYTES = 32 << 20
RETRY_AFTER_S = 1
_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; an impossible token reports this (as vLLM does)
_INLINE_BYTES = 64 << 10  # bodies and texts up to this are parsed / tokenized on the event loop; larger in a thread


# ----------------------------------------------------------------------------------------------------------------
# Server state and small helpers


@dataclass
class ServerState:
    engine: AsyncEngine
    model: object  # dsv4jax.api.Model: .tokenizer, .config, .name
    served_names: list[str]
    max_model_len: int
    default_thinking: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def bos(self) -> int:
        return self.model.config.bos_token_id

    @property
    def max_prompt_bytes(self) -> int:
        """Text longer than this can never fit in max_model_len tokens, so it is refused before tokenizing
        (twice the bound: slack for a tokenizer that normalizes text)."""
        per_token = getattr(self.model.tokenizer, "max_bytes_per_token", None) or 64
        return 2 * self.max_model_len * per_token

    def token_text(self, token_id: int, as_id: bool = False) -> str:
        """A token's own text for logprobs: special tokens (BOS, EOS, ...) by their names, as vLLM shows them;
        a token with no text at all as "token_id:N"."""
        if as_id:
            return f"token_id:{token_id}"
        text = self._token_text.get(token_id)
        if text is None:
            tokenizer = self.model.tokenizer
            text = tokenizer.decode([token_id]) or tokenizer.decode([token_id], skip_special_tokens=False) \
                or f"token_id:{token_id}"
            self._token_text[token_id] = text
        return text


def _json_response(body, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, headers=headers,
                    media_type="application/json")


def _error_response(error: APIError) -> Response:
    return _json_response(error.body(), error.status, error.headers)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _LOGPROB_FLOOR


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: prompt tokens the prefix cache served."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("", "application/json") or (media.startswith("application/") and media.endswith("+json"))


async def _read_body(request: Request) -> bytes:
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise APIError(415, f"content-type {content_type!r} is not JSON; send the body as application/json",
                       param="content-type", code="unsupported_media_type")
    length = request.headers.get("content-length") or "0"
    if not length.isdigit():
        raise APIError(400, f"content-length {length!r} is not a number", param="content-length")
    if int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB; send a smaller one")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB; send a smaller one")
            chunks.append(chunk)
    except ClientDisconnect:  # gone mid-body: nobody to answer, nothing to log
        raise APIError(400, "the client disconnected before sending the whole body", code="client_disconnected")
    return b"".join(chunks)


async def _parse(model, request: Request):
    """Read and validate a body; a large one is parsed in a worker thread (SERVING §D.1)."""
    raw = await _read_body(request)
    if len(raw) <= _INLINE_BYTES:
        return parse_body(model, raw)
    return await run_in_threadpool(parse_body, model, raw)


async def _encode_text(state: ServerState, text: str, where: str, add_special_tokens: bool = True,
                       check_length: bool = True) -> list[int]:
    """Text -> prompt ids by the BOS rule of SERVING §E: with add_special_tokens (the default) the
    tokenizer's BOS comes first, as the model directory's Hugging Face tokenizer adds it, unless the text already
    starts with the BOS token (text decoded from ids that carried it), so BOS is never doubled. Long texts are
    tokenized in a worker thread; text that could never fit the context is refused before tokenizing."""
    if check_length and len(text) > state.max_prompt_bytes // 4 and len(text.encode("utf-8")) > state.max_prompt_bytes:
        raise APIError(400, f"{where}: the text has {len(text.encode('utf-8'))} bytes, more than the "
                            f"{state.max_model_len} tokens of the context can ever hold; shorten it",
                       param=where.split("[")[0], code="context_length_exceeded")
    tokenizer = state.model.tokenizer
    try:
        ids = tokenizer.encode(text) if len(text) <= _INLINE_BYTES else \
            await run_in_threadpool(tokenizer.encode, text)
    except (ValueError, TypeError) as error:
        raise APIError(400, f"{where}: {error}", param=where.split("[")[0])
    if add_special_tokens and (not ids or ids[0] != state.bos):
        ids = [state.bos] + ids
    return ids


def _check_model(state: ServerState, name: str | None) -> str:
    if name is None or name in state.served_names:
        return state.served_names[0]
    raise APIError(404, f"the model {name!r} does not exist here; this server serves {state.served_names} "
                        f"(GET /v1/models)", param="model", code="model_not_found")


def _check_ids(state: ServerState, ids: list[int], where: str) -> list[int]:
    bad = [t for t in ids if t >= state.vocab_size]
    if bad:
        raise APIError(400, f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {state.vocab_size})",
                       param=where)
    return ids


def _check_room(state: ServerState, prompt_len: int, max_tokens: int, where: str,
                budget_field: str = "max_tokens") -> None:
    if prompt_len + max_tokens > state.max_model_len:
        raise APIError(400, f"{where}: the prompt has {prompt_len} tokens and {budget_field} is {max_tokens}, more "
                            f"than the context of {state.max_model_len} tokens; shorten the prompt or lower "
                            f"{budget_field}",
                       param=budget_field if prompt_len < state.max_model_len else where,
                       code="context_length_exceeded")


def _check_count(state: ServerState, n: int, prompts: int) -> None:
    """A batch of n × prompts requests larger than the engine ever holds can never be admitted: 400, not a 503
    that no retry would cure (SERVING §D.1)."""
    capacity = state.engine.capacity
    if capacity is not None and n * prompts > capacity:
        raise APIError(400, f"n={n} × {prompts} prompt{'s' if prompts != 1 else ''} = {n * prompts} requests, more "
                            f"than this server ever holds at once ({capacity}: --max-running-requests + "
                            f"--max-waiting-requests); send at most {capacity} (fewer prompts per request or a "
                            f"lower n)", param="n" if prompts == 1 else "prompt", code="batch_too_large")


def _sampling(state: ServerState, req, *, max_tokens: int, seed_offset: int, logprobs: int | None,
              prompt_logprobs: int | None):
    """Request fields -> the engine's SamplingParams (SERVING §D.1 defaults: temperature 1, top_p 1), validated."""
    from dsv4jax.serve.sampling import SamplingError, SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else float(req.temperature),
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=-1 if req.top_k in (None, 0) else req.top_k,
        min_p=0.0 if req.min_p is None else float(req.min_p),
        seed=None if req.seed is None else req.seed + seed_offset,
        stop=req.stops(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
    )
    try:
        params.validate(state.vocab_size)
    except SamplingError as error:  # its message starts "field=value is invalid: ..."
        field_name = str(error).split("=", 1)[0]
        raise APIError(400, str(error), param=field_name if field_name.isidentifier() else None)
    return params


def _submit_all(state: ServerState, jobs: list[tuple[list[int], object]]):
    """Submit every (prompt ids, sampling) or none, atomically: a refused batch leaves nothing queued."""
    from dsv4jax.serve.engine import AdmissionError, QueueFullError

    try:
        return state.engine.submit_many(jobs)
    except QueueFullError as error:
        if state.engine.metrics is not None:
            state.engine.metrics.rejected.inc()
        raise APIError(503, f"the server is busy ({error}); retry in {RETRY_AFTER_S} s", type="server_busy",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    except AdmissionError as error:
        raise APIError(400, str(error))
    except EngineDeadError as error:
        raise APIError(503, str(error), type="server_error", code="engine_dead")


class RequestFailed(Exception):
    """One request failed while running (the engine went on): its client gets a 500 naming the reason."""


def _raise_if_failed(output) -> None:
    if output.finish_reason == "error":
        raise RequestFailed(output.error or "unknown error")


def _failure(error: RequestFailed) -> APIError:
    return APIError(500, f"generation failed for this request: {error}; the server goes on serving (see its log)",
                    type="server_error", code="generation_failed")


async def _collect(request: Request, state, streams, add) -> None:
    """Hand every output of `streams` to add(index, output) until all finish or the client leaves."""
    async def collect():
        async for index, output in _merged(state, streams):
            add(index, output)

    try:
        await _until_disconnect(request, collect())
    except EngineDeadError as error:
        raise _engine_error(error)
    except RequestFailed as error:
        raise _failure(error)


async def _until_disconnect(request: Request, work):
    """Run `work` (a coroutine) unless the client goes away first; then it is cancelled (which aborts its
    requests) and None is returned."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return task.result() if not task.cancelled() else None


class _SSEResponse:
    """Server-sent events from an async iterator of JSON bodies; `[DONE]` at the end. Whatever way it ends
    (finished, client gone, error), `on_close` runs, which aborts the requests still going."""

    def __init__(self, events, on_close):
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        async def pump():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for body in self.events:
                data = "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
                await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

        async def disconnected():
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()
            self.on_close()
        error = results[0]
        if isinstance(error, BaseException) and not isinstance(error, (asyncio.CancelledError, OSError)):
            raise error


async def _merged(state: ServerState, streams):
    """(choice index, RequestOutput) from several requests as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for output in state.engine.outputs(stream):
                await queue.put((index, output))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                _raise_if_failed(item)
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _abort_all(state: ServerState, streams):
    def close():
        for stream in streams:
            state.engine.abort(stream.request_id)
    return close


def _engine_error(error: BaseException) -> APIError:
    return APIError(503, f"generation failed: {error}", type="server_error", code="engine_dead")


# ----------------------------------------------------------------------------------------------------------------
# /v1/completions


@dataclass
class _Choice:
    """What one completion choice has received so far."""

    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    prompt_top: list | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, output) -> None:
        self.num_cached_tokens = output.num_cached_tokens
        self.text += output.text
        self.token_ids += output.token_ids
        if output.logprobs is not None:
            self.logprobs += output.logprobs
            self.top += output.top_logprobs or [[] for _ in output.token_ids]
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
            self.prompt_top = output.prompt_top_logprobs
        self.num_output_tokens = output.num_output_tokens
        if output.finished:
            self.finish_reason = output.finish_reason


def _top_dict(state: ServerState, chosen: int, chosen_logprob: float, top, as_ids: bool) -> dict:
    """{token text: logprob} of the top alternatives plus the chosen token; texts that collide keep the best."""
    entries = list(top or []) + [(chosen, chosen_logprob)]
    result: dict[str, float] = {}
    for token_id, logprob in entries:
        key = state.token_text(token_id, as_ids)
        result[key] = max(result.get(key, -math.inf), _finite(logprob))
    return result


def _completion_logprobs(state: ServerState, req: CompletionRequest, choice: _Choice, echo_ids: list[int] | None):
    """OpenAI legacy logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset into the choice text."""
    as_ids = req.return_tokens_as_token_ids
    tokens, token_logprobs, tops = [], [], []
    if echo_ids is not None:
        prompt_lp = choice.prompt_logprobs or [None] * len(echo_ids)
        prompt_top = choice.prompt_top or [None] * len(echo_ids)
        for token_id, logprob, top in zip(echo_ids, prompt_lp, prompt_top):
            tokens.append(state.token_text(token_id, as_ids))
            token_logprobs.append(None if logprob is None else _finite(logprob))
            tops.append(None if logprob is None else _top_dict(state, token_id, logprob, top, as_ids))
    for token_id, logprob, top in zip(choice.token_ids, choice.logprobs, choice.top):
        tokens.append(state.token_text(token_id, as_ids))
        token_logprobs.append(_finite(logprob))
        tops.append(_top_dict(state, token_id, logprob, top, as_ids))
    offsets, position = [], 0
    for token_id in (echo_ids or []) + choice.token_ids:
        offsets.append(position)
        position += len(state.model.tokenizer.decode([token_id]))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _vllm_prompt_logprobs(state: ServerState, choice: _Choice):
    """vLLM's `prompt_logprobs` field: per prompt token None or {id: {"logprob", "decoded_token"}}."""
    if choice.prompt_logprobs is None:
        return None
    result = []
    for i, (token_id, logprob) in enumerate(zip(choice.prompt_ids, choice.prompt_logprobs)):
        if logprob is None:
            result.append(None)
            continue
        entries = {token_id: logprob}
        for alt, alt_logprob in (choice.prompt_top[i] if choice.prompt_top and choice.prompt_top[i] else []):
            entries.setdefault(alt, alt_logprob)
        result.append({str(t): {"logprob": _finite(lp), "decoded_token": state.token_text(t)}
                       for t, lp in entries.items()})
    return result


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await _parse(CompletionRequest, request)
    model_name = _check_model(state, req.model)
    tokenizer = state.model.tokenizer
    given = req.prompts()
    _check_count(state, req.n, len(given))  # before tokenizing anything
    max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
    # max_tokens 0 (scoring a prompt, echo only): the engine runs one token, which is not returned.
    run_tokens = max(max_tokens, 1)
    prompts, prompt_texts = [], []
    for i, prompt in enumerate(given):
        where = "prompt" if len(given) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, f"{where} is empty: send some text", param="prompt")
            ids = await _encode_text(state, prompt, where, req.add_special_tokens)
            prompt_texts.append(prompt)
        else:
            ids = _check_ids(state, list(prompt), where)
            prompt_texts.append(tokenizer.decode(ids))
        _check_room(state, len(ids), run_tokens, where)
        prompts.append(ids)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    prompt_logprobs = req.prompt_logprobs if req.prompt_logprobs is not None else echo_logprobs
    samplings = [_sampling(state, req, max_tokens=run_tokens, seed_offset=j, logprobs=req.logprobs,
                           prompt_logprobs=prompt_logprobs) for j in range(req.n)]
    jobs = [(ids, samplings[j]) for ids in prompts for j in range(req.n)]
    streams = _submit_all(state, jobs)
    choices = [_Choice(ids) for ids, _ in jobs]
    completion_id = "cmpl-" + secrets.token_hex(12)
    created = int(time.time())
    num_prompt_tokens = sum(len(ids) for ids in prompts)

    def usage():  # each prompt once, as prompt_tokens counts it: the cache hit of its first choice
        return _usage(num_prompt_tokens, sum(c.num_output_tokens for c in choices),
                      sum(c.num_cached_tokens for c in choices[::req.n]))

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats

        async def events():
            sent_echo = set()
            try:
                async for index, output in _merged(state, streams):
                    choice = choices[index]
                    choice.add(output)
                    text = output.text
                    if req.echo and index not in sent_echo:
                        text = prompt_texts[index // req.n] + text
                        sent_echo.add(index)
                    logprobs = None
                    if req.logprobs is not None and output.logprobs is not None:
                        part = _Choice(choice.prompt_ids, token_ids=list(output.token_ids),
                                       logprobs=list(output.logprobs),
                                       top=list(output.top_logprobs or [[] for _ in output.token_ids]))
                        logprobs = _completion_logprobs(state, req, part, None)
                    if not text and logprobs is None and not output.finished and not continuous:
                        continue  # nothing to show yet (with continuous usage, the token count still moves)
                    body = {"id": completion_id, "object": "text_completion", "created": created,
                            "model": model_name,
                            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": output.finish_reason if output.finished else None}]}
                    if continuous:
                        body["usage"] = usage()
                    yield body
            except EngineDeadError as error:
                yield _engine_error(error).body()
                return
            except RequestFailed as error:  # the stream's error event; the server goes on
                yield _failure(error).body()
                return
            if include_usage:
                yield {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
                       "choices": [], "usage": usage()}

        return _SSEResponse(events(), _abort_all(state, streams))

    await _collect(request, state, streams, lambda index, output: choices[index].add(output))
    if max_tokens == 0:
        for choice in choices:
            choice.text, choice.token_ids, choice.logprobs, choice.top = "", [], [], []
            choice.num_output_tokens, choice.finish_reason = 0, "length"
    body_choices = []
    for index, choice in enumerate(choices):
        echo_ids = choice.prompt_ids if req.echo else None
        item = {"index": index,
                "text": (prompt_texts[index // req.n] if req.echo else "") + choice.text,
                "logprobs": _completion_logprobs(state, req, choice, echo_ids) if req.logprobs is not None else None,
                "finish_reason": choice.finish_reason}
        if req.prompt_logprobs is not None:
            item["prompt_logprobs"] = _vllm_prompt_logprobs(state, choice)
        body_choices.append(item)
    return _json_response({"id": completion_id, "object": "text_completion", "created": created,
                           "model": model_name, "choices": body_choices,
                           "usage": usage()})


# ----------------------------------------------------------------------------------------------------------------
# /v1/chat/completions


def _render_chat(state: ServerState, req) -> tuple[str, bool]:
    """A chat request -> (prompt text, thinking on?) by the V4 encoding (SERVING §D.2)."""
    kwargs = req.chat_template_kwargs.model_dump(exclude_none=True) if req.chat_template_kwargs else None
    thinking, effort = chat.resolve_thinking(kwargs, req.reasoning_effort,
                                             req.thinking.type if req.thinking else None, state.default_thinking)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if getattr(req, "tools", None) else None
    if tools and getattr(req, "tool_choice", None) == "none":
        tools = None
    response_format = None
    if getattr(req, "response_format", None) is not None and req.response_format.type != "text":
        response_format = req.response_format.model_dump(exclude_none=True)
    try:
        text = chat.encode_messages(messages, thinking=thinking, reasoning_effort=effort, tools=tools,
                                    response_format=response_format,
                                    drop_thinking=(kwargs or {}).get("drop_thinking", True))
    except (chat.ChatFormatError, ValueError) as error:
        raise APIError(400, str(error), param="messages")
    return text, thinking


async def _chat_ids(state: ServerState, req, check_length: bool = True) -> tuple[list[int], bool]:
    """A chat request -> (prompt ids: BOS + the encoding, thinking on?)."""
    text, thinking = _render_chat(state, req)
    ids = await _encode_text(state, text, "messages", add_special_tokens=False, check_length=check_length)
    return [state.bos] + ids, thinking


@dataclass
class _ChatChoice:
    """Decoding and parsing state of one chat choice (the same path streams and collects)."""

    decoder: chat.StructuralDecoder
    stops: chat.StopTrimmer
    parser: chat.OutputParser
    message: chat.ParsedMessage = field(default_factory=chat.ParsedMessage)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    def add(self, output) -> list[tuple]:
        self.num_cached_tokens = output.num_cached_tokens
        text = self.stops.push(self.decoder.push(output.token_ids))
        if output.finished:
            text += self.stops.push(self.decoder.flush()) + self.stops.flush()
        events = self.parser.feed(text)
        if output.finished:
            events += self.parser.finish()
            self.finish_reason = output.finish_reason
            if self.parser.calls and output.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        self.num_output_tokens = output.num_output_tokens
        chat.OutputParser.collect(events, self.message)
        return events


def _chat_logprobs(state: ServerState, output) -> list[dict]:
    def entry(token_id, logprob):
        text = state.token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    items = []
    for i, (token_id, logprob) in enumerate(zip(output.token_ids, output.logprobs or [])):
        item = entry(token_id, logprob)
        top = output.top_logprobs[i] if output.top_logprobs else []
        item["top_logprobs"] = [entry(t, lp) for t, lp in top]
        items.append(item)
    return items


def _delta_of(events: list[tuple]) -> dict:
    """Parser events -> one OpenAI chat delta."""
    delta: dict = {}
    calls: dict[int, dict] = {}
    for event in events:
        if event[0] in ("reasoning", "content"):
            key = "reasoning_content" if event[0] == "reasoning" else "content"
            delta[key] = delta.get(key, "") + event[1]
        elif event[0] == "tool":
            calls[event[1]] = {"index": event[1], "id": event[2], "type": "function",
                               "function": {"name": event[3], "arguments": ""}}
        elif event[0] == "arguments":
            call = calls.setdefault(event[1], {"index": event[1], "function": {"arguments": ""}})
            call["function"]["arguments"] += event[2]
    if calls:
        delta["tool_calls"] = [calls[k] for k in sorted(calls)]
    return delta


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await _parse(ChatCompletionRequest, request)
    model_name = _check_model(state, req.model)
    _check_count(state, req.n, 1)
    prompt_ids, thinking = await _chat_ids(state, req)
    _check_ids(state, prompt_ids, "messages")
    budget = req.token_budget()
    if budget is None:
        budget = state.max_model_len - len(prompt_ids)
        if budget <= 0:
            raise APIError(400, f"messages: the prompt has {len(prompt_ids)} tokens, the context is "
                                f"{state.max_model_len}; shorten the conversation", param="messages",
                           code="context_length_exceeded")
    if budget == 0:
        raise APIError(400, "max_completion_tokens (or max_tokens) is 0: a chat reply needs at least 1 token",
                       param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    _check_room(state, len(prompt_ids), budget, "messages",
                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    samplings = [_sampling(state, req, max_tokens=budget, seed_offset=j, logprobs=logprobs, prompt_logprobs=None)
                 for j in range(req.n)]
    streams = _submit_all(state, [(prompt_ids, s) for s in samplings])
    parse_tools = req.uses_tools()
    choices = [_ChatChoice(chat.StructuralDecoder(state.model.tokenizer), chat.StopTrimmer(req.stops()),
                           chat.OutputParser(thinking, parse_tools)) for _ in streams]
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())

    def usage():
        return _usage(len(prompt_ids), sum(c.num_output_tokens for c in choices), choices[0].num_cached_tokens)

    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats

        def chunk(index, delta, logprobs=None, finish_reason=None):
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}
            if continuous:
                body["usage"] = usage()
            return body

        async def events():
            for index in range(len(choices)):
                yield chunk(index, {"role": "assistant", "content": ""})
            try:
                async for index, output in _merged(state, streams):
                    choice = choices[index]
                    delta = _delta_of(choice.add(output))
                    logprobs = {"content": _chat_logprobs(state, output)} if req.logprobs and output.token_ids \
                        else None
                    if delta or logprobs:
                        yield chunk(index, delta, logprobs)
                    if output.finished:
                        yield chunk(index, {}, None, choice.finish_reason)
            except EngineDeadError as error:
                yield _engine_error(error).body()
                return
            except RequestFailed as error:  # the stream's error event; the server goes on
                yield _failure(error).body()
                return
            if include_usage:
                yield {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": [], "usage": usage()}

        return _SSEResponse(events(), _abort_all(state, streams))

    def add(index, output):
        choices[index].add(output)
        if req.logprobs:
            choices[index].logprobs += _chat_logprobs(state, output)

    await _collect(request, state, streams, add)
    body_choices = []
    for index, choice in enumerate(choices):
        message = {"role": "assistant", "content": choice.message.content or None,
                   "reasoning_content": choice.message.reasoning or None}
        if choice.message.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in choice.message.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        body_choices.append({"index": index, "message": message,
                             "logprobs": {"content": choice.logprobs} if req.logprobs else None,
                             "finish_reason": choice.finish_reason})
    return _json_response({"id": completion_id, "object": "chat.completion", "created": created,
                           "model": model_name, "choices": body_choices, "usage": usage()})


# ----------------------------------------------------------------------------------------------------------------
# Everything else


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return _json_response({"object": "list", "data": [
        {"id": name, "object": "model", "created": state.created, "owned_by": "dsv4jax",
         "max_model_len": state.max_model_len} for name in state.served_names]})


async def server_info(request: Request) -> Response:
    """What a benchmark records beside its figures (SGLang has the same route): device, versions, engine
    configuration and counters, and the mean accepted length per speculative step."""
    import dataclasses

    import jax

    state: ServerState = request.app.state.server
    stats = state.engine.stats()
    engine_config = getattr(state.engine.engine, "config", None)
    rounds = stats.get("speculative_rounds", 0)
    device = jax.devices()[0]
    return _json_response({
        "model": state.served_names[0], "served_model_names": state.served_names,
        "max_model_len": state.max_model_len, "vocab_size": state.vocab_size,
        "device": getattr(device, "device_kind", device.platform),
        "device_count": jax.device_count(), "jax": jax.__version__,
        "engine_config": dataclasses.asdict(engine_config) if dataclasses.is_dataclass(engine_config) else None,
        "stats": stats,
        "avg_spec_accept_length": 1 + stats.get("accepted_tokens", 0) / rounds if rounds else None})


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.engine.healthy:
        return _json_response({"status": "ok"})
    return _json_response({"status": "unhealthy", "error": repr(state.engine.error)}, 503)


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def tokenize(request: Request) -> Response:
    """vLLM's /tokenize; texts of any length (lm-eval's remote tokenizer sends whole documents for rolling
    log-likelihoods), tokenized by the same BOS rule as /v1/completions."""
    state: ServerState = request.app.state.server
    req = await _parse(TokenizeRequest, request)
    _check_model(state, req.model)
    if req.messages is not None:
        ids, _ = await _chat_ids(state, req, check_length=False)
    else:
        ids = await _encode_text(state, req.prompt, "prompt", req.add_special_tokens, check_length=False)
    body = {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}
    if len(ids) <= _INLINE_BYTES:
        return _json_response(body)
    return await run_in_threadpool(_json_response, body)


async def detokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    req = await _parse(DetokenizeRequest, request)
    _check_model(state, req.model)
    ids = _check_ids(state, req.tokens, "tokens")
    if len(ids) <= _INLINE_BYTES:
        return _json_response({"prompt": state.model.tokenizer.decode(ids)})
    return _json_response({"prompt": await run_in_threadpool(state.model.tokenizer.decode, ids)})


async def tokenizer_info(request: Request) -> Response:
    """vLLM's GET /tokenizer_info: the tokenizer configuration (what the model directory's tokenizer_config.json
    holds) plus `tokenizer_class`. lm-eval's `tokenizer_backend=remote` reads bos_token / eos_token from it and
    finds their ids through /tokenize (SERVING §E)."""
    state: ServerState = request.app.state.server
    return _json_response(hf_tokenizer_config(state.model.tokenizer, state.bos, state.model.config.eos_token_id,
                                              state.max_model_len))


async def _api_error(request: Request, error: APIError) -> Response:
    return _error_response(error)


class _TrailingSlash:
    """"/v1/completions/" is served as "/v1/completions" (instead of Starlette's body-less 307 redirect, which
    POST clients do not follow with their body)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and len(scope["path"]) > 1 and scope["path"].endswith("/"):
            path = scope["path"].rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


async def _http_error(request: Request, error: HTTPException) -> Response:
    if error.status_code == 404:
        message = f"no route {request.url.path!r}; see GET /v1/models, POST /v1/completions, /v1/chat/completions"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; use {error.headers.get('Allow', 'POST')}"
    else:
        message = error.detail
    return _error_response(APIError(error.status_code, message, headers=error.headers))


async def _server_error(request: Request, error: Exception) -> Response:
    return _error_response(APIError(500, f"internal error: {error!r}", type="server_error"))


def build_app(engine: AsyncEngine, model, *, served_names: list[str] | None = None, max_model_len: int,
              default_thinking: bool = False) -> Starlette:
    """The ASGI app over a started AsyncEngine; `model` is the loaded dsv4jax Model the engine serves."""
    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/server_info", server_info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                                      Exception: _server_error})
    app.router.redirect_slashes = False
    app.add_middleware(_TrailingSlash)
    app.state.server = ServerState(engine, model, served_names or [model.name], max_model_len, default_thinking)
    return app
