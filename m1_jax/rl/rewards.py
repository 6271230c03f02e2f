"""Verifiable rewards: functions ``reward(response, example) -> float`` that score one sampled response.

``response`` is the decoded text the model generated after the generation prompt (its ``<think>`` block,
answer, tool calls, end-of-turn token); ``example`` is the JSONL record of the prompt (``answer``, ``tests``,
``tools``, anything a reward reads). The registry :data:`REWARDS`:

=====================  ===================================================================================
``exact_match``        1 if the final answer equals ``example["answer"]`` (after stripping whitespace)
``normalised_match``   1 if they are equal after :func:`normalise_answer` (case, spacing, ``$``, final period,
                       thousands separators; numbers compared by value: ``1,000`` = ``1000.0``)
``math``               1 if math-verify finds the answer mathematically equal to ``example["answer"]`` (LaTeX,
                       ``\\boxed{}``, fractions, sets, ...; the ``[rl]`` extra: ``pip install 'm1-jax[rl]'``)
``think_format``       1 if the response is exactly one ``<think>...</think>`` followed by a non-empty answer
``tool_calls``         1 if the reply holds one well-formed ``<tool_calls>`` block (:func:`m1_jax.chat.parse_reply`
                       parses every line; with ``example["tools"]``, every call names one of them and gives its
                       required arguments)
``python_tests``       1 if the reply's code passes ``example["tests"]`` in a subprocess with time and memory
                       limits (:mod:`m1_jax.rl.code_runner`; a crash, hang, exception or memory blow-up is 0)
=====================  ===================================================================================

The *final answer* (:func:`final_answer`) is the reply without its reasoning and end-of-turn token: the
content of its last ``\\boxed{...}`` if it has one, else the whole text, stripped. ``example["answer"]``
may be a list of accepted answers. :func:`get_reward` picks a reward by name (with options for the ones that
take them, e.g. ``get_reward("python_tests", timeout_s=2)``) or loads a user's ``module:function``
(:func:`load_reward`).
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib
import importlib.util
import math
import numbers
import re
import reprlib
import threading
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from m1_jax.chat import CALLS_CLOSE, CALLS_OPEN, THINK_CLOSE, THINK_OPEN, parse_reply
from m1_jax.rl.code_runner import run_python
from m1_jax.tokenizer import END_OF_SENTENCE

Reward = Callable[[str, Mapping[str, Any]], float]


class RewardError(ValueError):
    """A reward that cannot be found, loaded or computed (the message names the reward, and the field or
    option at fault)."""


# ----------------------------------------------------------------------------------- the reply's answer
def reply_body(response: str) -> str:
    """The response without its end-of-turn token and its reasoning, split off as
    :func:`m1_jax.chat.parse_reply` does (a ``<think>`` left open runs to the end; a ``</think>`` alone ends
    reasoning that the prompt opened), stripped. Unlike the parsed reply's content it keeps tool-call blocks."""
    text = response.replace(END_OF_SENTENCE, "")
    before, opened, after = text.partition(THINK_OPEN)
    if not opened:
        if THINK_CLOSE not in text:
            return text.strip()
        before, after = "", text
    _, closed, rest = after.partition(THINK_CLOSE)
    return (before + (rest if closed else "")).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    return None


def final_answer(response: str) -> str:
    body = reply_body(response)
    boxed = last_boxed(body)
    return (body if boxed is None else boxed).strip()


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")


def normalise_answer(text: str) -> str:
    """NFKC, case-folded, whitespace runs as one space, surrounding ``$`` and a final period removed,
    thousands separators dropped from a number, and a number written in its canonical decimal form
    (``"1,000.50"`` -> ``"1000.5"``, ``"-0"`` -> ``"0"``)."""
    s = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    s = s.strip("$").strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        value = decimal.Decimal(s)
    except decimal.InvalidOperation:
        return s
    if not value.is_finite():
        return s
    value = value.normalize()
    return "0" if value.is_zero() else format(value, "f")


def _answers(example: Mapping[str, Any], reward: str) -> list[str]:
    if not isinstance(example, Mapping) or "answer" not in example:
        keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise RewardError(f"reward {reward!r} needs the example's 'answer' field; the example has {keys}")
    answer = example["answer"]
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


# ----------------------------------------------------------------------------------- answer rewards
def exact_match(response: str, example: Mapping[str, Any]) -> float:
    got = final_answer(response)
    return float(any(got == a.strip() for a in _answers(example, "exact_match")))


def normalised_match(response: str, example: Mapping[str, Any]) -> float:
    got = normalise_answer(final_answer(response))
    return float(any(got == normalise_answer(a) for a in _answers(example, "normalised_match")))


def _math_verify():
    # math-verify is an optional dependency (the [rl] extra): imported when the maths reward first runs.
    try:
        import math_verify
    except ImportError:
        raise RewardError("reward 'math' needs the math-verify package: pip install 'm1-jax[rl]'") from None
    return math_verify


def math_answer(response: str, example: Mapping[str, Any]) -> float:
    """math-verify's ``verify(parse(answer), parse(reply))``; an answer without ``$`` or ``\\boxed`` is read as
    LaTeX math. Its timeouts use SIGALRM, which works only on the main thread; off it they are off."""
    mv = _math_verify()
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    pred = mv.parse(reply_body(response), parsing_timeout=timeout)
    if not pred:
        return 0.0
    for answer in _answers(example, "math"):
        gold = mv.parse(answer, parsing_timeout=timeout) or mv.parse(f"${answer}$", parsing_timeout=timeout)
        if gold and mv.verify(gold, pred, timeout_seconds=timeout):
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------- format rewards
def think_format(response: str, example: Mapping[str, Any]) -> float:
    """1 for ``<think>reasoning</think>answer`` (whitespace around allowed, answer non-empty), else 0."""
    text = response.replace(END_OF_SENTENCE, "").strip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    return float(bool(text.partition(THINK_CLOSE)[2].strip()))


def _tool_specs(example: Mapping[str, Any]) -> dict[str, set[str]] | None:
    """name -> required argument names, from ``example["tools"]`` (OpenAI tools or bare functions), or None."""
    tools = example.get("tools") if isinstance(example, Mapping) else None
    if tools is None:
        return None
    specs = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise RewardError(f"reward 'tool_calls': example field 'tools'[{i}] has no function name")
        specs[fn["name"]] = set((fn.get("parameters") or {}).get("required", ()))
    return specs


def tool_call_format(response: str, example: Mapping[str, Any]) -> float:
    body = reply_body(response)
    if body.count(CALLS_OPEN) != 1 or body.count(CALLS_CLOSE) != 1:
        return 0.0
    block = body.partition(CALLS_OPEN)[2].partition(CALLS_CLOSE)
    if not block[1]:  # the close tag comes before the open one
        return 0.0
    lines = [line for line in block[0].split("\n") if line.strip()]
    calls = parse_reply(body).tool_calls
    if not lines or len(calls) != len(lines):
        return 0.0
    specs = _tool_specs(example)
    if specs is not None:
        for call in calls:
            if call.name not in specs or not specs[call.name] <= set(call.arguments):
                return 0.0
    return 1.0


# ----------------------------------------------------------------------------------- code
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(response: str) -> str:
    """The last fenced code block (```` ```python ````, ```` ```py ```` or plain ```` ``` ````) of the reply,
    else the whole reply."""
    body = reply_body(response)
    blocks = _FENCE.findall(body)
    return blocks[-1] if blocks else body


@dataclasses.dataclass(frozen=True)
class PythonTests:
    """1 if :func:`extract_code` of the reply passes ``example["tests"]`` (Python source, e.g. asserts, or a
    list of such snippets run one after the other) within ``timeout_s`` seconds of wall time and ``memory_mb``
    of address space, else 0 (:func:`m1_jax.rl.code_runner.run_python`)."""

    timeout_s: float = 5.0
    memory_mb: int = 1024

    def __post_init__(self):
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise RewardError(f"reward 'python_tests': timeout_s must be a number of seconds > 0, "
                              f"got {self.timeout_s!r}")
        if isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, int) or self.memory_mb <= 0:
            raise RewardError(f"reward 'python_tests': memory_mb must be an integer > 0, got {self.memory_mb!r}")

    def __call__(self, response: str, example: Mapping[str, Any]) -> float:
        tests = example.get("tests") if isinstance(example, Mapping) else None
        if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
            tests = "\n".join(tests)
        if not isinstance(tests, str) or not tests.strip():
            raise RewardError("reward 'python_tests' needs the example's 'tests' field: Python source "
                              f"or a list of it, got {reprlib.repr(tests)}")
        result = run_python(extract_code(response), tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return float(result.passed)


# ----------------------------------------------------------------------------------- registry
REWARDS: Mapping[str, Reward] = {
    "exact_match": exact_match,
    "normalised_match": normalised_match,
    "math": math_answer,
    "think_format": think_format,
    "tool_calls": tool_call_format,
    "python_tests": PythonTests(),
}


def get_reward(spec: str, **options) -> Reward:
    """The reward named ``spec`` in :data:`REWARDS` (``options`` set the fields of one that has them, e.g.
    ``python_tests``: ``timeout_s``, ``memory_mb``), or a user's ``module:function`` (:func:`load_reward`)."""
    if spec in REWARDS:
        reward = REWARDS[spec]
        if not options:
            return reward
        fields = [f.name for f in dataclasses.fields(reward)] if dataclasses.is_dataclass(reward) else []
        unknown = sorted(set(options) - set(fields))
        if unknown:
            takes = f"its options: {', '.join(fields)}" if fields else "it takes none"
            raise RewardError(f"reward {spec!r} has no option {', '.join(map(repr, unknown))} ({takes})")
        return dataclasses.replace(reward, **options)
    if ":" in spec:
        if options:
            raise RewardError(f"reward {spec!r}: options are for the built-in rewards, got {sorted(options)}")
        return load_reward(spec)
    raise RewardError(f"unknown reward {spec!r}: choose one of {', '.join(REWARDS)}, or give module:function")


@dataclasses.dataclass(frozen=True)
class UserReward:
    """A user's reward function, called as ``fn(response, example)``; its result must be a finite number."""

    spec: str
    fn: Callable[[str, Mapping[str, Any]], Any]

    def __call__(self, response: str, example: Mapping[str, Any]) -> float:
        try:
            value = self.fn(response, example)
        except Exception as e:
            raise RewardError(f"reward {self.spec!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward {self.spec!r} returned {value!r}; a reward must be a finite number")
        return float(value)


def _import(spec: str, module: str):
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise FileNotFoundError(f"no file {module}")
            loader_spec = importlib.util.spec_from_file_location(f"m1_user_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
            return mod
        return importlib.import_module(module)
    except Exception as e:  # anything the module raises while it is imported
        raise RewardError(f"reward {spec!r}: cannot import {module!r} ({type(e).__name__}: {e})") from e


def load_reward(spec: str) -> UserReward:
    """A user's reward from ``"package.module:function"`` (imported from ``sys.path``) or
    ``"path/to/file.py:function"``; ``function`` may be dotted (``module:Class.method``). Raises
    :class:`RewardError` naming ``spec`` when the module cannot be imported, lacks the name, or the name is
    not callable."""
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise RewardError(f"reward {spec!r} must be 'module:function' or 'path/to/file.py:function'")
    obj = _import(spec, module)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec!r}: {module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec!r}: {name!r} is a {type(obj).__name__}, not a function")
    return UserReward(spec, obj)
