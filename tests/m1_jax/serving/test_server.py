"""``m1 serve``'s HTTP server on localhost, talked to with the official ``openai`` client."""

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from conftest import MESSAGES, REPLY, TOOLS

from m1_jax import chat
from m1_jax.serving.engine import Engine, EngineConfig
from m1_jax.serving.metrics import Metrics
from m1_jax.serving.requests import Request, SamplingOptions
from m1_jax.serving.server import create_app

NAME = "tiny-tools"
REASONING = "The user wants the weather."


@pytest.fixture(scope="module")
def server(tool_model):
    model, tok = tool_model
    engine = Engine(model, tok, EngineConfig(slots=8, max_context=1024, prefill_chunk=64, prefix_cache_bytes=64 << 20,
                                             max_queue=32), metrics=Metrics())
    app = create_app(engine, NAME, tok, metrics=engine.metrics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(60)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def _error(e: openai.APIStatusError) -> dict:
    return e.response.json()["error"]


def test_chat_parses_reasoning_and_tool_calls_streamed_or_not(server, client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=300)
    (choice,) = r.choices
    msg = choice.message
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather",
                                                                                             {"city": "Paris"})]
    assert msg.content == "Checking." and msg.model_extra["reasoning_content"] == REASONING
    # the parsed reply is what the model's own text says
    raw = client.completions.create(model=NAME, prompt=chat.render(MESSAGES, TOOLS), temperature=0, max_tokens=300)
    assert raw.choices[0].text == REPLY
    parsed = chat.parse_reply(raw.choices[0].text)
    assert [c.to_openai(i) for i, c in enumerate(parsed.tool_calls)] == [c.model_dump(exclude_none=True)
                                                                        for c in msg.tool_calls]
    assert r.usage.completion_tokens == len(REPLY) + 1  # the end-of-turn token ends the reply
    assert r.usage.prompt_tokens == len(server[1].tokenizer.encode(chat.render(MESSAGES, TOOLS)))

    reasoning, content, calls, finish, usage = "", "", [], None, None
    for chunk in client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, temperature=0,
                                                max_tokens=300, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += c.delta.model_extra.get("reasoning_content") or ""
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, "Checking.", "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in calls] == [(t.function.name, t.function.arguments)
                                                                        for t in msg.tool_calls]
    assert usage.completion_tokens == r.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its blocks were cached


def test_completions_logprobs_stop_n_and_streaming(client):
    prompt = chat.render(MESSAGES, TOOLS)
    r = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=6, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == REPLY[:6] and lp.tokens == list(REPLY[:6])
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()))
    cut = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=50, stop=["wants", "zzz"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (REPLY[:REPLY.index("wants")], "stop")
    two = client.completions.create(model=NAME, prompt=["abc", "de"], n=2, temperature=1.0, seed=3, max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.usage.prompt_tokens == 5 and two.usage.completion_tokens == 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, temperature=0, max_tokens=40, stream=True) if c.choices)
    assert streamed == REPLY[:40]
    chat_lp = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=3,
                                             logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [e.token for e in chat_lp] == list(REPLY[:3]) and all(len(e.top_logprobs) == 2 for e in chat_lp)
    assert chat_lp[0].logprob == pytest.approx(lp.token_logprobs[0], abs=1e-5)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    url, engine = server
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "`gpt-4o` does not exist" in _error(e.value)["message"]
    long = [{"role": "user", "content": "x" * 1100}]
    n_long = len(engine.tokenizer.encode(chat.render(long, TOOLS)))
    for kwargs, param, says in [
        (dict(temperature=5), "temperature", "temperature must be in [0.0, 2.0], got 5"),
        (dict(top_p=0), "top_p", "top_p must be in (0.0, 1.0]"),
        (dict(max_tokens=0), "max_tokens", "max_tokens must be >= 1"),
        (dict(max_tokens=900), "max_tokens", "lower max_tokens to at most"),
        (dict(n=0), "n", "n must be in [1, 16]"),
        (dict(top_logprobs=3), "top_logprobs", "top_logprobs needs logprobs: true"),
        (dict(messages=long), "messages", f"the prompt is {n_long} tokens long, the context is 1024 tokens"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "messages", "unknown role 'robot'"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": NAME, "messages": MESSAGES, "tools": TOOLS, **kwargs})
        err = _error(e.value)
        assert err["param"] == param and says in err["message"], (kwargs, err)
    bad = httpx.post(url + "/v1/chat/completions", content=b'{"model": "tiny-tools", "messages": [',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]

    # a full queue: every slot busy, the queue at its limit -> 429 with Retry-After
    hold = []
    for i in range(engine.config.slots):
        hold.append(engine.submit(Request([7, i], SamplingOptions(max_tokens=900, temperature=0.0), lambda ev: None)))
        while engine.waiting:
            time.sleep(0.002)
    hold += [engine.submit(Request([8], SamplingOptions(max_tokens=4), lambda ev: None))
             for _ in range(engine.config.max_queue)]
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1 and _error(e.value)["code"] == "queue_full"
    for r in hold:
        r.cancel()
    ok = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=13)
    assert ok.choices[0].message.model_extra["reasoning_content"] == "The u"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_client_gone_mid_stream_frees_its_slot(server):
    url, engine = server
    body = {"model": NAME, "prompt": "hello", "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.running == 1
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0
    assert 'm1_requests_total{finish_reason="abort"}' in httpx.get(url + "/metrics").text


def test_200_requests_from_32_clients_all_complete(server):
    url, _ = server
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    gate = asyncio.Semaphore(32)

    async def one(i):
        async with gate:
            r = await client.completions.create(model=NAME, prompt="x" * (1 + i % 37), max_tokens=4, temperature=0)
            return r.usage.completion_tokens

    async def all_of():
        return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(all_of()) == [4] * 200
    metrics = httpx.get(url + "/metrics").text
    for name in ("m1_time_to_first_token_seconds_count", "m1_prefix_cache_hit_rate", "m1_queue_requests",
                 "m1_running_slots", "m1_generation_tokens_per_second"):
        assert name in metrics
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == NAME
