"""Tokenizers: a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) or a byte-level one.

The byte-level tokenizer serves the tiny models (vocab 512): ids 0..255 are the bytes of the UTF-8
text, M1's special tokens follow at 256.. (:data:`SPECIAL_TOKENS`). Both expose the same small
interface: ``encode(text) -> list[int]`` (special-token strings in the text become their ids),
``decode(ids) -> str``, ``token_to_id(str)``, ``vocab_size``, ``eos_token_id``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# M1's special tokens (tokenizer_config.json of the release; docs/model.md §4), in byte-tokenizer id order.
BEGIN_OF_DOCUMENT = "<begin_of_document>"
BEGIN_OF_SENTENCE = "<beginning_of_sentence>"
END_OF_SENTENCE = "<end_of_sentence>"
END_OF_DOCUMENT = "<end_of_document>"
SPECIAL_TOKENS = (BEGIN_OF_DOCUMENT, BEGIN_OF_SENTENCE, END_OF_SENTENCE, END_OF_DOCUMENT)
# The end of an assistant turn: generation stops here.
EOS_TOKEN = END_OF_SENTENCE


class TokenizerError(ValueError):
    """No usable tokenizer for a checkpoint (the message names the file / directory)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, :data:`SPECIAL_TOKENS` at 256.. (for models with a vocab >= 260)."""

    def __init__(self, vocab_size: int = 512):
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(f"a byte-level tokenizer needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, "
                                 f"got {vocab_size}")
        self.vocab_size = vocab_size
        self.special = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._by_id = {i: t for t, i in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special:
                ids.append(self.special[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out, buf = [], bytearray()
        for i in (int(t) for t in ids):
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special_tokens:
                out.append(self._by_id.get(i, ""))  # ids above the special tokens decode to nothing
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        return self.special.get(token)

    @property
    def eos_token_id(self) -> int:
        return self.special[EOS_TOKEN]


class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions for bad files
            raise TokenizerError(f"{self.path}: cannot read tokenizer: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(EOS_TOKEN)


def load_tokenizer(path: str | os.PathLike | None, vocab_size: int, *, required: bool = False):
    """The tokenizer of a checkpoint directory: its ``tokenizer.json``, else the byte-level tokenizer
    when the model's vocabulary is small enough to be a byte model (<= 1024 ids).

    ``required``: ``path`` was named as a tokenizer (a flag or a config field), so a path without a
    ``tokenizer.json`` is an error rather than a fallback to bytes."""
    if path is not None:
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if required and not f.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json there" if p.is_dir() else f"{path}: no such file")
        if f.is_file():
            tok = HFTokenizer(f)
            if tok.vocab_size > vocab_size:
                raise TokenizerError(f"{f}: tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                                     f"{vocab_size}")
            return tok
    if vocab_size <= 1024:
        return ByteTokenizer(vocab_size)
    raise TokenizerError(f"{path}: no tokenizer.json, and a vocabulary of {vocab_size} is not a byte-level model")


# Control characters but tab and newline: C0, DEL and C1 (Unicode category Cc).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    """``text`` with its control characters other than tab and newline written as ``\\xNN``, so that the
    raw bytes a model emits (a byte-level model may emit any byte, e.g. ESC sequences or a carriage
    return) show as text instead of driving the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class StreamDecoder:
    """Incremental detokenisation: feed ids one at a time, get the new text (complete characters only);
    with ``escape_controls`` control characters come escaped (:func:`escape_controls`).

    Linear in the length: each push decodes only the ids since the last emitted boundary, with the piece
    before it as context (tokenizers whose pieces depend on their left neighbour then decode as the
    whole list would)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, escape_controls: bool = False):
        self.tok, self.skip, self.escape = tokenizer, skip_special_tokens, escape_controls
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already emitted: the context of the next piece
        self._read = 0
        self._before = ""  # the decoded ids[_prefix:_read]

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        now = self._decode(self.ids[self._prefix:])
        if len(now) <= len(self._before) or now.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait
            return ""
        new = now[len(self._before):]
        self._prefix, self._read = self._read, len(self.ids)
        self._before = self._decode(self.ids[self._prefix:self._read])
        return self._emit(new)

    def flush(self) -> str:
        """What is held back (an incomplete character decodes as U+FFFD)."""
        new = self._decode(self.ids[self._prefix:])[len(self._before):]
        self._prefix = self._read = len(self.ids)
        self._before = ""
        return self._emit(new)

    def _emit(self, new: str) -> str:
        return escape_controls(new) if self.escape else new
