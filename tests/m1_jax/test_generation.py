"""Prefill + decode + sampling against the original code's cached generation (tests/data/golden/caseA)."""

import jax
import numpy as np
import pytest
from trace_counter import count_traces

import m1_jax
from m1_jax.cache import CacheError
from m1_jax.generation import decode_step, prefill, stream

ATOL = 1e-4  # fp32 logits


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {"in": np.load(golden_dir / "inputs.npz"), "out": np.load(golden_dir / "outputs.npz")}


@pytest.fixture(scope="module")
def model(golden_dir):
    return m1_jax.from_pretrained(golden_dir)


def test_greedy_matches_original(model, golden):
    out = golden["out"]
    r = m1_jax.generate(model, golden["in"]["prompt_ids"], max_new_tokens=8, return_logits=True,
                        return_logprobs=True, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(r.tokens), out["greedy_tokens"])
    assert r.tokens.dtype == np.int32
    np.testing.assert_allclose(np.asarray(r.logits).transpose(1, 0, 2), out["greedy_step_logits"], rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(r.num_tokens), [8, 8])
    want = jax.nn.log_softmax(out["greedy_step_logits"], axis=-1).transpose(1, 0, 2)
    want = np.take_along_axis(np.asarray(want), out["greedy_tokens"][..., None], axis=2)[..., 0]
    np.testing.assert_allclose(np.asarray(r.logprobs), want, rtol=0, atol=ATOL)


def test_teacher_forced_decode(model, golden):
    ids, want = golden["in"]["input_ids"], golden["out"]["teacher_forced_decode_logits"]
    cache, logits = prefill(model, golden["in"]["prompt_ids"], max_len=64, chunk_size=8)
    got = [logits]
    for j in range(want.shape[1] - 1):
        cache, logits = decode_step(model, cache, ids[:, 21 + j])
        got.append(logits)
    np.testing.assert_allclose(np.stack(got, 1), want, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [37, 37])


def test_batch_of_different_lengths_equals_single_rows(model, golden):
    ids = golden["in"]["input_ids"]
    prompts = [ids[0, :21].tolist(), ids[1, :13].tolist()]
    batch = m1_jax.generate(model, prompts, max_new_tokens=6, return_logits=True, chunk_size=8)
    for b, p in enumerate(prompts):
        alone = m1_jax.generate(model, [p], max_new_tokens=6, return_logits=True, chunk_size=8)
        np.testing.assert_array_equal(np.asarray(batch.tokens[b]), np.asarray(alone.tokens[0]))
        np.testing.assert_allclose(np.asarray(batch.logits[b]), np.asarray(alone.logits[0]), rtol=0, atol=ATOL)
    # the same batch given as a right-padded array with per-row lengths
    padded = np.zeros((2, 21), np.int32)
    padded[0], padded[1, :13] = prompts[0], prompts[1]
    again = m1_jax.generate(model, padded, lengths=[21, 13], max_new_tokens=6, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(batch.tokens))


def test_chunked_prefill_equals_single_prefill(model, golden):
    ids = golden["in"]["input_ids"]
    whole, lw = prefill(model, ids, lengths=[37, 30], max_len=64)
    chunked, lc = prefill(model, ids, lengths=[37, 30], max_len=64, chunk_size=8)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lw), rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(chunked.lengths), [37, 30])
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    # and both equal the original's full forward at each row's last token
    full = golden["out"]["logits"]
    np.testing.assert_allclose(np.asarray(lw), full[[0, 1], [36, 29]], rtol=0, atol=ATOL)


def test_multi_turn_continuation_equals_one_prefill(model, golden):
    ids = golden["in"]["input_ids"]
    one, l_one = prefill(model, ids[:, :29], max_len=64, chunk_size=8)
    first, _ = prefill(model, [ids[0, :11].tolist(), ids[1, :20].tolist()], max_len=64, chunk_size=8)
    second, l_two = prefill(model, [ids[0, 11:29].tolist(), ids[1, 20:29].tolist()], cache=first, chunk_size=8)
    np.testing.assert_allclose(np.asarray(l_two), np.asarray(l_one), rtol=0, atol=ATOL)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    # generation continues from a cache: same tokens as generating after one prefill
    cont = m1_jax.generate(model, [ids[0, 11:21].tolist(), ids[1, 20:21].tolist()],
                           cache=prefill(model, [ids[0, :11].tolist(), ids[1, :20].tolist()], max_len=64,
                                             chunk_size=8)[0], max_new_tokens=8, return_cache=True)
    np.testing.assert_array_equal(np.asarray(cont.tokens), golden["out"]["greedy_tokens"])
    np.testing.assert_array_equal(np.asarray(cont.cache.lengths), [28, 28])  # the last token is not fed


def test_no_retrace_per_token(model, golden):
    prompts = golden["in"]["prompt_ids"]
    tokens = m1_jax.generate(model, prompts, max_new_tokens=3, chunk_size=8)  # plain call: just the tokens
    np.testing.assert_array_equal(np.asarray(tokens), golden["out"]["greedy_tokens"][:, :3])
    def compiled(counter):  # traces of the generation's own compiled functions
        return {k: v for k, v in counter.items() if k in ("_feed_jit", "_generate_loop", "_sample_jit")}

    with count_traces() as traces:  # the counter sees a trace
        jax.jit(lambda x: x + 1)(np.float32(1))
    assert traces["<lambda>"] == 1
    with count_traces() as traces:
        for n in (2, 5, 7, 11):
            m1_jax.generate(model, prompts, max_new_tokens=n, temperature=0.0, chunk_size=8)
        m1_jax.generate(model, prompts, max_new_tokens=4, eos_token_id=[3, 4], stop=[[5, 6]], chunk_size=8)
    assert compiled(traces) == {}, "generating a different number of tokens (or other stop ids) retraced"
    # sampling knobs are traced values: changing them compiles once for sampling, then never again
    m1_jax.generate(model, prompts, max_new_tokens=4, temperature=0.7, top_k=5, seed=1, chunk_size=8)
    with count_traces() as traces:
        m1_jax.generate(model, prompts, max_new_tokens=6, temperature=1.3, top_p=0.5, seed=2, chunk_size=8)
    assert compiled(traces) == {}
    with count_traces() as traces:  # and it would see a retrace of the decode loop
        m1_jax.generate(model, prompts, max_new_tokens=40, chunk_size=8)  # a larger token buffer
    assert compiled(traces) == {"_generate_loop": 1}


def test_rows_stop_independently_at_eos(model, golden):
    greedy = golden["out"]["greedy_tokens"]
    eos = int(greedy[0, 2])
    assert eos not in greedy[1].tolist()
    r = m1_jax.generate(model, golden["in"]["prompt_ids"], max_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                        return_cache=True, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(r.tokens[0]), list(greedy[0, :3]) + [0] * 5)
    np.testing.assert_array_equal(np.asarray(r.tokens[1]), greedy[1])
    np.testing.assert_array_equal(np.asarray(r.num_tokens), [3, 8])
    np.testing.assert_array_equal(np.asarray(r.cache.lengths), [21 + 2, 21 + 7])
    # a two-token stop sequence
    seq = [int(greedy[1, 3]), int(greedy[1, 4])]
    r = m1_jax.generate(model, golden["in"]["prompt_ids"], max_new_tokens=8, stop=[seq], return_logprobs=True,
                        chunk_size=8)
    np.testing.assert_array_equal(np.asarray(r.num_tokens), [8, 5])


def test_sampling(model, golden):
    prompts = golden["in"]["prompt_ids"]
    kw = dict(max_new_tokens=8, temperature=1.0, chunk_size=8)
    a = m1_jax.generate(model, prompts, seed=3, **kw)
    b = m1_jax.generate(model, prompts, seed=3, **kw)
    c = m1_jax.generate(model, prompts, seed=4, **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    greedy = golden["out"]["greedy_tokens"]
    kw = dict(max_new_tokens=8, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(m1_jax.generate(model, prompts, temperature=2.0, top_k=1, **kw)), greedy)
    np.testing.assert_array_equal(np.asarray(m1_jax.generate(model, prompts, temperature=0.5, top_p=1e-6, **kw)),
                                  greedy)


def test_stream_yields_greedy_tokens(model, golden):
    ids = golden["in"]["prompt_ids"][0].tolist()
    toks = [t for t, _ in stream(model, ids, max_new_tokens=8, chunk_size=8)]
    assert toks == golden["out"]["greedy_tokens"][0].tolist()
    eos = toks[2]
    assert [t for t, _ in stream(model, ids, max_new_tokens=8, eos_token_id=eos, chunk_size=8)] == toks[:3]
    with pytest.raises(ValueError, match="stream takes one prompt, got 2"):
        next(stream(model, [ids, ids], max_new_tokens=2))


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_ids=[[1, 2, 512]]), "outside the vocabulary"),
    (dict(prompt_ids=[[1, -1]]), "outside the vocabulary"),
    (dict(prompt_ids=[[1, 2], []]), "empty prompt"),
    (dict(prompt_ids=[[1, 2]], temperature=-0.1), "temperature"),
    (dict(prompt_ids=[[1, 2]], temperature=1.0, top_p=0.0), "top_p"),
    (dict(prompt_ids=[[1, 2]], temperature=1.0, top_p=1.5), "top_p"),
    (dict(prompt_ids=[[1, 2]], temperature=1.0, top_k=-2), "top_k"),
    (dict(prompt_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[[1.5, 2.0]]), r"prompt_ids\[0\] must hold integer token ids, got float64"),
    (dict(prompt_ids=np.array([[1.5, 2.0]])), "prompt_ids must hold integer token ids"),
    (dict(prompt_ids=[[True, False]]), "integer token ids, got bool"),
    (dict(prompt_ids=[[[1, 2]]]), r"prompt_ids\[0\] must be a flat list of token ids, got shape \[1, 2\]"),
    (dict(prompt_ids=[[1, 2]], seed=2 ** 70), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(prompt_ids=[[1, 2]], seed=-1), "seed must be"),
    (dict(prompt_ids=[[1, 2]], max_new_tokens=100_000_000), "max_new_tokens=100000000 after a prompt of 2 tokens "
                                                            "exceeds the model's max_position_embeddings="),
])
def test_bad_input_errors(model, kw, match):
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(ValueError, match=match):
        m1_jax.generate(model, kw.pop("prompt_ids"), **kw)


def test_prompt_longer_than_cache(model):
    cache = m1_jax.init_cache(model.cfg, 1, 16)
    with pytest.raises(CacheError, match="does not fit the cache of 16 tokens"):
        prefill(model, [list(range(17))], cache=cache)
    with pytest.raises(CacheError, match="room for"):
        m1_jax.generate(model, [list(range(10))], cache=cache, max_new_tokens=8)


def test_generation_on_a_mesh(golden_dir, golden):
    sharded = m1_jax.from_pretrained(golden_dir, mesh="data=2,tensor=4")
    r = m1_jax.generate(sharded, golden["in"]["prompt_ids"], max_new_tokens=8, return_logits=True, chunk_size=8,
                        return_cache=True)
    np.testing.assert_array_equal(np.asarray(r.tokens), golden["out"]["greedy_tokens"])
    np.testing.assert_allclose(np.asarray(r.logits).transpose(1, 0, 2), golden["out"]["greedy_step_logits"],
                               rtol=0, atol=ATOL)
    assert r.cache.lightning.sharding.spec[2:4] == ("data", "tensor")  # batch and heads split like the model
    assert r.cache.keys.sharding.spec[2] == "data"


def test_decode_step_never_copies_a_layers_kv_cache():
    """The compiled decode step writes and reads each softmax layer's keys and values in place in the stacked
    cache: no intermediate holds a whole layer's [batch, max_len, kv_heads, head_dim] (slicing it out of the
    stack and back copied the full cache at every token)."""
    import re

    import jax.numpy as jnp
    from flax import nnx

    from m1_jax.cache import init_cache
    from m1_jax.generation import _feed_jit
    from tiny_models import tiny_config

    cfg = tiny_config(layer_types=["linear_attention", "full_attention"] * 2, num_key_value_heads=2)
    model = m1_jax.init_model(cfg, seed=0)
    B, S = 2, 1024
    cache = init_cache(cfg, B, S)
    graphdef, params = nnx.split(model)
    hlo = _feed_jit.lower(graphdef, params, cache, jnp.zeros((B, 1), jnp.int32),
                          jnp.ones((B,), jnp.int32)).compile().as_text()
    layer_kv = (B, S, cfg.num_key_value_heads, cfg.head_dim)
    shapes = {tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"f32\[([0-9,]+)\]", hlo)}
    squeezed = {tuple(d for d in s if d != 1) for s in shapes}
    assert cache.keys.shape in shapes  # the stacked cache itself is there
    assert tuple(d for d in layer_kv if d != 1) not in squeezed, "a whole layer's KV cache is materialised"
