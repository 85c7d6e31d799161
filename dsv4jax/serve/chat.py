"""DeepSeek-V4 chat encoding and output parsing (SERVING §D.2).

V4 ships no Jinja template: the prompt is rendered by rules (the model repository's `encoding_dsv4.py`), which
this module follows — BOS, `<｜User｜>` turns, `<｜Assistant｜>` + `<think>` (thinking) or `</think>` (chat) as
the generation prompt, tool results merged into the next user turn as `<tool_result>` blocks in tool-call order,
tool schemas as a "## Tools" section of the system message, DSML tool calls, earlier reasoning dropped unless
some message carries tools.

The output side is one incremental parser (`OutputParser`) used for streaming and non-streaming alike, so both
give the same `reasoning_content` / `content` / `tool_calls`. It is tolerant (SERVING §D.3 item 1): DSML markup
never leaks into `content`, a `<｜DSML｜toolcalls>` wrapper is accepted, and a truncated call still closes its
JSON arguments.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
# Special tokens the parser needs to see in the output text; every other special token is dropped on decode.
STRUCTURAL_TOKENS = (THINK_START, THINK_END, DSML)

# Fixed preamble of reasoning_effort="max" (the V4 encoder; "high" renders like no effort at all, SERVING §D.2).
REASONING_EFFORT_MAX_PREAMBLE = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT_SECTION = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


class ChatFormatError(ValueError):
    """A conversation the V4 encoding cannot render; the message says which message and why."""


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# Thinking toggle (SERVING §D.2 "Compatible choice"): chat_template_kwargs.{thinking, reasoning_effort}, top-level
# reasoning_effort and DeepSeek's thinking.type all work; with none of them the server default (non-thinking, as
# vLLM and SGLang) applies.

EFFORT_LEVELS = {"low": "high", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}


def resolve_thinking(template_kwargs: dict | None, reasoning_effort: str | None, thinking_type: str | None,
                     default_thinking: bool = False) -> tuple[bool, str | None]:
    """-> (thinking on?, effort "high" | "max" | None). An explicit toggle wins; an effort alone turns it on."""
    template_kwargs = template_kwargs or {}
    effort = template_kwargs.get("reasoning_effort", reasoning_effort)
    if effort is not None:
        effort = EFFORT_LEVELS[effort]
    if "thinking" in template_kwargs:
        thinking = bool(template_kwargs["thinking"])
    elif thinking_type is not None:
        thinking = thinking_type == "enabled"
    else:
        thinking = default_thinking or effort is not None
    return thinking, effort if thinking else None


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _text_of(content) -> str:
    """OpenAI content: a string, None, or a list of {"type": "text", "text": ...} parts (joined by newlines)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _dsml_arguments(arguments: str) -> str:
    """JSON arguments -> DSML parameters: strings raw with string="true", everything else as JSON."""
    try:
        values = json.loads(arguments)
    except (TypeError, ValueError, RecursionError):  # not JSON (or absurdly nested): kept as one string
        values = None
    if not isinstance(values, dict):
        values = {"arguments": arguments}  # as the reference encoder does for non-object arguments
    return "\n".join(
        f'<{DSML}parameter name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f'{value if isinstance(value, str) else _json(value)}</{DSML}parameter>'
        for key, value in values.items())


def _tool_calls_block(tool_calls: list[dict]) -> str:
    invokes = [f'<{DSML}invoke name="{call["function"]["name"]}">\n'
               f'{_dsml_arguments(call["function"].get("arguments") or "{}")}\n</{DSML}invoke>'
               for call in tool_calls]
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _merge_tool_messages(messages: list[dict]) -> list[dict]:
    """No tool role in V4: tool results (and the user text after them) join one user turn as blocks."""
    merged: list[dict] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            block = {"type": "tool_result", "id": message.get("tool_call_id") or "",
                     "text": _text_of(message.get("content"))}
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": _text_of(message.get("content"))}
            if merged and merged[-1]["role"] == "user":
                merged[-1]["blocks"].append(block)
            else:
                merged.append({**message, "blocks": [block]})
        else:
            merged.append(dict(message))
    return merged


def _sort_tool_results(messages: list[dict]) -> None:
    """Tool results follow the order of the assistant's tool calls (by id), whatever order they came in."""
    order: dict[str, int] = {}
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            order = {call.get("id"): i for i, call in enumerate(message["tool_calls"]) if call.get("id")}
        elif message["role"] == "user" and order:
            results = [b for b in message["blocks"] if b["type"] == "tool_result"]
            ranked = iter(sorted(results, key=lambda b: order.get(b["id"], 0)))
            message["blocks"] = [next(ranked) if b["type"] == "tool_result" else b for b in message["blocks"]]


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_earlier_thinking(messages: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose their reasoning and developer messages go (SERVING §D.2)."""
    last_user = _last_user_index(messages)
    kept = []
    for i, message in enumerate(messages):
        if i >= last_user or message["role"] in ("user", "system"):
            kept.append(message)
        elif message["role"] == "assistant":
            kept.append({k: v for k, v in message.items() if k != "reasoning_content"})
    return kept


def encode_messages(messages: list[dict], *, thinking: bool = False, reasoning_effort: str | None = None,
                    tools: list[dict] | None = None, response_format: dict | None = None,
                    drop_thinking: bool = True) -> str:
    """OpenAI-style messages -> the V4 prompt text, without BOS (the caller adds the BOS id, which a tokenizer
    without special tokens could not spell). `tools` are OpenAI tool objects; they and `response_format` go into
    the first system message (one is added if there is none)."""
    if not messages:
        raise ChatFormatError("messages is empty: send at least one user message")
    messages = [dict(m) for m in messages]
    if tools or response_format:
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = [t["function"] for t in tools or []]
        messages[0]["response_format"] = response_format
    messages = _merge_tool_messages(messages)
    _sort_tool_results(messages)
    # Reasoning is kept across turns whenever any message carries tools (interleaved thinking, SERVING §D.2).
    drop = drop_thinking and not any(m.get("tools") for m in messages)
    if thinking and drop:
        messages = _drop_earlier_thinking(messages)
    if messages[-1]["role"] not in ("user", "developer"):
        raise ChatFormatError(f"the conversation ends with a {messages[-1]['role']!r} message: the generation "
                              f"prompt follows a user, developer or tool message, so end with one of those")
    last_user = _last_user_index(messages)
    prompt = REASONING_EFFORT_MAX_PREAMBLE if thinking and reasoning_effort == "max" else ""
    for i, message in enumerate(messages):
        prompt += _render(message, i, last_user, thinking, drop)
        follower = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if message["role"] in ("user", "developer") and follower in (None, "assistant"):
            opens_thinking = thinking and (not drop or i >= last_user)
            prompt += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return prompt


def _extras(message: dict) -> str:
    text = ""
    if message.get("tools"):
        text += "\n\n" + TOOLS_SECTION.replace("{schemas}", "\n".join(_json(t) for t in message["tools"]))
    if message.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT_SECTION.format(schema=_json(message["response_format"]))
    return text


def _render(message: dict, index: int, last_user: int, thinking: bool, drop: bool) -> str:
    role = message["role"]
    if role == "system":
        return _text_of(message.get("content")) + _extras(message)
    if role == "developer":
        content = _text_of(message.get("content"))
        if not content:
            raise ChatFormatError(f"messages[{index}]: a developer message needs non-empty content")
        return USER + content + _extras(message)
    if role == "user":
        parts = [b["text"] if b["type"] == "text" else f"<tool_result>{b['text']}</tool_result>"
                 for b in message["blocks"]]
        return USER + "\n\n".join(parts)
    if role == "assistant":
        reasoning = ""
        if thinking and (not drop or index > last_user):
            reasoning = (message.get("reasoning_content") or "") + THINK_END
        calls = _tool_calls_block(message["tool_calls"]) if message.get("tool_calls") else ""
        return reasoning + _text_of(message.get("content")) + calls + EOS
    raise ChatFormatError(f"messages[{index}]: role {role!r} is not one of system, developer, user, assistant, "
                          f"tool")


# ----------------------------------------------------------------------------------------------------------------
# Decoding the output with the structural special tokens kept


class StructuralDecoder:
    """Incremental token ids -> text that keeps `<think>`, `</think>` and `｜DSML｜` even where the tokenizer marks
    them special (the engine's text drops special tokens); other special tokens (BOS, EOS, turn markers) go.

    Decodes a short window (vLLM's prefix/read offsets) so a byte-level token split inside a character waits for
    the rest of it."""

    def __init__(self, tokenizer):
        dropped = {i for i, text in tokenizer.special_tokens().items() if text not in STRUCTURAL_TOKENS}
        self._decode = lambda ids: tokenizer.decode([i for i in ids if i not in dropped], skip_special_tokens=False)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, new_ids: list[int]) -> str:
        self._ids.extend(int(i) for i in new_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


def _held_prefix(text: str, markers) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (it may yet become one)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


class StopTrimmer:
    """Stop strings over a text stream: text that could still begin a stop string is held back; at a match the
    text is cut before it and everything after is ignored."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = _held_prefix(text, self.stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self._held = self._held, ""
        return "" if self.stopped else text


# ----------------------------------------------------------------------------------------------------------------
# Parsing reasoning, content and DSML tool calls, incrementally

_CALLS_OPEN = re.compile(rf"<{DSML}tool_?calls>")
_CALLS_OPEN_MARKERS = (f"<{DSML}tool_calls>", f"<{DSML}toolcalls>")
_CALLS_CLOSE = re.compile(rf"</{DSML}tool_?calls>")
_INVOKE_OPEN = re.compile(rf'<{DSML}invoke\s+name="([^"]*)"\s*>')
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_OPEN = re.compile(rf'<{DSML}parameter\s+name="([^"]*)"(?:\s+string="(true|false)")?\s*>')
_PARAM_CLOSE = f"</{DSML}parameter>"


@dataclass
class ParsedMessage:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # {"id", "name", "arguments"}


class OutputParser:
    """Feed decoded text, get events: ("reasoning", text), ("content", text), ("tool", index, id, name),
    ("arguments", index, text). The arguments pieces of a call concatenate to its JSON arguments."""

    def __init__(self, thinking: bool, parse_tools: bool):
        self.parse_tools = parse_tools
        self.state = "reasoning" if thinking else "content"
        self.buffer = ""
        self.started = False  # any reasoning text seen (a leading <think> is dropped)
        self.calls: list[dict] = []
        self._open_param: tuple[str, bool] | None = None  # (name, is_string) of the open parameter
        self._value = ""  # the buffered value of an open non-string parameter

    # -- public ---------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[tuple]:
        self.buffer += text
        events: list[tuple] = []
        while True:
            step = getattr(self, "_" + self.state)(events, final=False)
            if not step:
                return events

    def finish(self) -> list[tuple]:
        events: list[tuple] = []
        while getattr(self, "_" + self.state)(events, final=True):
            pass
        if self.state in ("invoke", "parameter") and self.calls and self.calls[-1]["params"] >= 0:
            self._close_call(events)  # truncated mid-call: still close its JSON
        self.state = "done"
        return events

    @staticmethod
    def collect(events: list[tuple], into: ParsedMessage | None = None) -> ParsedMessage:
        message = into or ParsedMessage()
        for event in events:
            if event[0] == "reasoning":
                message.reasoning += event[1]
            elif event[0] == "content":
                message.content += event[1]
            elif event[0] == "tool":
                message.tool_calls.append({"id": event[2], "name": event[3], "arguments": ""})
            elif event[0] == "arguments":
                message.tool_calls[event[1]]["arguments"] += event[2]
        return message

    # -- states: each consumes what it can and returns True if the state changed (run again) ------------------

    def _emit(self, events, kind, text):
        if text:
            events.append((kind, text))

    def _reasoning(self, events, final) -> bool:
        if not self.started:
            stripped = self.buffer.lstrip()
            if THINK_START.startswith(stripped) and not final:
                return False  # maybe a leading <think> still arriving
            if stripped.startswith(THINK_START):
                self.buffer = stripped[len(THINK_START):]
            self.started = True
        end = self.buffer.find(THINK_END)
        calls = _CALLS_OPEN.search(self.buffer) if self.parse_tools else None
        if end >= 0 and (calls is None or end < calls.start()):
            self._emit(events, "reasoning", self.buffer[:end])
            self.buffer = self.buffer[end + len(THINK_END):]
            self.state = "content"
            return True
        if calls is not None:  # tool calls without closing the reasoning: tolerated
            self._emit(events, "reasoning", self.buffer[:calls.start()].rstrip())
            self.buffer = self.buffer[calls.end():]
            self.state = "calls"
            return True
        markers = (THINK_END,) + (_CALLS_OPEN_MARKERS if self.parse_tools else ())
        held = 0 if final else _held_prefix(self.buffer, markers)
        self._emit(events, "reasoning", self.buffer[:len(self.buffer) - held])
        self.buffer = self.buffer[len(self.buffer) - held:]
        return False

    def _content(self, events, final) -> bool:
        calls = _CALLS_OPEN.search(self.buffer) if self.parse_tools else None
        if calls is not None:
            self._emit(events, "content", self.buffer[:calls.start()].rstrip())
            self.buffer = self.buffer[calls.end():]
            self.state = "calls"
            return True
        if final or not self.parse_tools:
            self._emit(events, "content", self.buffer)
            self.buffer = ""
            return False
        # Hold back a possible marker start and trailing whitespace (cut if a tool-call block follows).
        held = _held_prefix(self.buffer, _CALLS_OPEN_MARKERS)
        body = self.buffer[:len(self.buffer) - held]
        cut = len(body.rstrip())
        self._emit(events, "content", body[:cut])
        self.buffer = self.buffer[cut:]
        return False

    def _calls(self, events, final) -> bool:
        """Inside a tool-call block, between invokes: anything but an invoke or the block's end is skipped."""
        invoke = _INVOKE_OPEN.search(self.buffer)
        close = _CALLS_CLOSE.search(self.buffer)
        if close is not None and (invoke is None or close.start() < invoke.start()):
            self.buffer = self.buffer[close.end():]
            self.state = "content"
            return True
        if invoke is not None:
            call_id = "call_" + secrets.token_hex(12)
            index = len(self.calls)
            self.calls.append({"id": call_id, "params": 0})
            events.append(("tool", index, call_id, invoke.group(1)))
            self.buffer = self.buffer[invoke.end():]
            self.state = "invoke"
            return True
        # Keep only what may still become a tag.
        start = self.buffer.rfind("<")
        self.buffer = "" if final or start < 0 else self.buffer[start:]
        return False

    def _invoke(self, events, final) -> bool:
        """Inside an invoke, between parameters."""
        param = _PARAM_OPEN.search(self.buffer)
        close = self.buffer.find(_INVOKE_CLOSE)
        if close >= 0 and (param is None or close < param.start()):
            self.buffer = self.buffer[close + len(_INVOKE_CLOSE):]
            self._close_call(events)
            self.state = "calls"
            return True
        if param is not None:
            call = self.calls[-1]
            # No string="..." attribute (a sloppy call): JSON if the value parses, else a string.
            name, is_string = param.group(1), param.group(2) == "true"
            opener = ("{" if call["params"] == 0 else ", ") + _json(name) + ": "
            call["params"] += 1
            if is_string:
                opener += '"'
            events.append(("arguments", len(self.calls) - 1, opener))
            self._open_param, self._value = (name, is_string), ""
            self.buffer = self.buffer[param.end():]
            self.state = "parameter"
            return True
        start = self.buffer.rfind("<")
        self.buffer = "" if final or start < 0 else self.buffer[start:]
        return False

    def _parameter(self, events, final) -> bool:
        name, is_string = self._open_param
        close = self.buffer.find(_PARAM_CLOSE)
        if close >= 0:
            value, self.buffer = self.buffer[:close], self.buffer[close + len(_PARAM_CLOSE):]
        else:  # hold back a partial closing tag; at the end it is dropped, never part of the value
            held = _held_prefix(self.buffer, (_PARAM_CLOSE,))
            value, self.buffer = self.buffer[:len(self.buffer) - held], self.buffer[len(self.buffer) - held:]
            if final:
                self.buffer = ""
        index = len(self.calls) - 1
        if is_string:
            if value:
                events.append(("arguments", index, _json(value)[1:-1]))
        else:
            self._value += value
        if close < 0 and not final:
            return False
        self._close_param(events)
        if close >= 0:
            self.state = "invoke"
            return True
        return False

    def _close_param(self, events):
        name, is_string = self._open_param
        index = len(self.calls) - 1
        if is_string:
            events.append(("arguments", index, '"'))
        else:
            raw = self._value.strip()
            try:
                json.loads(raw)
                text = raw
            except (ValueError, RecursionError):  # the model's text may nest past what json parses
                text = _json(raw)  # not JSON after all: keep it as a string rather than break the arguments
            events.append(("arguments", index, text))
        self._open_param, self._value = None, ""

    def _close_call(self, events):
        if self.state == "parameter" and self._open_param is not None:
            self._close_param(events)
        call = self.calls[-1]
        events.append(("arguments", len(self.calls) - 1, "}" if call["params"] else "{}"))
        call["params"] = -1  # closed

    def _done(self, events, final) -> bool:
        return False


def parse_output(text: str, thinking: bool, parse_tools: bool) -> ParsedMessage:
    """The whole output at once (non-streaming), through the same parser as streaming."""
    parser = OutputParser(thinking, parse_tools)
    return OutputParser.collect(parser.feed(text) + parser.finish())
