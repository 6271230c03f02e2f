"""Python code run against tests in a subprocess with time and memory limits: every way a program can go
wrong ends in a status, never in an exception or a hang of the caller."""

import os
import re
import time

import pytest

from m1_jax.rl.code_runner import run_python

SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
GENEROUS = 30.0  # for programs that end by themselves (a loaded machine starts Python slowly)


def run(solution, tests=TESTS, **kw):
    kw.setdefault("timeout_s", GENEROUS)
    kw.setdefault("memory_mb", 128)
    return run_python(solution, tests, **kw)


def test_passing_and_failing_tests():
    assert run(SOLUTION).status == "passed"
    r = run("def add(a, b):\n    return a - b\n")
    assert r.status == "failed" and "AssertionError" in r.output and r.returncode == 1
    r = run("def add(a, b):\n    raise RuntimeError('boom')\n")
    assert r.status == "failed" and "RuntimeError: boom" in r.output
    r = run("def add(a, b:\n")
    assert r.status == "failed" and "SyntaxError" in r.output
    assert run("", TESTS).status == "failed"  # the tests see no solution


def test_exiting_early_with_success_does_not_pass():
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        r = run(SOLUTION + early, "assert False\n")
        assert r.status == "failed" and r.returncode == 0, early


def test_a_program_that_loops_forever_is_stopped():
    start = time.monotonic()
    r = run("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - start < 10


def test_a_program_that_allocates_without_bound_is_stopped():
    r = run("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n", timeout_s=GENEROUS, memory_mb=128)
    assert r.status == "memory" and "MemoryError" in r.output
    assert r.seconds < GENEROUS  # stopped by the memory limit, not the clock
    assert run("x = bytearray(1 << 40)\n").status == "memory"


def test_crashes_and_endless_output():
    r = run("import ctypes\nctypes.string_at(0)\n")
    assert r.status == "crashed" and r.returncode < 0
    r = run("while True:\n    print('x' * 1000)\n", output_limit_kb=64)
    assert r.status in ("failed", "crashed") and r.seconds < GENEROUS  # the file-size limit, not the clock


def test_processes_the_program_starts_are_killed():
    r = run("import subprocess, sys\n"
            "p = subprocess.Popen(['sleep', '600'])\n"
            "print('child', p.pid, file=sys.stderr, flush=True)\n", tests="assert True\n")
    assert r.status == "passed"
    pid = int(re.search(r"child (\d+)", r.output).group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):  # killed, waiting to be reaped by init
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail(f"the program's child {pid} outlived it")


def test_arguments_and_a_missing_interpreter():
    with pytest.raises(ValueError, match="timeout_s"):
        run_python(SOLUTION, TESTS, timeout_s=0)
    r = run_python(SOLUTION, TESTS, python="/nonexistent/python")
    assert r.status == "error" and "could not start" in r.output
