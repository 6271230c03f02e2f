"""Data pipeline: packing keeps documents apart (per-document loss equals the document alone), sharding
is independent of the process count, the iterator resumes exactly, chat SFT masks the prompt."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config

from m1_jax import data, train
from m1_jax.config import FULL, LINEAR
from m1_jax.model import init_model
from m1_jax.run_config import DataSection
from m1_jax.tokenizer import ByteTokenizer, END_OF_SENTENCE

T = 32


def test_packed_batch_gives_each_document_its_own_loss():
    cfg = tiny_config(layer_types=[LINEAR, FULL])  # a lightning layer (its state resets) and a softmax layer
    model = init_model(cfg, seed=1)
    g, p = nnx.split(model)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n).astype(np.int32) for n in (10, 7, 12)]
    packed = data.pack_documents([(d, np.ones_like(d)) for d in docs], T, rows=1)
    assert packed["segment_ids"][0].tolist() == [1] * 9 + [2] * 6 + [3] * 11 + [0] * 6
    assert packed["positions"][0, 9:15].tolist() == list(range(6))
    assert packed["loss_mask"][0, 26:].sum() == 0

    @jax.jit
    def ce(p, b):
        logits = nnx.merge(g, p)(b["inputs"], positions=b["positions"], segment_ids=b["segment_ids"])
        return train.token_losses(logits, b["targets"])[0] * b["loss_mask"]

    got = np.asarray(ce(p, {k: jnp.asarray(v) for k, v in packed.items()}))[0]
    seg = packed["segment_ids"][0]
    alone = np.zeros((len(docs), T), np.int32)
    targets = np.zeros_like(alone)
    mask = np.zeros_like(alone)
    for i, d in enumerate(docs):
        alone[i, : d.size - 1], targets[i, : d.size - 1], mask[i, : d.size - 1] = d[:-1], d[1:], 1
    ref = np.asarray(jax.jit(lambda p, b: train.token_losses(nnx.merge(g, p)(b["inputs"]), b["targets"])[0]
                             * b["loss_mask"])(p, {"inputs": alone, "targets": targets, "loss_mask": mask}))
    for i in range(len(docs)):
        np.testing.assert_allclose(got[seg == i + 1].sum(), ref[i].sum(), rtol=1e-5)


def write_docs(root, n=9):
    rng = np.random.default_rng(1)
    for i in range(n):
        (root / f"d{i}.txt").write_text("x" * int(rng.integers(3, 50)) + f" doc {i}\n")
    return root


def section(root, **kw) -> DataSection:
    s = DataSection(source=str(root), seq_len=T, batch_size=4, shuffle=True, seed=3)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_batches_shapes_and_masks(tmp_path):
    b = next(data.Batches(section(write_docs(tmp_path)), vocab_size=512))
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    assert all(v.shape == (4, T) and v.dtype == np.int32 for v in b.values())
    assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    np.testing.assert_array_equal(b["inputs"][:, 1:][same & (b["segment_ids"][:, 1:] > 0)],
                                  b["targets"][:, :-1][same & (b["segment_ids"][:, 1:] > 0)])


def test_iterator_state_resumes_exactly(tmp_path):
    sec = section(write_docs(tmp_path))
    it = data.Batches(sec, vocab_size=512)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # through JSON, as in a checkpoint
    expected = [next(it) for _ in range(3)]
    fresh = data.Batches(sec, vocab_size=512)
    fresh.set_state(state)
    for e in expected:
        got = next(fresh)
        for k in e:
            np.testing.assert_array_equal(got[k], e[k])


def test_batches_depend_on_shards_not_processes(tmp_path):
    sec = section(write_docs(tmp_path), shards=2)
    whole = data.Batches(sec, vocab_size=512)
    hosts = [data.Batches(sec, process_index=i, process_count=2, vocab_size=512) for i in range(2)]
    assert hosts[0].my_shards == [0] and hosts[1].my_shards == [1]
    for _ in range(3):
        w = next(whole)
        parts = [next(h) for h in hosts]
        np.testing.assert_array_equal(w["inputs"], np.concatenate([p["inputs"] for p in parts]))


def test_chat_sft_masks_everything_but_replies(tmp_path):
    tok = ByteTokenizer(512)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask = data.render_chat(messages, tok)
    from m1_jax import chat
    assert tok.decode(ids) == chat.render(messages, add_generation_prompt=False).rstrip("\n")
    spans = tok.decode(ids[mask == 1])
    assert spans == f"hello{END_OF_SENTENCE}4{END_OF_SENTENCE}"
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"text": "plain text"}) + "\n")
    b = next(data.Batches(section(f, shuffle=False, batch_size=1, seq_len=256), vocab_size=512))
    seg, m = b["segment_ids"][0], b["loss_mask"][0]  # the stream repeats: the first two documents
    assert m[seg == 1].sum() == mask[1:].sum() and m[seg == 2].sum() == len("plain text") - 1


def test_pretokenised_and_errors(tmp_path):
    f = tmp_path / "toks.npz"
    np.savez(f, tokens=np.arange(40) * 8, doc_lengths=np.array([15, 25]))
    b = next(data.Batches(section(f, shuffle=False, batch_size=2), vocab_size=512))
    assert b["inputs"][0, :14].tolist() == list(range(0, 112, 8))
    with pytest.raises(data.DataError, match="toks.npz: token id 312 out of range for vocab_size 256"):
        next(data.Batches(section(f, shuffle=False, batch_size=2), vocab_size=256))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:1: expected an object with a 'text'"):
        next(data.Batches(section(bad), vocab_size=512))
    with pytest.raises(data.DataError, match="data.source .*nope.*no such file"):
        data.Batches(section(tmp_path / "nope"), vocab_size=512)


def test_source_with_nothing_to_train_on_fails_at_once(tmp_path):
    # Each would otherwise repeat its empty documents forever, never filling a row.
    for name, text in {"empty.txt": "", "one_char.txt": "x", "empty_texts.jsonl": '{"text": ""}\n' * 3}.items():
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(data.DataError, match=f"data.source '.*{name}': no document has at least 2 tokens"):
            data.Batches(section(f), vocab_size=512)
    np.savez(tmp_path / "ones.npz", tokens=np.arange(3), doc_lengths=np.array([1, 1, 1]))
    with pytest.raises(data.DataError, match="ones.npz': no document has at least 2 tokens"):
        data.Batches(section(tmp_path / "ones.npz"), vocab_size=512)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.txt").write_text("long enough")
    (two / "b.txt").write_text("y")
    with pytest.raises(data.DataError, match="no document in data shard 1 of 2 .*has at least 2 tokens"):
        data.Batches(section(two, shards=2), vocab_size=512)


def test_each_pipeline_reads_token_files_afresh(tmp_path):
    f = tmp_path / "toks.npz"
    np.savez(f, tokens=np.arange(40), doc_lengths=np.array([40]))
    first = next(data.Batches(section(f, shuffle=False, batch_size=1), vocab_size=512))
    np.savez(f, tokens=np.arange(40) + 100, doc_lengths=np.array([40]))  # rewritten between two runs
    second = next(data.Batches(section(f, shuffle=False, batch_size=1), vocab_size=512))
    assert first["inputs"][0, :3].tolist() == [0, 1, 2]
    assert second["inputs"][0, :3].tolist() == [100, 101, 102]


def test_text_windows_are_shuffled_as_documents(tmp_path):
    """``data.window``: text files are cut into windows of that many bytes, each its own document; with
    window = seq_len + 1 every row holds one window, taken from anywhere in the corpus."""
    texts = {f"f{i}.txt": "".join(chr(97 + i) * 7 + "\n" for _ in range(40)) for i in range(5)}  # 320 bytes each
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    files = data.find_files(str(tmp_path))
    docs = data.list_documents(files, "text", window=100)
    assert [(d.offset, d.size) for d in docs if d.path.endswith("f0.txt")] == [(0, 100), (100, 100), (200, 100),
                                                                            (300, 100)]
    tok = ByteTokenizer(512)
    ids, mask = data.load_document(docs[1], "text", tok)
    assert tok.decode(ids.tolist()) == texts["f0.txt"][100:200] and mask.all()
    T = 32
    sec = DataSection(source=str(tmp_path), seq_len=T, batch_size=8, window=T + 1, shuffle=True, seed=1)
    b = next(data.Batches(sec, vocab_size=512))
    assert np.all(b["segment_ids"] == 1)  # one window per row, no packing across windows
    letters = {chr(int(r[0])) if chr(int(r[0])) != "\n" else chr(int(r[1])) for r in b["inputs"]}
    assert len(letters) >= 3  # the rows of one batch come from several files, not one file after another
    whole = next(data.Batches(DataSection(source=str(tmp_path), seq_len=T, batch_size=8, shuffle=True, seed=1),
                              vocab_size=512))
    assert len({chr(int(r[0])) if chr(int(r[0])) != "\n" else chr(int(r[1])) for r in whole["inputs"]}) <= 2


def test_a_named_tokenizer_directory_must_hold_tokenizer_json(tmp_path):
    """``data.tokenizer`` names a directory: without tokenizer.json that is an error, not byte-level tokens."""
    from m1_jax.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer.json there"):
        data.get_tokenizer(str(tmp_path), 512)
    assert isinstance(data.get_tokenizer("byte", 512), ByteTokenizer)
