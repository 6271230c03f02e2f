"""The serving engine: continuous batching equals generating alone, the prefix cache is exact, slots free."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from conftest import MESSAGES, REPLY, TOOLS

import m1_jax
from m1_jax import chat
from m1_jax.serving.engine import Engine, EngineConfig
from m1_jax.sharding import shard_model
from m1_jax.serving.requests import ABORT, LENGTH, STOP, DoneEvent, QueueFull, Request, RequestError, SamplingOptions

GREEDY = SamplingOptions(max_tokens=8, temperature=0.0, logprobs=0)


@pytest.fixture(scope="module")
def engine(tool_model):
    model, tok = tool_model
    eng = Engine(model, tok, EngineConfig(slots=8, max_context=1024, prefill_chunk=64,
                                          prefix_cache_bytes=64 << 20)).start()
    yield eng
    eng.stop()


def _prompts(rng, lengths):
    return [rng.integers(0, 256, size=int(n)).tolist() for n in lengths]


def test_32_concurrent_greedy_requests_equal_generate(engine, tool_model):
    model, _ = tool_model
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, rng.integers(1, 90, size=32))
    got = engine.generate(prompts, GREEDY, timeout=300)
    # generate's rows are independent: each gets what it would get alone
    want = np.asarray(m1_jax.generate(model, prompts, max_new_tokens=8))
    assert [g["tokens"] for g in got] == want.tolist()
    assert {g["finish_reason"] for g in got} == {LENGTH}
    assert engine.running == 0 and engine.waiting == 0


def test_prefix_cache_hits_give_the_same_tokens_and_logprobs(engine, tool_model):
    model, tok = tool_model
    rng = np.random.default_rng(2)
    shared = rng.integers(0, 256, size=213).tolist()  # 3 full blocks of 64, the 4th ends mid-block
    prompts = [shared + tail for tail in _prompts(rng, [0, 1, 7, 11, 60])] + [shared[:192]]  # the last: whole blocks
    results = {}
    for budget in (0, 64 << 20):
        # the module engine's shapes: its compiled steps are reused
        eng = Engine(model, tok, dataclasses.replace(engine.config, prefix_cache_bytes=budget)).start()
        try:
            first = eng.generate(prompts[:1], GREEDY, timeout=300)  # fills the cache
            results[budget] = first + eng.generate(prompts[1:], GREEDY, timeout=300)
        finally:
            eng.stop()
    off, on = results[0], results[64 << 20]
    assert [r["cached_tokens"] for r in off] == [0] * 6
    assert [r["cached_tokens"] for r in on] == [0, 192, 192, 192, 192, 192]
    for a, b in zip(off, on):
        assert a["tokens"] == b["tokens"]
        np.testing.assert_allclose(b["logprobs"], a["logprobs"], atol=1e-5, rtol=0)


def test_tool_call_reply_and_stop_strings(engine):
    prompt = engine.tokenizer.encode(chat.render(MESSAGES, TOOLS))
    stop_ids = (engine.tokenizer.eos_token_id,)
    full = engine.generate([prompt], SamplingOptions(max_tokens=200, temperature=0.0, stop_token_ids=stop_ids))[0]
    assert full["text"] == REPLY and full["finish_reason"] == STOP
    assert full["tokens"][-1] == stop_ids[0]  # the eos id ends the request and is not text
    cut = engine.generate([prompt], SamplingOptions(max_tokens=200, temperature=0.0, stop=("Checking", "zzz"),
                                                    stop_token_ids=stop_ids))[0]
    assert cut["text"] == REPLY[:REPLY.index("Checking")] and cut["finish_reason"] == STOP
    short = engine.generate([prompt], SamplingOptions(max_tokens=5, temperature=0.0))[0]
    assert short["text"] == REPLY[:5] and short["finish_reason"] == LENGTH


def test_seeded_sampling_repeats_and_seeds_differ(engine):
    prompt = [[1, 2, 3, 4, 5]]
    hot = dict(max_tokens=12, temperature=1.5, top_k=200, top_p=0.95)
    a = engine.generate(prompt * 2, [SamplingOptions(seed=7, **hot), SamplingOptions(seed=8, **hot)])
    b = engine.generate(prompt, SamplingOptions(seed=7, **hot))
    assert a[0]["tokens"] == b[0]["tokens"] != a[1]["tokens"]


def test_cancel_frees_the_slot_and_requests_check_their_length(engine):
    events = []
    done = threading.Event()

    def on_event(ev):
        events.append(ev)
        if isinstance(ev, DoneEvent):
            done.set()

    req = engine.submit(Request([5, 6, 7], SamplingOptions(max_tokens=240, temperature=0.0), on_event))
    while not events:
        time.sleep(0.01)
    req.cancel()
    assert done.wait(30)
    assert events[-1].finish_reason == ABORT and events[-1].completion_tokens < 240
    assert engine.running == 0
    assert engine.context == 1024
    with pytest.raises(RequestError, match="the prompt is 1024 tokens long, the context is 1024"):
        engine.check([1] * 1024, GREEDY)
    with pytest.raises(RequestError, match=r"asks for 1026 \(1018 in the prompt, max_tokens=8\).*at most 6"):
        engine.check([1] * 1018, GREEDY)
    with pytest.raises(RequestError, match=r"token id 512 is outside the vocabulary \[0, 512\)"):
        engine.check([512], GREEDY)


def test_a_full_queue_refuses_and_a_stopped_engine_says_so(engine, tool_model):
    model, tok = tool_model
    eng = Engine(model, tok, dataclasses.replace(engine.config, max_queue=2)).start()
    ends = []
    running = []
    for i in range(eng.config.slots):  # one by one: the queue holds only 2
        running.append(eng.submit(Request([1 + i], SamplingOptions(max_tokens=500, temperature=0.0), ends.append)))
        while eng.waiting:
            time.sleep(0.002)
    while eng.running < eng.config.slots:
        time.sleep(0.002)
    queued = [eng.submit(Request([2], GREEDY, ends.append)) for _ in range(2)]
    with pytest.raises(QueueFull, match="2 requests are already waiting") as e:
        eng.submit(Request([3], GREEDY, ends.append))
    assert e.value.status == 429 and e.value.retry_after >= 1
    for r in running + queued:
        r.cancel()
    eng.stop()
    assert [ev.finish_reason for ev in ends if isinstance(ev, DoneEvent)] == [ABORT] * (eng.config.slots + 2)
    with pytest.raises(RequestError, match="shutting down") as e:
        eng.submit(Request([1], GREEDY, ends.append))
    assert e.value.status == 503


def test_engine_settings_are_checked(tool_model):
    model, tok = tool_model
    with pytest.raises(ValueError, match="prefill_chunk must be a power of two >= 16, got 24"):
        Engine(model, tok, EngineConfig(prefill_chunk=24))
    with pytest.raises(ValueError, match="max_context=100000 exceeds the model's max_position_embeddings"):
        Engine(model, tok, EngineConfig(max_context=100000))


def test_on_a_mesh_the_engine_gives_what_one_device_gives(engine, tool_model):
    """Slots split over data (two prefill rows), heads over tensor, experts over expert: the same greedy
    tokens and log-probabilities as the single-device engine."""
    model, tok = tool_model
    sharded = shard_model(model, "data=2,expert=2,tensor=2")
    eng = Engine(sharded, tok, dataclasses.replace(engine.config, prefix_cache_bytes=64 << 20)).start()
    try:
        assert eng.rows == 4 and eng.cache.keys.sharding.spec[2] == ("data", "expert")  # 4 batch shards
        rng = np.random.default_rng(3)
        prompts = _prompts(rng, [5, 70, 33, 130, 1, 64])
        got = eng.generate(prompts, GREEDY, timeout=300)
    finally:
        eng.stop()
    want = engine.generate(prompts, GREEDY, timeout=300)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    np.testing.assert_allclose([g["logprobs"] for g in got], [w["logprobs"] for w in want], atol=1e-4)
