"""The verifiable rewards, the registry and the loader of a user's module:function."""

import json
import time

import pytest

from m1_jax.rl.rewards import (
    REWARDS,
    PythonTests,
    RewardError,
    exact_match,
    extract_code,
    final_answer,
    get_reward,
    load_reward,
    math_answer,
    normalise_answer,
    normalised_match,
    think_format,
    tool_call_format,
)
from m1_jax.tokenizer import END_OF_SENTENCE as EOS


def reply(answer, reasoning="let me think"):
    return f"<think>{reasoning}</think>\n{answer}{EOS}"


# ----------------------------------------------------------------------------------- answers
def test_final_answer():
    assert final_answer(reply("42")) == "42"
    assert final_answer(reply(r"so the answer is \boxed{\frac{1}{2}} and \boxed{x^{2}}.")) == "x^{2}"
    assert final_answer(reply(r"\boxed{7} then \boxed{oops")) == "7"      # an unclosed box is skipped
    assert final_answer("<think>never closed 42") == ""                     # truncated in the reasoning
    assert final_answer("reasoning the prompt opened</think> 5") == "5"


def test_exact_match():
    ex = {"answer": "42"}
    assert exact_match(reply("42"), ex) == 1.0
    assert exact_match(reply(r"The answer is \boxed{42}"), ex) == 1.0
    assert exact_match(reply("42."), ex) == 0.0
    assert exact_match(reply("41", reasoning="42"), ex) == 0.0  # the reasoning does not count
    assert exact_match(reply("7"), {"answer": ["6", "7"]}) == 1.0
    assert exact_match(reply("7"), {"answer": 7}) == 1.0
    with pytest.raises(RewardError, match="reward 'exact_match' needs the example's 'answer' field.*'question'"):
        exact_match(reply("7"), {"question": "?"})


def test_normalised_match():
    assert normalise_answer("  The   Answer. ") == "the answer"
    assert normalise_answer("$1,000.50$") == "1000.5"
    assert normalise_answer("-0.0") == "0"
    assert normalised_match(reply("1,000"), {"answer": "1000.0"}) == 1.0
    assert normalised_match(reply("Paris."), {"answer": "paris"}) == 1.0
    assert normalised_match(reply("１２"), {"answer": "12"}) == 1.0  # full-width digits (NFKC)
    assert normalised_match(reply("1001"), {"answer": "1000"}) == 0.0
    assert exact_match(reply("Paris."), {"answer": "paris"}) == 0.0


def test_math_answer():
    assert math_answer(reply(r"so $x = \boxed{\frac{1}{2}}$"), {"answer": "0.5"}) == 1.0
    assert math_answer(reply(r"\boxed{\sqrt{2}}"), {"answer": r"\sqrt{2}"}) == 1.0  # a bare LaTeX answer
    assert math_answer(reply(r"\boxed{2^{10}}"), {"answer": "1024"}) == 1.0
    assert math_answer(reply(r"\boxed{\frac{1}{3}}"), {"answer": "0.5"}) == 0.0
    assert math_answer(reply("no idea }{"), {"answer": "3"}) == 0.0
    assert math_answer(reply("12", reasoning=r"\boxed{3}"), {"answer": "3"}) == 0.0


# ----------------------------------------------------------------------------------- formats
def test_think_format():
    assert think_format(reply("42"), {}) == 1.0
    assert think_format("\n<think></think>42", {}) == 1.0           # empty reasoning, non-empty answer
    assert think_format("<think>a</think>  \n" + EOS, {}) == 0.0    # no answer
    assert think_format("42", {}) == 0.0                            # no reasoning block
    assert think_format("hi <think>a</think>42", {}) == 0.0         # text before it
    assert think_format("<think>a</think>4<think>b</think>2", {}) == 0.0
    assert think_format("<think>a<think>b</think>42", {}) == 0.0
    assert think_format("<think>a", {}) == 0.0


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"name": "now", "parameters": {"type": "object", "properties": {}}}]


def calls(*lines):
    return reply("Let me check.\n<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>")


def test_tool_call_format():
    good = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    now = json.dumps({"name": "now", "arguments": {}})
    assert tool_call_format(calls(good), {}) == 1.0
    assert tool_call_format(calls(good, now), {"tools": TOOLS}) == 1.0
    assert tool_call_format(calls(good, '{"name": "now", "arguments": '), {}) == 0.0  # one line is not JSON
    assert tool_call_format(calls(json.dumps({"arguments": {}})), {}) == 0.0          # no name
    assert tool_call_format(calls(json.dumps({"name": "search", "arguments": {}})), {"tools": TOOLS}) == 0.0
    assert tool_call_format(calls(json.dumps({"name": "get_weather", "arguments": {}})), {"tools": TOOLS}) == 0.0
    assert tool_call_format(reply("no calls"), {}) == 0.0
    assert tool_call_format(calls(), {}) == 0.0                                         # an empty block
    assert tool_call_format(reply(f"<tool_calls>\n{good}\n"), {}) == 0.0                # never closed
    assert tool_call_format(calls(good) + calls(good), {}) == 0.0                       # two blocks
    assert tool_call_format(f"<think><tool_calls>\n{good}\n</tool_calls></think>done", {}) == 0.0  # in reasoning
    with pytest.raises(RewardError, match=r"'tools'\[0\] has no function name"):
        tool_call_format(calls(good), {"tools": [{"type": "function"}]})


# ----------------------------------------------------------------------------------- code
CODE_TESTS = "assert add(2, 3) == 5\nassert add(-2, 2) == 0\n"


def code_reply(code):
    return reply(f"Here it is:\n```python\n{code}```\nDone.")


def test_extract_code():
    assert extract_code(code_reply("x = 1\n")) == "x = 1\n"
    assert extract_code(reply("```py\na = 1\n```\nand\n```\nb = 2\n```")) == "b = 2\n"
    assert extract_code(reply("print(3)")) == "print(3)"


def test_python_tests_reward():
    reward = PythonTests(timeout_s=30.0, memory_mb=128)
    assert reward(code_reply("def add(a, b):\n    return a + b\n"), {"tests": CODE_TESTS}) == 1.0
    assert reward(code_reply("def add(a, b):\n    return a * b\n"), {"tests": CODE_TESTS}) == 0.0
    assert reward(code_reply("def add(a, b):\n    return a + b\n"), {"tests": CODE_TESTS.splitlines()}) == 1.0
    assert reward(code_reply("def add(a, b):\n    raise ValueError\n"), {"tests": CODE_TESTS}) == 0.0
    assert reward(code_reply("import sys\nsys.exit(0)\n"), {"tests": CODE_TESTS}) == 0.0
    with pytest.raises(RewardError, match="reward 'python_tests' needs the example's 'tests' field"):
        reward(code_reply("pass\n"), {"answer": "1"})


def test_python_tests_reward_survives_hangs_and_memory_blowups():
    hang = PythonTests(timeout_s=1.0, memory_mb=128)
    start = time.monotonic()
    assert hang(code_reply("def add(a, b):\n    while True:\n        pass\n"), {"tests": CODE_TESTS}) == 0.0
    assert time.monotonic() - start < 10
    hog = PythonTests(timeout_s=30.0, memory_mb=128)
    start = time.monotonic()
    grow = "def add(a, b):\n    x = []\n    while True:\n        x.append(bytearray(1 << 20))\n"
    assert hog(code_reply(grow), {"tests": CODE_TESTS}) == 0.0
    assert time.monotonic() - start < 30


# ----------------------------------------------------------------------------------- registry and loading
def test_registry():
    assert set(REWARDS) == {"exact_match", "normalised_match", "math", "think_format", "tool_calls", "python_tests"}
    assert get_reward("exact_match") is exact_match
    assert get_reward("python_tests", timeout_s=2.0) == PythonTests(timeout_s=2.0)
    with pytest.raises(RewardError, match="reward 'python_tests' has no option 'cpus' .*timeout_s, memory_mb"):
        get_reward("python_tests", cpus=2)
    with pytest.raises(RewardError, match="reward 'math' has no option 'strict' .*it takes none"):
        get_reward("math", strict=True)
    with pytest.raises(RewardError, match="memory_mb must be an integer > 0"):
        get_reward("python_tests", memory_mb=0)
    with pytest.raises(RewardError, match="unknown reward 'exactmatch': choose one of exact_match, .*module:function"):
        get_reward("exactmatch")


def test_load_a_users_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(response, example):\n    return len(response) / 10\n"
        "class Scores:\n    @staticmethod\n    def one(response, example):\n        return 1\n"
        "def bad(response, example):\n    return 'yes'\n"
        "def broken(response, example):\n    raise KeyError('score')\n"
        "NOT_A_FUNCTION = 3\n")
    (tmp_path / "fails_on_import.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_reward("my_rewards:length")("abcde", {}) == 0.5
    assert load_reward("my_rewards:Scores.one")("", {}) == 1.0
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:length")("0123456789", {}) == 1.0
    with pytest.raises(RewardError, match="reward 'my_rewards:bad' returned 'yes'; a reward must be a finite number"):
        load_reward("my_rewards:bad")("", {})
    with pytest.raises(RewardError, match="reward 'my_rewards:broken' raised KeyError"):
        load_reward("my_rewards:broken")("", {})


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:score", r"reward 'no_such_module_xyz:score': cannot import 'no_such_module_xyz' \(Module"),
    ("fails_on_import:score", r"cannot import 'fails_on_import' \(RuntimeError: no config\)"),
    ("error_rewards:missing", r"reward 'error_rewards:missing': 'error_rewards' has no attribute 'missing'"),
    ("error_rewards:NOT_A_FUNCTION", r"'error_rewards:NOT_A_FUNCTION': 'NOT_A_FUNCTION' is a int, not a function"),
    ("error_rewards:", r"must be 'module:function'"),
    ("missing_file.py:score", r"cannot import 'missing_file.py' \(FileNotFoundError"),
])
def test_loader_errors_name_the_spec(tmp_path, monkeypatch, spec, message):
    (tmp_path / "error_rewards.py").write_text("NOT_A_FUNCTION = 3\n")
    (tmp_path / "fails_on_import.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardError, match=message):
        get_reward(spec)
