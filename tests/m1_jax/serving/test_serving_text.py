"""The serving engine's host-side pieces: stop strings, chat deltas, the prefix cache's bookkeeping and the
request checks (no model)."""

import numpy as np
import pytest
from conftest import REPLY

from m1_jax import chat
from m1_jax.serving import openai_api as api
from m1_jax.serving.prefix_cache import Entry, PrefixCache, block_hashes
from m1_jax.serving.requests import RequestError
from m1_jax.serving.text import StopStrings
from m1_jax.tokenizer import ByteTokenizer, StreamDecoder


def _pieces(text, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(text[i:i + n])
        i += n
    out.append(text[i:])
    return out


@pytest.mark.parametrize("sizes", [[1] * 40, [3, 5, 2, 7], [100]])
def test_stop_strings_across_pieces(sizes):
    s = StopStrings(["END", "xyz"])
    out = "".join(s.feed(p) for p in _pieces("abc EN ENx END tail", sizes))
    assert (out, s.stopped) == ("abc EN ENx ", "END")
    s = StopStrings(["END"])
    out = "".join(s.feed(p) for p in _pieces("ends with EN", sizes)) + s.flush()
    assert (out, s.stopped) == ("ends with EN", None)  # the held-back tail was not a stop string


def test_stream_decoder_holds_back_incomplete_characters():
    tok = ByteTokenizer(512)
    ids = tok.encode("né 日本 <end_of_sentence>ok")
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    dec = StreamDecoder(tok)
    assert dec.push("日".encode()[0]) == "" and dec.flush() == "\ufffd"


@pytest.mark.parametrize("step", [1, 2, 5, 9, 1000])
def test_chat_deltas_add_up_to_the_message(step):
    stream = api.ChatStream()
    deltas = []
    for i in range(0, len(REPLY), step):
        deltas += stream.push(REPLY[i:i + step])
    deltas += stream.push("", final=True)
    msg, has_calls = api.chat_message(REPLY)
    joined = {k: "".join(d.get(k, "") for d in deltas) for k in ("reasoning_content", "content")}
    assert joined == {"reasoning_content": msg["reasoning_content"], "content": msg["content"]} and has_calls
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]) for c in calls] == [(0, msg["tool_calls"][0]["function"])]
    assert not any("<" in d.get("content", "") for d in deltas)  # no tag leaks out half-written


def test_prefix_cache_evicts_least_recent_and_keeps_parents_before_children():
    def entry(nbytes):
        return Entry(np.zeros(nbytes // 4, np.float32), np.zeros(0), np.zeros(0), np.zeros(0))

    tokens = list(range(64))
    h = block_hashes(tokens, 16)
    assert len(h) == 4 and h[:2] == block_hashes(tokens[:40], 16) and h[0] != block_hashes([1] + tokens[1:], 16)[0]
    other = block_hashes([7] * 16, 16)
    cache = PrefixCache(16, budget_bytes=4 * 400)
    cache.put(other, entry(400))
    for k in range(1, 4):
        cache.put(h[:k], entry(400))
    assert len(cache.lookup(h)) == 3 and cache.bytes == 1600
    cache.put(h[:4], entry(400))  # full: the least recent entry that is not one of its parents goes
    assert len(cache.lookup(h)) == 4 and other[0] not in cache and cache.evictions == 1
    cache.put(other, entry(400))  # now the chain's deepest block is the least recent
    assert len(cache.lookup(h)) == 3 and other[0] in cache and cache.evictions == 2
    small = PrefixCache(16, budget_bytes=2 * 400)
    for k in range(1, 4):
        small.put(h[:k], entry(400))  # no room but its own parents: the third block is not kept
    assert len(small.lookup(h)) == 2 and small.evictions == 0
    cache.put([b"other"], entry(10_000))  # larger than the whole budget: not kept
    assert b"other" not in cache and cache.bytes == 1600
    assert PrefixCache(16, 0).enabled is False


def test_chat_request_checks_name_the_field():
    tok = ByteTokenizer(512)

    def parse(**body):
        return api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}, tok,
                              lambda n: 100 - n, (258,))

    p = parse(max_tokens=7, seed=5, n=2, stop="x", logprobs=True, top_logprobs=3)
    assert [o.seed for o in p.options] == [5, 6] and p.options[0].max_tokens == 7 and p.options[0].logprobs == 3
    assert p.prompts[0] == tok.encode(chat.render([{"role": "user", "content": "hi"}]))
    assert parse().options[0].max_tokens == 100 - len(p.prompts[0])  # default: to the end of the context
    assert parse().options[0].stop_token_ids == (258,) and parse(ignore_eos=True).options[0].stop_token_ids == ()
    for body, param in [({"presence_penalty": 0.5}, "presence_penalty"), ({"stop": [""]}, "stop"),
                        ({"tool_choice": "required"}, "tool_choice"), ({"stream": "yes"}, "stream"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"seed": 1.5}, "seed"), ({"ignore_eos": 1}, "ignore_eos"), ({"messages": []}, "messages")]:
        with pytest.raises(RequestError) as e:
            parse(**body)
        assert e.value.param == param and e.value.status == 400
    with pytest.raises(RequestError) as e:
        api.check_model({"model": "other"}, "m")
    assert e.value.status == 404 and e.value.code == "model_not_found"
