"""The V4 chat encoding and the output parsers of the server (SERVING §D.2, SERVING §D.3 item 1); no model needed."""

from __future__ import annotations

import json
import random

import pytest

from dsv4jax.serve import chat
from dsv4jax.serve.chat import (ASSISTANT, DSML, EOS, THINK_END, THINK_START, USER, OutputParser, StopTrimmer,
                                StructuralDecoder, encode_messages, parse_output, resolve_thinking)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# ---- encoding ------------------------------------------------------------------------------------------------


def test_generation_prompt_follows_the_thinking_toggle():
    messages = [{"role": "user", "content": "hi"}]
    assert encode_messages(messages) == f"{USER}hi{ASSISTANT}{THINK_END}"
    assert encode_messages(messages, thinking=True) == f"{USER}hi{ASSISTANT}{THINK_START}"
    # "max" prepends the fixed preamble; "high" renders as no effort (SERVING §D.2).
    assert encode_messages(messages, thinking=True, reasoning_effort="max").startswith("Reasoning Effort: Absolute")
    assert encode_messages(messages, thinking=True, reasoning_effort="high") == \
        encode_messages(messages, thinking=True)


def test_earlier_reasoning_is_dropped_unless_tools_are_present():
    messages = [{"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                {"role": "user", "content": "q2"}]
    dropped = encode_messages(messages, thinking=True)
    assert dropped == f"{USER}q1{ASSISTANT}{THINK_END}a1{EOS}{USER}q2{ASSISTANT}{THINK_START}"
    kept = encode_messages(messages, thinking=True, tools=[WEATHER])
    assert f"{USER}q1{ASSISTANT}{THINK_START}r1{THINK_END}a1{EOS}" in kept  # interleaved thinking
    assert "## Tools" in kept and json.dumps(WEATHER["function"], ensure_ascii=False) in kept


def test_tool_results_merge_into_the_user_turn_in_call_order():
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [_call("c1", "get_weather", {"city": "Paris"}),
                                                                    _call("c2", "get_weather", {"days": 3})]},
                {"role": "tool", "tool_call_id": "c2", "content": "R2"},
                {"role": "tool", "tool_call_id": "c1", "content": "R1"},
                {"role": "user", "content": "thanks"}]
    text = encode_messages(messages, tools=[WEATHER])
    assert (f"{USER}<tool_result>R1</tool_result>\n\n<tool_result>R2</tool_result>\n\nthanks"
            f"{ASSISTANT}{THINK_END}") in text
    # DSML arguments: strings raw with string="true", other types as JSON.
    assert f'<{DSML}parameter name="city" string="true">Paris</{DSML}parameter>' in text
    assert f'<{DSML}parameter name="days" string="false">3</{DSML}parameter>' in text
    assert text.count("<tool_result>") == 2 and "tool" not in text.split("## Tools")[0]


def test_system_developer_and_response_format():
    text = encode_messages([{"role": "system", "content": "S"}, {"role": "developer", "content": "D"},
                            {"role": "user", "content": "U"}], response_format={"type": "json_object"})
    assert text.startswith("S\n\n## Response Format:") and f"{USER}D{USER}U{ASSISTANT}" in text
    with pytest.raises(chat.ChatFormatError, match="ends with a 'assistant'"):
        encode_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(chat.ChatFormatError, match="developer"):
        encode_messages([{"role": "developer", "content": ""}])


def test_resolve_thinking():
    assert resolve_thinking(None, None, None) == (False, None)
    assert resolve_thinking({"thinking": True}, None, None) == (True, None)
    assert resolve_thinking({"thinking": True, "reasoning_effort": "max"}, None, None) == (True, "max")
    assert resolve_thinking(None, "low", None) == (True, "high")  # an effort alone turns thinking on
    assert resolve_thinking(None, "xhigh", None) == (True, "max")
    assert resolve_thinking(None, "max", "disabled") == (False, None)  # an explicit toggle wins
    assert resolve_thinking(None, None, "enabled") == (True, None)
    assert resolve_thinking(None, None, None, default_thinking=True) == (True, None)


# ---- parsing ---------------------------------------------------------------------------------------------------

TOOL_OUTPUT = (f"Let me look.{THINK_END}Checking the weather.\n\n<{DSML}tool_calls>\n"
               f'<{DSML}invoke name="get_weather">\n'
               f'<{DSML}parameter name="city" string="true">Paris "centre"\n</{DSML}parameter>\n'
               f'<{DSML}parameter name="days" string="false">[1, 2]</{DSML}parameter>\n'
               f"</{DSML}invoke>\n"
               f'<{DSML}invoke name="now">\n</{DSML}invoke>\n'
               f"</{DSML}tool_calls>")


def _shape(message):
    return message.reasoning, message.content, [(c["name"], c["arguments"]) for c in message.tool_calls]


def test_parse_reasoning_content_and_tool_calls():
    message = parse_output(TOOL_OUTPUT, thinking=True, parse_tools=True)
    assert message.reasoning == "Let me look." and message.content == "Checking the weather."
    assert [c["name"] for c in message.tool_calls] == ["get_weather", "now"]
    assert json.loads(message.tool_calls[0]["arguments"]) == {"city": 'Paris "centre"\n', "days": [1, 2]}
    assert json.loads(message.tool_calls[1]["arguments"]) == {}
    assert all(c["id"].startswith("call_") for c in message.tool_calls)


def test_assistant_tool_calls_round_trip_through_the_encoding():
    calls = [_call("a", "get_weather", {"city": "Oslo", "days": 2, "hourly": True, "where": {"lat": 1.5}})]
    rendered = chat._tool_calls_block(calls)
    parsed = parse_output("Sure." + rendered, thinking=False, parse_tools=True)
    assert parsed.content == "Sure."
    assert json.loads(parsed.tool_calls[0]["arguments"]) == json.loads(calls[0]["function"]["arguments"])


@pytest.mark.parametrize("text,thinking", [(TOOL_OUTPUT, True), (THINK_START + "x < y" + THINK_END + "a<b", True),
                                           ("plain <｜DS text\n\n", False), (TOOL_OUTPUT[:170], True)])
def test_streaming_parse_equals_whole_parse(text, thinking):
    whole = parse_output(text, thinking, parse_tools=True)
    rng = random.Random(0)
    for _ in range(100):
        parser, events, i = OutputParser(thinking, parse_tools=True), [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            events += parser.feed(text[i:i + n])
            i += n
        message = OutputParser.collect(events + parser.finish())
        assert _shape(message)[:2] == _shape(whole)[:2]
        assert [(c["name"], c["arguments"]) for c in message.tool_calls] == _shape(whole)[2]
        assert DSML not in message.content + message.reasoning  # markup never leaks


def test_tolerant_parsing():
    # The malformed wrapper some V4 outputs carry (SERVING §D.3 item 1), and a parameter without string="...".
    sloppy = (f'<{DSML}toolcalls><{DSML}invoke name="f"><{DSML}parameter name="n">42</{DSML}parameter>'
              f'<{DSML}parameter name="s">hello</{DSML}parameter></{DSML}invoke></{DSML}toolcalls>')
    message = parse_output(sloppy, thinking=False, parse_tools=True)
    assert json.loads(message.tool_calls[0]["arguments"]) == {"n": 42, "s": "hello"}
    # Cut off mid-call (max_tokens): the call still has valid JSON arguments, no markup in them.
    truncated = parse_output(TOOL_OUTPUT[:TOOL_OUTPUT.index("centre") + 3], thinking=True, parse_tools=True)
    assert json.loads(truncated.tool_calls[0]["arguments"]) == {"city": 'Paris "cen'}
    # Without tools the text is content as it is; a leading <think> in thinking mode is dropped.
    assert parse_output(TOOL_OUTPUT, thinking=False, parse_tools=False).content == TOOL_OUTPUT
    assert parse_output(f"{THINK_START}r{THINK_END}c", True, False).reasoning == "r"


def test_stop_trimmer_streams_like_a_whole_cut():
    text = "abc STOP def ST"
    rng = random.Random(1)
    for stops, expected in ((["STOP"], "abc "), (["ST", "zz"], "abc "), (["none"], text)):
        for _ in range(50):
            trimmer, out, i = StopTrimmer(stops), "", 0
            while i < len(text):
                n = rng.randint(1, 4)
                out += trimmer.push(text[i:i + n])
                i += n
            assert out + trimmer.flush() == expected


def test_structural_decoder_keeps_the_markers(tmp_path):
    """With a tokenizer whose <think>/</think>/｜DSML｜ are special tokens, the parser still sees them; BOS/EOS go."""
    from dsv4jax.tokenizer import JsonTokenizer
    from dsv4jax.train.bpe import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("reasoning about the weather in Paris, naïve café 中文\n" * 20)
    train_tokenizer([corpus], 300, tmp_path / "tokenizer.json")
    tokenizer = JsonTokenizer(tmp_path / "tokenizer.json")
    text = f"the weather{THINK_END}café 中文\n\n<{DSML}tool_calls>"
    ids = [0] + tokenizer.encode(text) + [1]
    assert THINK_END not in tokenizer.decode(ids)  # what the engine's text would show
    decoder, out = StructuralDecoder(tokenizer), ""
    for i in range(0, len(ids), 2):
        out += decoder.push(ids[i:i + 2])
    assert out + decoder.flush() == text
