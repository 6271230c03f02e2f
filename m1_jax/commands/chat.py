"""``m1 chat CKPT [--tools tools.json]``: an interactive conversation in M1's chat template.

Each turn renders the whole conversation, but only the tokens the cache has not seen are prefilled:
the lightning states and KV caches carry the history. Lines starting with ``/`` are commands:
``/tool NAME RESULT`` adds a tool result, ``/reset`` starts over, ``/exit`` quits.
"""

from __future__ import annotations

import json
import sys

from m1_jax.commands.runtime import (add_model_arguments, add_sampling_arguments, announce_compile,
                                    load_config_and_tokenizer, load_model, sampling_params)

HELP = "commands: /tool NAME RESULT (a tool result), /reset, /exit"
PROMPT = "> "


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument("--tools", default=None, help="JSON file: a list of tools (OpenAI function format)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--show-reasoning", action="store_true", help="also print the <think> part of replies")
    add_sampling_arguments(p, max_new_tokens=512)


def read_tools(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            tools = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--tools: {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools: {path}: not valid JSON ({e})") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise ValueError(f"--tools: {path}: expected a JSON list of tools, got {type(tools).__name__}")
    return tools


class Session:
    """The conversation, its token history and the cache holding a prefix of that history.

    The history is kept as token ids (the reply tokens as generated, not re-encoded from text), so each
    turn feeds the cache only the tokens it has not seen: the new turns and the generation prompt."""

    def __init__(self, model, tokenizer, sp, args, tools, system):
        self.model, self.tok, self.sp, self.args, self.tools = model, tokenizer, sp, args, tools
        self.system = system
        self.max_len = args.max_len or 4096
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.history: list[int] | None = None  # token ids of the conversation so far
        self.rendered = 0                      # messages already in the history
        self.cache, self.seen = None, []       # the cache holds history[:len(seen)]

    def reply(self, out=None) -> str:
        """Generates, records and prints (to ``out``, default: the current ``sys.stdout``) the next reply."""
        from m1_jax.cache import init_cache
        from m1_jax.chat import GENERATION_PROMPT, parse_reply, render, render_turns
        from m1_jax.generation import stream
        from m1_jax.tokenizer import StreamDecoder, escape_controls

        out = sys.stdout if out is None else out
        if self.history is None:
            history = self.tok.encode(render(self.messages, self.tools))
        else:
            history = self.history + self.tok.encode(
                render_turns(self.messages[self.rendered:], first_index=self.rendered) + GENERATION_PROMPT)
        if self.cache is None:
            self.cache, self.seen = init_cache(self.model.cfg, 1, self.max_len, dtype=self.model.dtype), []
        dec, toks = StreamDecoder(self.tok, escape_controls=True), []
        cache, self.cache = self.cache, None  # unusable if this turn fails half-way
        for tok, cache in stream(self.model, history[len(self.seen):], cache=cache,
                                 max_new_tokens=self.args.max_new_tokens, temperature=self.sp.temperature,
                                 top_k=self.sp.top_k or None, top_p=self.sp.top_p,
                                 seed=self.args.seed + len(self.messages), eos_token_id=self.tok.eos_token_id,
                                 chunk_size=self.args.chunk_size):
            toks.append(tok)
            if self.args.show_reasoning:
                out.write(dec.push(tok))
                out.flush()
        eos = self.tok.eos_token_id
        ended = bool(toks) and toks[-1] == eos
        body = toks[:-1] if ended else toks
        self.cache, self.seen = cache, history + toks[:-1]  # the last token was sampled but not fed
        self.history = history + body + [eos] + self.tok.encode("\n")
        text = self.tok.decode(body)
        # The turn is part of the conversation from here on, before anything reads or shows the reply.
        self.messages.append({"role": "assistant", "content": text})
        self.rendered = len(self.messages)
        parsed = parse_reply(text)
        if not self.args.show_reasoning:
            out.write(escape_controls(parsed.content))
        for call in parsed.tool_calls:
            call_text = f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)})"
            out.write(f"\n[tool call] {escape_controls(call_text)}")
        out.write("\n")
        return text


def user_lines():
    """The user's lines from stdin; on a terminal each is asked for with :data:`PROMPT` (and line editing)."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input(PROMPT) + "\n"
        except EOFError:
            return


def run(args) -> int:
    from m1_jax.chat import render

    cfg, tokenizer = load_config_and_tokenizer(args)
    sp = sampling_params(args, cfg.vocab_size)
    tools = read_tools(args.tools)
    render([{"role": "user", "content": ""}], tools)  # a bad tool definition fails here, before loading
    model = load_model(args)
    session = Session(model, tokenizer, sp, args, tools, args.system)
    print(f"m1 chat: {args.checkpoint} ({HELP})", file=sys.stderr)
    compiled = False
    for line in user_lines():
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd == "/exit":
                break
            if cmd == "/reset":
                session.reset()
                continue
            if cmd == "/tool":
                name, _, result = rest.partition(" ")
                if not name:
                    print(f"usage: /tool NAME RESULT ({HELP})", file=sys.stderr)
                    continue
                session.messages.append({"role": "tool", "name": name, "content": result})
            else:
                print(f"unknown command {cmd} ({HELP})", file=sys.stderr)
                continue
        else:
            session.messages.append({"role": "user", "content": line})
        if not compiled:
            announce_compile("chat", "the conversation")
            compiled = True
        try:
            session.reply()
        except ValueError as e:  # e.g. the conversation outgrew the cache: say so, drop the turn, go on
            print(f"m1 chat: error: {e}", file=sys.stderr)
            if len(session.messages) > session.rendered:  # failed before its reply was recorded
                session.messages.pop()
                session.cache, session.seen = None, []
    return 0
