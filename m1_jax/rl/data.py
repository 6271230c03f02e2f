"""Prompts for ``m1 rl``: records from a JSONL file or a generated task, rendered with M1's chat template.

A record is a JSON object with ``prompt`` (a string: one user turn) or ``messages`` (a chat, ending where the
model answers), optionally ``tools`` (rendered as the template does), plus whatever the reward reads
(``answer``, ``tests``, ...). :class:`PromptStream` walks the records in shuffled epochs and can be saved and
resumed at its position (:meth:`PromptStream.get_state`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from m1_jax import chat
from m1_jax.rl.tasks import HELD_OUT_RESERVED, TASK_PREFIX, get_task


class PromptError(ValueError):
    """A prompt record that cannot be used; the message names the file and line (or the task and index)."""


def render_prompt(record: Mapping, tokenizer, *, system: str = "", where: str = "record") -> list[int]:
    """The token ids of ``record``'s conversation in M1's chat template, ending with the assistant's header."""
    if not isinstance(record, Mapping):
        raise PromptError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("messages"), list):
        messages = list(record["messages"])
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise PromptError(f"{where}: expected a 'prompt' string or a 'messages' list")
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    try:
        text = chat.render(messages, record.get("tools"), add_generation_prompt=True)
    except (chat.ChatError, TypeError, ValueError, AttributeError) as e:
        raise PromptError(f"{where}: 'messages': {e}") from None
    return list(tokenizer.encode(text))


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSONL file (blank lines skipped); errors name ``path:line``."""
    records = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PromptError(f"{path}: cannot read prompts ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise PromptError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            records.append(dict(record, _where=f"{path}:{n}"))
    if not records:
        raise PromptError(f"{path}: holds no prompt records")
    return records


class Records:
    """Indexable records of a source: a JSONL file (all of it) or ``task:NAME`` (``size`` records of
    ``split``); each record carries ``_where`` (file:line or task/index) for error messages."""

    def __init__(self, source: str, *, split: str = "train", size: int | None = None, seed: int = 0):
        self.source = source
        if source.startswith(TASK_PREFIX):
            self.task = get_task(source)
            self.split, self.seed = split, seed
            if split == "eval" and size is not None and size > HELD_OUT_RESERVED:
                raise PromptError(f"{source}: at most {HELD_OUT_RESERVED} held-out records, asked for {size}")
            self._records = None
            self._size = size
        else:
            self.task = None
            self._records = read_jsonl(source)
            self._size = len(self._records) if size is None else min(size, len(self._records))

    def __len__(self) -> int:
        if self._size is None:
            raise TypeError(f"{self.source}: a generated task has no end")
        return self._size

    @property
    def unbounded(self) -> bool:
        return self._size is None

    def __getitem__(self, i: int) -> dict:
        if self.task is not None:
            return dict(self.task.record(self.seed, self.split, i), _where=f"{self.source} {self.split} #{i}")
        return self._records[i]


class PromptStream:
    """Batches of ``(record, prompt ids)`` from ``records`` in epochs (shuffled per epoch with ``seed`` when
    ``shuffle``); a generated task is one endless epoch. Prompts longer than ``max_tokens`` are an error."""

    def __init__(self, records: Records, tokenizer, *, shuffle: bool = True, seed: int = 0, system: str = "",
                 max_tokens: int | None = None):
        self.records, self.tokenizer = records, tokenizer
        self.shuffle, self.seed, self.system, self.max_tokens = shuffle, seed, system, max_tokens
        self.epoch, self.position = 0, 0
        self._order = None

    def _index(self, position: int) -> int:
        if self.records.unbounded:
            return position
        if self._order is None:
            n = len(self.records)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
        return int(self._order[position])

    def next(self) -> tuple[dict, list[int]]:
        if not self.records.unbounded and self.position >= len(self.records):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        record = self.records[self._index(self.position)]
        self.position += 1
        return record, self.encode(record)

    def batch(self, n: int) -> list[tuple[dict, list[int]]]:
        return [self.next() for _ in range(n)]

    def encode(self, record: Mapping) -> list[int]:
        where = record.get("_where", "record")
        ids = render_prompt(record, self.tokenizer, system=self.system, where=where)
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise PromptError(f"{where}: the prompt has {len(ids)} tokens, more than rollout.max_prompt_tokens="
                              f"{self.max_tokens}")
        return ids

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: Mapping, where: str = "checkpoint") -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise PromptError(f"{where}: no prompt position in the checkpoint's data state") from None
        self.epoch, self.position, self._order = epoch, position, None


def reward_view(record: Mapping) -> dict:
    """The record as a reward sees it (without the stream's bookkeeping)."""
    return {k: v for k, v in record.items() if k != "_where"}


def encode_all(records: Sequence[Mapping], tokenizer, system: str = "") -> list[list[int]]:
    return [render_prompt(r, tokenizer, system=system, where=r.get("_where", "record")) for r in records]
