"""M1's chat template (docs/model.md §4) and the parser of its replies (reasoning, content, tool calls).

Rendering takes OpenAI-style messages (``role`` system / user / assistant / tool, ``content`` a string
or a list of ``{"type": "text", "text": ...}`` items) and tools (``{"type": "function", "function":
{...}}`` or the bare function object)::

    <begin_of_document>
    <beginning_of_sentence>system ai_setting=assistant\\n{system}<end_of_sentence>\\n       (if a system message)
    <beginning_of_sentence>system tool_setting=tools\\n...<tools>...</tools>...<end_of_sentence>\\n  (if tools)
    <beginning_of_sentence>user name=user\\n{text}<end_of_sentence>\\n
    <beginning_of_sentence>ai name=assistant\\n{text}<end_of_sentence>\\n
    <beginning_of_sentence>tool name=tools\\n(tool name: {n}\\ntool result: {t}\\n\\n)*<end_of_sentence>\\n
    <beginning_of_sentence>ai name=assistant\\n                                            (generation prompt)

An assistant message's ``tool_calls`` are written the way the model emits them: after its text,
``<tool_calls>\\n`` + one ``{"name": ..., "arguments": {...}}`` JSON object per line + ``</tool_calls>``.
Consecutive tool messages form one tool turn.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from m1_jax.tokenizer import BEGIN_OF_DOCUMENT, BEGIN_OF_SENTENCE, END_OF_SENTENCE

TOOLS_INTRO = "You are provided with these tools:\n<tools>\n"
TOOLS_OUTRO = (
    "</tools>\n\nIf you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide "
    "tool-name and json-object of arguments, following the format below:\n<tool_calls>\n"
    "{'name': <tool-name-1>, 'arguments': <args-json-object-1>}\n...\n</tool_calls>"
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALLS_OPEN, CALLS_CLOSE = "<tool_calls>", "</tool_calls>"


class ChatError(ValueError):
    """A message list the template cannot render (the message names the message index and field)."""


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for item in content:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, Mapping) and item.get("type", "text") == "text" and "text" in item:
                parts.append(str(item["text"]))
            else:
                raise ChatError(f"{where}: content items must be {{'type': 'text', 'text': ...}}, got {item!r}")
        return "".join(parts)
    raise ChatError(f"{where}: content must be a string or a list of text items, got {type(content).__name__}")


def _tool_function(tool: Any, i: int) -> Mapping:
    if not isinstance(tool, Mapping):
        raise ChatError(f"tools[{i}]: must be an object, got {type(tool).__name__}")
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
    if not isinstance(fn, Mapping) or "name" not in fn:
        raise ChatError(f"tools[{i}]: needs a 'name' (or a 'function' object with one)")
    return fn


def _call_line(call: Any, where: str) -> str:
    if not isinstance(call, Mapping):
        raise ChatError(f"{where}: a tool call must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", {})
    if not name:
        raise ChatError(f"{where}: a tool call needs a function name")
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ChatError(f"{where}: arguments of tool call {name!r} are not valid JSON: {args!r}") from None
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def render_tool_calls(calls: Sequence[Any], where: str = "tool_calls") -> str:
    lines = [_call_line(c, f"{where}[{j}]") for j, c in enumerate(calls)]
    return CALLS_OPEN + "\n" + "\n".join(lines) + "\n" + CALLS_CLOSE


def _turn(header: str, body: str) -> str:
    return f"{BEGIN_OF_SENTENCE}{header}\n{body}{END_OF_SENTENCE}\n"


GENERATION_PROMPT = f"{BEGIN_OF_SENTENCE}ai name=assistant\n"


def render(messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None, *,
           add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation (see the module docstring for the format)."""
    msgs = list(messages)
    _check_roles(msgs)
    out = [BEGIN_OF_DOCUMENT]
    start = 0
    if msgs and msgs[0]["role"] == "system":
        out.append(_turn("system ai_setting=assistant", _text(msgs[0].get("content"), "messages[0]")))
        start = 1
    if tools:
        lines = "".join(json.dumps(_tool_function(t, j), ensure_ascii=False) + "\n" for j, t in enumerate(tools))
        out.append(_turn("system tool_setting=tools", TOOLS_INTRO + lines + TOOLS_OUTRO))
    out.append(render_turns(msgs[start:], first_index=start))
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def _check_roles(msgs) -> None:
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatError(f"messages[{i}]: must be an object with a 'role'")


def render_turns(messages: Sequence[Mapping], *, first_index: int = 0) -> str:
    """The user / assistant / tool turns alone (what a conversation appends after its start)."""
    msgs = list(messages)
    _check_roles(msgs)
    out = []
    i = 0
    while i < len(msgs):
        m, where = msgs[i], f"messages[{first_index + i}]"
        role = m["role"]
        if role == "user":
            out.append(_turn("user name=user", _text(m.get("content"), where)))
        elif role == "assistant":
            body = _text(m.get("content"), where)
            if m.get("tool_calls"):
                body += ("\n" if body and not body.endswith("\n") else "") + render_tool_calls(
                    m["tool_calls"], f"{where}.tool_calls")
            out.append(_turn("ai name=assistant", body))
        elif role == "tool":
            results = []
            while i < len(msgs) and msgs[i]["role"] == "tool":
                results.extend(_tool_results(msgs[i], f"messages[{first_index + i}]"))
                i += 1
            out.append(_turn("tool name=tools", "".join(f"tool name: {n}\ntool result: {t}\n\n" for n, t in results)))
            continue
        elif role == "system":
            raise ChatError(f"{where}: a system message must come first")
        else:
            raise ChatError(f"{where}: unknown role {role!r} (system, user, assistant, tool)")
        i += 1
    return "".join(out)


def _tool_results(m: Mapping, where: str) -> list[tuple[str, str]]:
    content = m.get("content")
    if isinstance(content, list) and all(isinstance(c, Mapping) and "name" in c for c in content):
        return [(str(c["name"]), _text([c], where)) for c in content]
    name = m.get("name")
    if not name:
        raise ChatError(f"{where}: a tool message needs a 'name' (or content items with names)")
    return [(str(name), _text(content, where))]


# ---------------------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict

    def to_openai(self, index: int = 0) -> dict:
        return {"id": f"call_{index}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclasses.dataclass
class ParsedReply:
    reasoning: str | None   # the text inside <think>...</think> (None if absent)
    content: str            # the rest, tool-call block removed; unparseable call lines are kept here
    tool_calls: list[ToolCall]

    def to_message(self) -> dict:
        """An OpenAI-style assistant message (what :func:`render` takes back)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai(i) for i, c in enumerate(self.tool_calls)]
        return msg


# Deepest nesting of objects and lists accepted in a tool call's arguments. Deeper (or a number past
# Python's int-string conversion limit) is not a tool call: the line stays in the reply's content.
MAX_ARGUMENT_DEPTH = 64


def _nesting_depth(obj: Any) -> int:
    """Levels of dicts and lists in a parsed JSON value (iterative: no recursion limit to hit)."""
    depth, level = 0, [obj]
    while level:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            break
        depth += 1
        if depth > MAX_ARGUMENT_DEPTH + 1:
            break
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def _loads(text: str) -> Any:
    """``json.loads`` or None: also for nesting the C decoder cannot recurse through and huge integers."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError, as is the int-digits limit
        return None


def _parse_call(line: str) -> ToolCall | None:
    obj = _loads(line)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict) or _nesting_depth(args) > MAX_ARGUMENT_DEPTH:
        return None
    return ToolCall(obj["name"], args)


def parse_reply(text: str) -> ParsedReply:
    """Splits a generated reply into reasoning, content and tool calls; never raises on bad output.

    A ``<think>`` without ``</think>`` is reasoning to the end (truncated generation); a reply that
    starts inside the reasoning (``</think>`` without ``<think>``) has everything before it as
    reasoning. Lines of a ``<tool_calls>`` block that are not a JSON object with a ``name`` and an
    object of ``arguments`` (nested at most :data:`MAX_ARGUMENT_DEPTH` deep) stay in ``content`` as
    text. The end-of-turn token is dropped.
    """
    text = text.replace(END_OF_SENTENCE, "")
    reasoning = None
    if THINK_OPEN in text or THINK_CLOSE in text:
        before, sep, after = text.partition(THINK_OPEN)
        if not sep:  # only a closing tag: the prompt opened the reasoning
            before, after = "", text
        inner, closed, rest = after.partition(THINK_CLOSE)
        reasoning = inner.strip("\n")
        text = before + (rest if closed else "")
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    while True:
        start = text.find(CALLS_OPEN, pos)
        if start < 0:
            kept.append(text[pos:])
            break
        kept.append(text[pos:start])
        end = text.find(CALLS_CLOSE, start)
        block = text[start + len(CALLS_OPEN): end if end >= 0 else len(text)]
        bad = []
        for line in block.split("\n"):
            if not line.strip():
                continue
            call = _parse_call(line.strip())
            if call is None:
                bad.append(line)
            else:
                calls.append(call)
        if bad:
            kept.append("\n".join(bad))
        pos = end + len(CALLS_CLOSE) if end >= 0 else len(text)
    content = "".join(kept).strip()
    return ParsedReply(reasoning=reasoning, content=content, tool_calls=calls)
