"""Request bodies of the OpenAI-compatible API (SERVING §D.1) and the OpenAI-style errors they produce.

Validation is strict: a wrong type, an out-of-range value or an unknown field is a 400 naming the field, never a
silent coercion, and nothing reaches the engine until the whole request is valid. Fields that only describe the
client (`user`, `metadata`, ...) are accepted and ignored; OpenAI features this server cannot honour
(`logit_bias`, `suffix`, ...) are refused with a message rather than ignored.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top alternatives per token (the engine's limit)
MAX_STOP = 16
MAX_STOP_CHARS = 1024  # per stop string: the engine holds back that much text while streaming
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024
MAX_JSON_DEPTH = 100  # nesting of a request body, tool parameters and tool-call arguments (SERVING §D.1)
INT32_MAX = 2**31 - 1  # what the device's int32 arrays hold (top_k, token ids, lengths)
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1  # seeds, as vLLM bounds them


class APIError(Exception):
    """An OpenAI-style error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


NonNegInt = Annotated[StrictInt, Field(ge=0, le=INT32_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class _Sampling(_Strict):
    """Fields shared by both endpoints (SERVING §D.1: the OpenAI set plus the usual extra_body extras)."""

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32_MAX)] | None = None  # above the vocabulary: off
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[NonNegInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: StrictBool = False
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    min_tokens: NonNegInt = 0
    skip_special_tokens: StrictBool = True
    # Client bookkeeping: accepted, no effect.
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, bias):
        for key in bias or {}:
            if not key.isascii() or not key.isdigit() or int(key) > INT32_MAX:
                raise ValueError(f"logit_bias keys are token ids (decimal strings of integers >= 0); got {key!r}")
        return bias

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; remove it")
        if self.min_tokens:
            raise ValueError("min_tokens is not supported by this server; remove it (or send 0)")
        if not self.skip_special_tokens:
            raise ValueError("skip_special_tokens=false is not supported by this server; remove it")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]
Prompt = Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)], TokenIds,
               Annotated[list[TokenIds], Field(min_length=1)]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: NonNegInt | None = 16
    echo: StrictBool = False
    add_special_tokens: StrictBool = True  # text prompts get the tokenizer's BOS (vLLM's field; SERVING §E)
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    prompt_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    suffix: StrictStr | None = None
    return_tokens_as_token_ids: StrictBool = False

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported; leave it out")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this model; leave it out")
        if self.echo and self.stream and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming; send stream=false")
        if isinstance(self.prompt, str) and not self.prompt:
            raise ValueError("prompt is empty: send some text or token ids")
        if self.max_tokens == 0 and not self.echo:
            # OpenAI's scoring shape is echo with max_tokens 0; without echo there is nothing to return.
            raise ValueError("max_tokens is 0, which only makes sense with echo=true (prompt scoring); send "
                             "max_tokens >= 1 or echo=true")
        if self.max_tokens == 0 and self.stream:
            raise ValueError("max_tokens=0 (prompt scoring) is not supported when streaming; send stream=false")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr

    @field_validator("arguments")
    @classmethod
    def _arguments_depth(cls, arguments):
        # The chat encoding parses these JSON arguments (SERVING §D.2); a string that is not JSON stays a string.
        try:
            value = json.loads(arguments)
        except RecursionError:
            value = None
            depth = MAX_JSON_DEPTH + 1
        except ValueError:
            return arguments
        else:
            depth = _depth(value)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"the JSON arguments are nested more than {MAX_JSON_DEPTH} levels deep; flatten them")
        return arguments


class ToolCall(_Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None

    @model_validator(mode="after")
    def _roles(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls are only allowed on assistant messages, not on {self.role!r}")
        if self.role in ("system", "developer", "user", "tool") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


class FunctionDef(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, Any]


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ThinkingToggle(_Strict):
    type: Literal["enabled", "disabled"]


Effort = Literal["low", "medium", "high", "xhigh", "max"]


class ChatTemplateKwargs(_Strict):
    thinking: StrictBool | None = None
    reasoning_effort: Effort | None = None
    drop_thinking: StrictBool | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | NamedToolChoice | Literal["required"] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Effort | None = None
    thinking: ThinkingToggle | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice 'required' or a named function needs constrained decoding, which this "
                             "server does not do; use 'auto' or 'none'")
        if self.tool_choice in ("auto",) and not self.tools:
            raise ValueError("tool_choice 'auto' needs tools")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    tools: list[Tool] | None = None
    reasoning_effort: Effort | None = None
    thinking: ThinkingToggle | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt (text) or messages (a chat)")
        return self


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[NonNegInt]


def _location(loc: tuple) -> str | None:
    """pydantic's error location -> "messages[0].content" (union branch names dropped)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item and not (item[0].isupper() or item.startswith(("list[", "function-", "constrained-",
                                                               "literal[", "json-", "dict["))) \
                and item not in ("str", "int", "float", "bool", "list", "dict", "none"):
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


# Union-typed fields: pydantic reports every branch; say what the field accepts instead.
_UNION_HINTS = {
    "prompt": "prompt must be non-empty text, a list of texts, a list of token ids (integers >= 0, below the "
              "vocabulary size) or a list of such lists",
    "stop": f"stop must be a non-empty string of at most {MAX_STOP_CHARS} characters or a list of at most {MAX_STOP} "
            f"such strings",
    "content": "content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts (only text is "
               "supported)",
}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item)
                         if isinstance(child, (dict, list)))
    return deepest


def _path(parts: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + str(p) for i, p in enumerate(parts))


def check_json(data) -> None:
    """Refuse what would break later stages with a 400 naming the place: nesting deeper than MAX_JSON_DEPTH
    (recursion in validators and the chat encoder) and strings holding lone UTF-16 surrogates (JSON can
    escape them, \\ud800, but no tokenizer can encode them)."""
    stack = [(data, (), 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"{_path(where) or 'the request body'} is nested more than {MAX_JSON_DEPTH} levels "
                                f"deep; flatten it", param=_path(where[:1]) or None)
        entries = item.items() if isinstance(item, dict) else enumerate(item)
        for key, value in entries:
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                raise APIError(400, f"{_path(where) or 'the request body'} has a key with a lone UTF-16 surrogate "
                                    f"({ascii(key)[:40]}); send valid Unicode", param=_path(where[:1]) or None)
            if isinstance(value, str):
                if not value.isascii() and _SURROGATE.search(value):
                    at = _path(where + (key,))
                    raise APIError(400, f"{at} holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                        f"Unicode text and cannot be tokenized; send valid UTF-8 text",
                                   param=at, code="invalid_unicode")
            elif isinstance(value, (dict, list)):
                stack.append((value, where + (key,), depth + 1))


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Bytes of a request body -> a validated request, or an APIError(400) naming the bad field."""
    try:
        data = json.loads(raw.decode("utf-8"))  # JSON on the wire is UTF-8 (RFC 8259), never UTF-16/32
    except RecursionError:  # json's C parser recurses once per level
        raise APIError(400, f"the request body is nested too deeply (more than {MAX_JSON_DEPTH} levels are "
                            f"refused); flatten it")
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error}); send a JSON object")
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object")
    check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        count = error.error_count()
        param = _location(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if param is None:  # a check across fields: its message starts with the field it is about
            word = re.match(r"[a-z_]+", message)
            param = word.group() if word and word.group() in model.model_fields else None
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}; remove it (see the OpenAI API reference for the fields)"
        elif first["type"] == "missing":
            message = f"{param} is required"
        elif param and param.rsplit(".", 1)[-1] in _UNION_HINTS and len(first["loc"]) > len(param.split(".")):
            message = _UNION_HINTS[param.rsplit(".", 1)[-1]] + (f" (at {param})" if "." in param else "")
            count = 1
        elif param and not message.startswith(param):
            message = f"{param}: {message}"
        if count > 1:
            message += f" (and {count - 1} more problem{'s' if count > 2 else ''})"
        raise APIError(400, message, param=param)
