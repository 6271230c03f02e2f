"""Training data: documents -> token ids -> next-token examples packed to the training length (grain).

Sources (``DataSection.source``/``format``):

* ``stdlib``: the Python standard library's own ``*.py`` files (present on every install);
* text files (a file, a directory searched recursively, or a glob), one document per file;
* JSONL, one document per line: ``{"text": ...}``, or ``{"messages": [...]}`` rendered with the M1 chat
  template (:mod:`m1_jax.chat`) with everything but the assistant's replies masked out of the loss;
* pre-tokenised ``.npz`` with ``tokens`` (1-D) and ``doc_lengths`` (optional ``loss_mask``), or ``.npy``
  (one token stream).

Each document becomes ``inputs = ids[:-1]``, ``targets = ids[1:]`` (so no target crosses a document),
then grain's concat-then-split packing fills rows of ``seq_len`` with ``segment_ids`` (1, 2, ... per
document piece, 0 = padding) and ``positions`` restarting per piece: lightning states reset and softmax
attention stays within a document.

Sharding: the documents are split into ``shards`` interleaved shards (default one per process); the
global batch is the concatenation of one equal slice per shard, in shard order, and each process reads
only the shards it owns. The batches seen are therefore a function of the shard count, not of how many
processes read them. The iterator state (one grain state per shard) is JSON and goes in checkpoints.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from m1_jax import chat
from m1_jax import tokenizer as tok
from m1_jax.chat import ChatError
from m1_jax.run_config import DataSection

FORMATS = ("auto", "text", "jsonl", "tokens")
FEATURES = ("inputs", "targets", "loss_mask")


class DataError(ValueError):
    """A data source that cannot be read; the message names the file (and line or key)."""


# ----------------------------------------------------------------------------------- tokenisers
def get_tokenizer(spec: str, vocab_size: int):
    """``"byte"`` -> the byte-level tokenizer; a checkpoint directory / tokenizer.json -> its tokenizer."""
    if spec == "byte":
        return tok.ByteTokenizer(vocab_size)
    return tok.load_tokenizer(spec, vocab_size, required=True)


# ----------------------------------------------------------------------------------- documents
def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    return sorted(f for f in files if "site-packages" not in f and "dist-packages" not in f)


def find_files(source: str) -> list[str]:
    if source == "stdlib":
        return stdlib_files()
    if os.path.isdir(source):
        files = [f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(f)]
    elif os.path.isfile(source):
        files = [source]
    else:
        files = [f for f in glob.glob(source, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"data.source {source!r}: no such file, directory or matching files")
    return sorted(files)


def detect_format(files: Sequence[str], fmt: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"data.format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if exts <= {".jsonl"}:
        return "jsonl"
    if exts <= {".npz", ".npy"}:
        return "tokens"
    return "text"


@dataclass(frozen=True)
class Doc:
    """A reference to one document: a whole file, a window of a text file, one JSONL line, or one slice of
    a token file."""
    path: str
    index: int = -1  # line number (jsonl) or document number (tokens); -1: the whole file
    offset: int = -1  # jsonl: byte offset of the line; text windows: byte offset of the window
    size: int = -1  # text windows: bytes in the window


class TokenFiles:
    """The pre-tokenised files one pipeline reads, each loaded once: path -> (document start offsets,
    lengths, tokens, loss mask or None). Owned by its :class:`Batches` and freed with it, so a file
    rewritten between two pipelines is read afresh."""

    def __init__(self):
        self._files: dict[str, tuple] = {}

    def __call__(self, path: str) -> tuple:
        if path not in self._files:
            self._files[path] = _read_token_file(path)
        return self._files[path]


def list_documents(files: Sequence[str], fmt: str, token_files: TokenFiles | None = None,
                   window: int = 0) -> list[Doc]:
    """The documents of ``files``; with ``window`` > 0 a text file is cut into windows of that many bytes,
    each a document of its own (the units that are shuffled)."""
    if fmt == "text":
        if window <= 0:
            return [Doc(f) for f in files]
        return [Doc(f, offset=o, size=window) for f in files for o in range(0, os.path.getsize(f), window)]
    token_files = token_files or TokenFiles()
    docs = []
    for f in files:
        if fmt == "jsonl":
            with open(f, "rb") as fh:
                offset = 0
                for i, line in enumerate(fh):
                    if line.strip():
                        docs.append(Doc(f, i, offset))
                    offset += len(line)
        else:
            docs += [Doc(f, i) for i in range(len(token_files(f)[0]))]
    return docs


def _read_token_file(path: str) -> tuple:
    """(document start offsets, lengths, tokens, loss mask or None) of a pre-tokenised file."""
    try:
        data = np.load(path, mmap_mode="r") if path.endswith(".npy") else np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read token array ({e})") from None
    if isinstance(data, np.ndarray):
        tokens, lengths, mask = data.reshape(-1), np.array([data.size]), None
    else:
        if "tokens" not in data:
            raise DataError(f"{path}: missing array 'tokens' (has: {', '.join(data.files)})")
        tokens = data["tokens"].reshape(-1)
        lengths = data["doc_lengths"] if "doc_lengths" in data else np.array([tokens.size])
        mask = data["loss_mask"].reshape(-1) if "loss_mask" in data else None
        if int(np.sum(lengths)) != tokens.size:
            raise DataError(f"{path}: doc_lengths sum to {int(np.sum(lengths))} but 'tokens' has {tokens.size}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: 'tokens' must be integers, got {tokens.dtype}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return starts, np.asarray(lengths), tokens, mask


def render_chat(messages, tokenizer, tools=None) -> tuple[np.ndarray, np.ndarray]:
    """A conversation in the M1 chat template (:func:`m1_jax.chat.render`) -> (ids, loss mask).

    The loss covers each assistant reply (its text, tool calls and closing end-of-sentence token);
    everything else (system, user and tool turns, the ``ai name=assistant`` headers) is masked. Pieces
    are tokenised separately at turn boundaries, which start with special tokens."""
    messages = list(messages)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ValueError("no assistant message to train on")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # text already tokenised
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = chat.render(messages[:i], tools, add_generation_prompt=True)
        full = chat.render(messages[:i + 1], tools, add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"messages[{i}]: the template does not render this conversation incrementally")
        piece = tokenizer.encode(prompt[len(done):])
        ids += piece
        mask += [0] * len(piece)
        reply = full[len(prompt):]
        if reply.endswith("\n"):  # after the end-of-sentence token: not predicted
            reply = reply[:-1]
        piece = tokenizer.encode(reply)
        ids += piece
        mask += [1] * len(piece)
        done = prompt + reply
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def render_messages(record: dict, tokenizer, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        return render_chat(record["messages"], tokenizer, record.get("tools"))
    except (ChatError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: 'messages': {e}") from None


def load_document(doc: Doc, fmt: str, tokenizer,
                  token_files: TokenFiles | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32, loss mask int32) of one document."""
    if fmt == "tokens":
        starts, lengths, tokens, mask = (token_files or TokenFiles())(doc.path)
        s, n = int(starts[doc.index]), int(lengths[doc.index])
        ids = np.asarray(tokens[s:s + n], np.int32)
        return ids, (np.ones_like(ids) if mask is None else np.asarray(mask[s:s + n], np.int32))
    if fmt == "text":
        with open(doc.path, "rb") as f:
            if doc.size >= 0:
                f.seek(doc.offset)
            data = f.read(doc.size)
        # a window may cut a character in two at either end: those bytes are dropped, not replaced
        text = data.decode("utf-8", errors="ignore" if doc.size >= 0 else "replace")
        ids = np.asarray(tokenizer.encode(text), np.int32)
        return ids, np.ones_like(ids)
    where = f"{doc.path}:{doc.index + 1}"
    with open(doc.path, "rb") as f:
        if doc.offset >= 0:
            f.seek(doc.offset)
            line = f.readline()
        else:
            for i, line in enumerate(f):
                if i == doc.index:
                    break
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if isinstance(record, dict) and "messages" in record:
        return render_messages(record, tokenizer, where)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        ids = np.asarray(tokenizer.encode(record["text"]), np.int32)
        return ids, np.ones_like(ids)
    raise DataError(f"{where}: expected an object with a 'text' string or a 'messages' list")


def to_example(ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """One document -> next-token features (``targets[i] = ids[i + 1]``)."""
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


# ----------------------------------------------------------------------------------- packing
def pack(examples, seq_len: int):
    """A grain IterDataset of examples -> rows of ``seq_len`` with ``segment_ids`` and ``positions``."""
    import grain.experimental as ge

    packed = ge.ConcatThenSplitIterDataset(examples, length_struct={k: seq_len for k in FEATURES})
    return packed.map(_finish_row)


def _finish_row(row: dict) -> dict[str, np.ndarray]:
    return {"inputs": row["inputs"], "targets": row["targets"],
            "loss_mask": row["loss_mask"] * (row["inputs_segment_ids"] > 0),
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def pack_documents(docs: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, rows: int) -> dict:
    """Packs the given (ids, mask) documents, in order, into ``rows`` rows (for tests and tools)."""
    import grain

    ds = grain.MapDataset.source(list(docs)).map(lambda d: to_example(*d)).to_iter_dataset()
    it = iter(pack(ds, seq_len).batch(rows))
    return next(it)


# ----------------------------------------------------------------------------------- the pipeline
class Batches:
    """This process's part of every global batch, resumable: ``next(batches)`` -> dict of int32
    ``[rows_per_process, seq_len]`` arrays; :meth:`get_state` / :meth:`set_state` for checkpoints."""

    def __init__(self, cfg: DataSection, *, process_index: int = 0, process_count: int = 1,
                 tokenizer=None, vocab_size: int | None = None):
        import grain

        shards = cfg.shards or process_count
        if shards % process_count:
            raise DataError(f"data.shards={shards} is not divisible by the {process_count} processes")
        if cfg.batch_size % shards:
            raise DataError(f"data.batch_size={cfg.batch_size} is not divisible by data.shards={shards}")
        if cfg.seq_len < 2:
            raise DataError(f"data.seq_len={cfg.seq_len}: must be at least 2")
        files = find_files(cfg.source)
        fmt = detect_format(files, cfg.format)
        if cfg.max_files:
            files = files[: cfg.max_files]
        self.format = fmt
        if tokenizer is None and fmt != "tokens":
            tokenizer = get_tokenizer(cfg.tokenizer, vocab_size or 512)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.token_files = TokenFiles()
        docs = list_documents(files, fmt, self.token_files, window=cfg.window)
        if len(docs) < shards:
            raise DataError(f"data.source {cfg.source!r}: {len(docs)} documents cannot fill data.shards={shards}")
        self.num_documents = len(docs)
        self.shards = shards
        per_process = shards // process_count
        self.my_shards = list(range(process_index * per_process, (process_index + 1) * per_process))
        self.rows_per_shard = cfg.batch_size // shards
        self._iters = []
        for s in self.my_shards:
            if not self._any_trainable(docs[s::shards]):
                where = "" if shards == 1 else f" in data shard {s} of {shards} (use fewer data.shards)"
                raise DataError(f"data.source {cfg.source!r}: no document{where} has at least 2 tokens "
                                f"({len(docs[s::shards])} documents, format {fmt}); nothing to train on")
            ds = grain.MapDataset.source(docs)[s::shards]
            if cfg.shuffle:
                ds = ds.shuffle(seed=cfg.seed + s)
            ds = ds.repeat(None).map(self._example).to_iter_dataset()
            self._iters.append(iter(pack(ds, cfg.seq_len).batch(self.rows_per_shard)))

    def _any_trainable(self, docs: Sequence[Doc]) -> bool:
        """Whether a document of ``docs`` has a target to predict (at least 2 tokens): without one the
        repeating stream would never fill a row. Reads documents until the first such one."""
        if self.format == "tokens":
            return any(self.token_files(d.path)[1][d.index] >= 2 for d in docs)
        return any(load_document(d, self.format, self.tokenizer)[0].size >= 2 for d in docs)

    def _example(self, doc: Doc) -> dict[str, np.ndarray]:
        ids, mask = load_document(doc, self.format, self.tokenizer, self.token_files)
        if self.vocab_size is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"{doc.path}: token id {int(ids.max())} out of range for vocab_size {self.vocab_size}")
        if ids.size < 2:  # nothing to predict: an empty pair keeps the stream going
            ids, mask = np.zeros((1,), np.int32), np.zeros((1,), np.int32)
        return to_example(ids, mask)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iters]
        return {k: np.concatenate([p[k] for p in parts]).astype(np.int32) for k in parts[0]}

    def get_state(self) -> dict:
        return {"shards": self.shards, "iterators": {str(s): _jsonable(it.get_state())
                                                     for s, it in zip(self.my_shards, self._iters)}}

    def set_state(self, state: dict, where: str = "checkpoint") -> None:
        if state.get("shards") != self.shards:
            raise DataError(f"{where}: data iterator was saved with data.shards={state.get('shards')}, "
                            f"this run has {self.shards}; set --set data.shards={state.get('shards')}")
        for s, it in zip(self.my_shards, self._iters):
            it.set_state(_from_json(state["iterators"][str(s)]))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return {"__tuple__": [_jsonable(v) for v in x]} if isinstance(x, tuple) else [_jsonable(v) for v in x]
    if isinstance(x, bytes):
        return {"__bytes__": x.hex()}
    if isinstance(x, np.integer):
        return int(x)
    return x


def _from_json(x):
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if set(x) == {"__bytes__"}:
            return bytes.fromhex(x["__bytes__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def make_batches(cfg: DataSection, *, vocab_size: int | None = None, tokenizer=None) -> Batches:
    import jax

    return Batches(cfg, process_index=jax.process_index(), process_count=jax.process_count(),
                   tokenizer=tokenizer, vocab_size=vocab_size)

