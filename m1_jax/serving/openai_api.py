"""OpenAI's request and response formats: bodies checked into engine requests, results shaped into replies.

Chat completions render ``messages`` (and ``tools``) with M1's template (:mod:`m1_jax.chat`) and parse the
reply into ``reasoning_content``, ``content`` and ``tool_calls``. Every refusal is a
:class:`~m1_jax.serving.requests.RequestError` naming the field (``param``) as OpenAI's errors do.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from typing import Any

from m1_jax import chat
from m1_jax.serving.requests import STOP, RequestError, SamplingOptions, new_seed

MAX_STOP = 16      # stop strings per request
MAX_N = 16         # choices per request
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_LOGPROBS = 20
_ZERO_ONLY = ("presence_penalty", "frequency_penalty")


@dataclasses.dataclass
class Parsed:
    """A checked request: one prompt per choice (token ids), the options of each, and how to answer."""

    prompts: list[list[int]]
    options: list[SamplingOptions]
    stream: bool
    include_usage: bool
    logprobs: bool
    n: int  # choices per prompt: choice i answers prompt i // n


def _bad(message: str, param: str) -> RequestError:
    return RequestError(message, param=param)


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"{key} must be a number, got {v!r}", key)
    if (v <= lo if open_lo else v < lo) or v > hi:
        raise _bad(f"{key} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}", key)
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key} must be an integer, got {v!r}", key)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"{key} must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {v}", key)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad(f"stop must be a string or a list of strings, got {v!r}", "stop")
    if len(v) > MAX_STOP:
        raise _bad(f"stop takes at most {MAX_STOP} strings, got {len(v)}", "stop")
    if any(s == "" for s in v):
        raise _bad("stop strings must not be empty", "stop")
    return tuple(v)


def check_model(body: Any, served: str) -> dict:
    """The body as a dict whose ``model`` is the one served (404 otherwise, as OpenAI answers)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: the name of the served model", "model")
    if model != served:
        raise RequestError(f"The model `{model}` does not exist; this server serves `{served}`", param="model",
                           status=404, code="model_not_found")
    return body


def _common(body: dict, *, max_tokens_default: int | None, context_room, logprobs: int | None,
            stop_ids: tuple[int, ...], prompts: list[list[int]], stream: bool) -> Parsed:
    for key in _ZERO_ONLY:
        if body.get(key) not in (None, 0, 0.0):
            raise _bad(f"{key} is not supported (only 0)", key)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported", "logit_bias")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of is not supported (only 1)", "best_of")
    n = _integer(body, "n", 1, 1, MAX_N)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)
    top_k = _integer(body, "top_k", 0, -1)
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 64 - 1)
    stop = _stop(body)
    ignore_eos = body.get("ignore_eos", False)  # an extension (vLLM's): generate max_tokens whatever comes
    if not isinstance(ignore_eos, bool):
        raise _bad(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
    if ignore_eos:
        stop_ids = ()
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise _bad("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict):
            raise _bad(f"stream_options must be an object, got {opts!r}", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    base = new_seed() if seed is None else seed % 2 ** 64
    out_prompts, options = [], []
    for p in prompts:
        max_tokens = max_tokens_default if max_tokens_default is not None else max(context_room(len(p)), 1)
        for i in range(n):
            out_prompts.append(p)
            options.append(SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                           top_k=max(top_k, 0), seed=(base + i) % 2 ** 64, stop=stop,
                                           stop_token_ids=stop_ids, logprobs=logprobs))
    return Parsed(out_prompts, options, stream, include_usage, logprobs is not None, n)


def _stream_flag(body: dict) -> bool:
    v = body.get("stream", False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"stream must be true or false, got {v!r}", "stream")
    return v


def parse_chat(body: dict, tokenizer, context_room, stop_ids: tuple[int, ...]) -> Parsed:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of messages", "messages")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad(f"tools must be a list, got {type(tools).__name__}", "tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise _bad(f"tool_choice {choice!r} is not supported (auto or none)", "tool_choice")
    if choice == "none":
        tools = None
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("response_format: only {'type': 'text'} is supported", "response_format")
    try:
        prompt = tokenizer.encode(chat.render(messages, tools or None))
    except chat.ChatError as e:
        raise _bad(str(e), "messages") from None
    max_tokens = _integer(body, "max_completion_tokens", None, 1)
    max_tokens = _integer(body, "max_tokens", max_tokens, 1)
    lp = body.get("logprobs", False)
    if lp not in (None, True, False):
        raise _bad(f"logprobs must be true or false, got {lp!r}", "logprobs")
    top = _integer(body, "top_logprobs", None, 0, MAX_CHAT_LOGPROBS)
    if top is not None and not lp:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    return _common(body, max_tokens_default=max_tokens, context_room=context_room,
                   logprobs=(top or 0) if lp else None, stop_ids=stop_ids, prompts=[prompt], stream=_stream_flag(body))


def _completion_prompts(v: Any, tokenizer) -> list[list[int]]:
    err = _bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    if isinstance(v, str):
        return [tokenizer.encode(v)]
    if not isinstance(v, list) or not v:
        raise err
    if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return [list(v)]
    if all(isinstance(s, str) for s in v):
        return [tokenizer.encode(s) for s in v]
    if all(isinstance(r, list) and r and all(isinstance(t, int) and not isinstance(t, bool) for t in r) for r in v):
        return [list(r) for r in v]
    raise err


def parse_completion(body: dict, tokenizer, context_room, stop_ids: tuple[int, ...]) -> Parsed:
    if "prompt" not in body:
        raise _bad("prompt is required", "prompt")
    prompts = _completion_prompts(body["prompt"], tokenizer)
    if body.get("echo"):
        raise _bad("echo is not supported", "echo")
    if body.get("suffix") not in (None, ""):
        raise _bad("suffix is not supported", "suffix")
    logprobs = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    return _common(body, max_tokens_default=_integer(body, "max_tokens", 16, 1), context_room=context_room,
                   logprobs=logprobs, stop_ids=stop_ids, prompts=prompts, stream=_stream_flag(body))


# ---------------------------------------------------------------------------------------- replies
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_entry(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, events) -> list[dict]:
    """OpenAI's ``logprobs.content`` entries of token events (eos ids left out, as they are from the text)."""
    out = []
    for ev in events:
        if ev.stop_token:
            continue
        e = token_entry(tokenizer, ev.token, ev.logprob)
        e["top_logprobs"] = [token_entry(tokenizer, t, lp) for t, lp in (ev.top or [])]
        out.append(e)
    return out


def completion_logprobs(tokenizer, events, offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object of token events."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        if ev.stop_token:
            continue
        text = tokenizer.decode([ev.token])
        tokens.append(text)
        lps.append(ev.logprob)
        tops.append({tokenizer.decode([t]): lp for t, lp in (ev.top or [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_message(text: str) -> tuple[dict, bool]:
    """The assistant message of a reply's text -> (message, has tool calls)."""
    reply = chat.parse_reply(text)
    calls = [c.to_openai(i) for i, c in enumerate(reply.tool_calls)]
    msg: dict[str, Any] = {"role": "assistant", "content": reply.content if (reply.content or not calls) else None}
    if reply.reasoning is not None:
        msg["reasoning_content"] = reply.reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg, bool(calls)


def finish_reason(reason: str, has_calls: bool) -> str:
    return "tool_calls" if has_calls and reason == STOP else reason


_TAGS = (chat.THINK_OPEN, chat.THINK_CLOSE, chat.CALLS_OPEN)


class ChatStream:
    """A reply's text as it grows -> OpenAI chat deltas (``reasoning_content``, ``content``, ``tool_calls``).

    Text that could still turn out to be a tag, and an unfinished tool-call block, are held back; the
    tool calls go out whole once the reply ends. The deltas add up to :func:`chat_message`'s fields."""

    def __init__(self):
        self.text = ""
        self._reasoning = ""
        self._content = ""

    def push(self, piece: str, final: bool = False) -> list[dict]:
        self.text += piece
        text = self.text
        if not final:
            start = text.rfind(chat.CALLS_OPEN)
            if start >= 0 and text.find(chat.CALLS_CLOSE, start) < 0:
                text = text[:start]
            hold = max((n for t in _TAGS for n in range(min(len(t) - 1, len(text)), 0, -1) if text.endswith(t[:n])),
                       default=0)
            text = text[:len(text) - hold]
        msg, _ = chat_message(text)
        out = []
        for key, attr in (("reasoning_content", "_reasoning"), ("content", "_content")):
            new, sent = msg.get(key) or "", getattr(self, attr)
            if len(new) > len(sent) and new.startswith(sent):
                out.append({key: new[len(sent):]})
                setattr(self, attr, new)
        if final and msg.get("tool_calls"):
            out.append({"tool_calls": [dict(c, index=i) for i, c in enumerate(msg["tool_calls"])]})
        return out
