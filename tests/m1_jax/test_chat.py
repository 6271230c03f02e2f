"""M1 chat template (docs/model.md §4) and reply parsing."""

import pytest

from m1_jax.chat import ChatError, ParsedReply, ToolCall, parse_reply, render

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris? And the time."}]},
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "c0", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                    {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
    {"role": "tool", "tool_call_id": "c0", "name": "get_weather", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "c1", "name": "get_time", "content": "12:00"},
    {"role": "assistant", "content": "It is 18C and sunny in Paris; the time is 12:00."},
    {"role": "user", "content": "Thanks!"},
]

# Written out by hand from docs/model.md §4.
EXPECTED = (
    "<begin_of_document>"
    "<beginning_of_sentence>system ai_setting=assistant\nYou are a helpful assistant.<end_of_sentence>\n"
    "<beginning_of_sentence>system tool_setting=tools\n"
    "You are provided with these tools:\n"
    "<tools>\n"
    '{"name": "get_weather", "description": "Weather of a city.", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
    '{"name": "get_time", "parameters": {"type": "object", "properties": {}}}\n'
    "</tools>\n"
    "\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name "
    "and json-object of arguments, following the format below:\n"
    "<tool_calls>\n"
    "{'name': <tool-name-1>, 'arguments': <args-json-object-1>}\n"
    "...\n"
    "</tool_calls><end_of_sentence>\n"
    "<beginning_of_sentence>user name=user\nWeather in Paris? And the time.<end_of_sentence>\n"
    "<beginning_of_sentence>ai name=assistant\n"
    "<tool_calls>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '{"name": "get_time", "arguments": {}}\n'
    "</tool_calls><end_of_sentence>\n"
    "<beginning_of_sentence>tool name=tools\n"
    "tool name: get_weather\ntool result: 18C, sunny\n\n"
    "tool name: get_time\ntool result: 12:00\n\n"
    "<end_of_sentence>\n"
    "<beginning_of_sentence>ai name=assistant\nIt is 18C and sunny in Paris; the time is 12:00.<end_of_sentence>\n"
    "<beginning_of_sentence>user name=user\nThanks!<end_of_sentence>\n"
    "<beginning_of_sentence>ai name=assistant\n"
)


def test_render_full_conversation():
    assert render(CONVERSATION, [WEATHER, CLOCK]) == EXPECTED


def test_render_minimal_and_without_generation_prompt():
    msgs = [{"role": "user", "content": "hi"}]
    assert render(msgs) == ("<begin_of_document><beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
                            "<beginning_of_sentence>ai name=assistant\n")
    assert render(msgs, add_generation_prompt=False).endswith("hi<end_of_sentence>\n")
    # tool results given as named content items (one message) render like separate tool messages
    items = [{"role": "tool", "content": [{"name": "a", "type": "text", "text": "1"},
                                          {"name": "b", "type": "text", "text": "2"}]}]
    assert "tool name=tools\ntool name: a\ntool result: 1\n\ntool name: b\ntool result: 2\n\n<end_of_sentence>" \
        in render(items)


@pytest.mark.parametrize("msgs, match", [
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"content": "x"}], "role"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "must come first"),
    ([{"role": "tool", "content": "x"}], "needs a 'name'"),
    ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "content items"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}], "not valid JSON"),
])
def test_render_errors_name_the_message(msgs, match):
    with pytest.raises(ChatError, match=match):
        render(msgs)


def test_parse_reasoning_content_and_calls():
    text = ('<think>\nThe user wants weather.\n</think>\nLet me check.\n<tool_calls>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '{"name": "get_time", "arguments": {}}\n</tool_calls><end_of_sentence>')
    r = parse_reply(text)
    assert r == ParsedReply(reasoning="The user wants weather.", content="Let me check.",
                            tool_calls=[ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_time", {})])


def test_parse_round_trips_through_the_template():
    r = parse_reply(EXPECTED.split("<beginning_of_sentence>ai name=assistant\n")[1].split("<end_of_sentence>")[0])
    assert [c.name for c in r.tool_calls] == ["get_weather", "get_time"]
    msg = r.to_message()
    again = render([CONVERSATION[1], msg], add_generation_prompt=False)
    assert again == render([CONVERSATION[1], CONVERSATION[2]], add_generation_prompt=False)


@pytest.mark.parametrize("text, content, calls", [
    ("plain answer", "plain answer", 0),
    ("<tool_calls>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}\n</tool_calls>",  # unbalanced braces
     '{"name": "f", "arguments": {"x": 1}', 0),
    ("<tool_calls>\nnot json at all\n{\"name\": \"g\", \"arguments\": {}}\n</tool_calls>", "not json at all", 1),
    ("<tool_calls>\n[1, 2]\n{\"arguments\": {}}\n\"str\"\n</tool_calls>", '[1, 2]\n{"arguments": {}}\n"str"', 0),
    ("<tool_calls>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 2}\"}", "", 1),  # unterminated block
    ("<tool_calls>\n{\"name\": \"f\", \"arguments\": [1]}\n</tool_calls>", '{"name": "f", "arguments": [1]}', 0),
    ("\x00\xff<tool_calls></tool_calls></tool_calls><think>", "\x00\xff</tool_calls>", 0),
])
def test_parse_survives_garbage(text, content, calls):
    r = parse_reply(text)
    assert r.content == content
    assert len(r.tool_calls) == calls


def test_parse_truncated_and_prompt_opened_reasoning():
    assert parse_reply("<think>still thinking").reasoning == "still thinking"
    assert parse_reply("<think>still thinking").content == ""
    r = parse_reply("reasoning from the prompt</think>answer")
    assert (r.reasoning, r.content) == ("reasoning from the prompt", "answer")


def test_turns_extend_the_rendered_prefix():
    from m1_jax.chat import GENERATION_PROMPT, render_turns

    head = render(CONVERSATION[:2], [WEATHER], add_generation_prompt=False)
    tail = render_turns(CONVERSATION[2:], first_index=2) + GENERATION_PROMPT
    assert head + tail == render(CONVERSATION, [WEATHER])


def _calls_block(*lines):
    return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"


@pytest.mark.parametrize("args", [
    "[" * 1000 + "]" * 1000,                     # nested past the default recursion limit
    "[" * 100_000 + "]" * 100_000,               # ... and past any limit a library may raise it to
    '{"a": ' * 1000 + "1" + "}" * 1000,
    '{"a": ' * 200 + "1" + "}" * 200,            # parseable, but deeper than any tool's arguments
    '{"n": ' + "1" * 5000 + "}",                 # past Python's int-string conversion limit
    '"{\\"n\\": ' + "9" * 5000 + '}"',           # the same, inside arguments given as a JSON string
    '"' + "[" * 1000 + "]" * 1000 + '"',
], ids=["lists-1000", "lists-100000", "objects-1000", "objects-200", "int-5000-digits", "string-int-5000-digits", "string-lists-1000"])
def test_parse_never_raises_on_hostile_arguments(args):
    bad = '{"name": "f", "arguments": ' + args + "}"
    r = parse_reply("before " + _calls_block(bad, '{"name": "g", "arguments": {"x": [1, {"y": 2}]}}') + " after")
    assert [c.name for c in r.tool_calls] == ["g"]  # the good call still parses
    assert r.content == "before " + bad + " after"   # the bad line stays in content, as documented
    assert r.to_message()["content"] == r.content


def test_parse_keeps_arguments_nested_within_the_limit():
    from m1_jax.chat import MAX_ARGUMENT_DEPTH

    args = '{"a": ' * (MAX_ARGUMENT_DEPTH - 1) + "[7]" + "}" * (MAX_ARGUMENT_DEPTH - 1)
    r = parse_reply(_calls_block('{"name": "f", "arguments": ' + args + "}"))
    assert len(r.tool_calls) == 1 and r.content == ""
    deeper = '{"a": ' * MAX_ARGUMENT_DEPTH + "[7]" + "}" * MAX_ARGUMENT_DEPTH
    assert parse_reply(_calls_block('{"name": "f", "arguments": ' + deeper + "}")).tool_calls == []


def test_chat_command_goes_on_after_a_hostile_reply(monkeypatch, capsys):
    """``m1 chat`` records the turn and shows the reply whatever the model wrote (here: a tool call nested
    100,000 deep), and the next turn continues the same conversation and cache."""
    import argparse
    import importlib
    import io

    from m1_jax.chat import GENERATION_PROMPT, render_turns
    from m1_jax.commands import chat as chat_command
    from m1_jax.tokenizer import ByteTokenizer
    from tiny_models import tiny_config

    tok = ByteTokenizer(512)
    bad = '{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}"
    replies = iter(["ok\n" + _calls_block(bad), "fine"])
    prompts = []

    def fake_stream(model, prompt_ids, *, cache, **kw):
        prompts.append(list(prompt_ids))
        for t in tok.encode(next(replies)) + [tok.eos_token_id]:
            yield t, cache

    monkeypatch.setattr(importlib.import_module("m1_jax.generation"), "stream", fake_stream)
    cfg = tiny_config()  # vocabulary 512, as the tokenizer's
    monkeypatch.setattr(chat_command, "load_config_and_tokenizer", lambda args: (cfg, tok))
    monkeypatch.setattr(chat_command, "load_model", lambda args: argparse.Namespace(cfg=cfg, dtype="float32"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n"))
    args = argparse.Namespace(checkpoint="ckpt", tools=None, system=None, show_reasoning=False, max_len=32,
                              max_new_tokens=8, temperature=0.0, top_k=None, top_p=None, seed=0, chunk_size=8)
    assert chat_command.run(args) == 0
    out = capsys.readouterr().out
    assert "ok\n" + bad + "\n" in out and out.endswith("fine\n")
    # The second turn feeds only what the cache has not seen: the end of the first reply and the new turn.
    assert prompts[1] == [tok.eos_token_id] + tok.encode(
        "\n" + render_turns([{"role": "user", "content": "again"}]) + GENERATION_PROMPT)
