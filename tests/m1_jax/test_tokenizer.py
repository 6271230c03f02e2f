"""Byte-level and tokenizer.json tokenizers."""

import json

import pytest

from m1_jax.tokenizer import (SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, StreamDecoder, TokenizerError,
                              escape_controls, load_tokenizer)


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer(512)
    text = "<begin_of_document><beginning_of_sentence>user name=user\nhé ✓<end_of_sentence>\n"
    ids = tok.encode(text)
    assert ids[:2] == [256, 257] and tok.eos_token_id == 258 == ids[-2]
    assert all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user name=user\nhé ✓\n"
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [256, 257, 258, 259]
    assert tok.decode([300, 104, 105]) == "hi"  # unused ids above the specials decode to nothing
    with pytest.raises(TokenizerError, match="vocab_size >= 260"):
        ByteTokenizer(256)


def test_stream_decoder_waits_for_whole_characters():
    tok = ByteTokenizer(512)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in "a✓b".encode()]
    assert pieces == ["a", "", "", "✓", "b"]
    assert dec.flush() == ""


def test_control_characters_come_escaped():
    """A byte-level model may emit any byte: ESC sequences, carriage returns, NUL must not reach a terminal raw."""
    assert escape_controls("a\x1b[2Jb\rc\x00\x7f\x85") == "a\\x1b[2Jb\\x0dc\\x00\\x7f\\x85"
    assert escape_controls("tab\tnewline\nhé ✓<end_of_sentence>") == "tab\tnewline\nhé ✓<end_of_sentence>"
    ids = list(b"\x1b[31mred\r\n\xe2\x9c\x93\x07")
    raw, escaped = StreamDecoder(ByteTokenizer(512)), StreamDecoder(ByteTokenizer(512), escape_controls=True)
    assert "".join(raw.push(i) for i in ids) + raw.flush() == "\x1b[31mred\r\n✓\x07"
    assert "".join(escaped.push(i) for i in ids) + escaped.flush() == "\\x1b[31mred\\x0d\n✓\\x07"


def test_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers not installed")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "hello": 1, "world": 2, "<end_of_sentence>": 3}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<end_of_sentence>"])
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, vocab_size=8)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world<end_of_sentence>") == [1, 2, 3]
    assert tok.eos_token_id == 3
    with pytest.raises(TokenizerError, match="vocab_size is 2"):
        load_tokenizer(tmp_path, vocab_size=2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "bad", vocab_size=8)


def test_fallbacks(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=512), ByteTokenizer)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, vocab_size=200064)
