"""Runs Python code against tests in a subprocess with a wall-time limit and a memory limit.

The child is a fresh interpreter (``python -I``) in an empty temporary directory. Before running anything it
sets its own limits with :func:`resource.setrlimit` (in the child, so that starting it is safe from any
thread of the parent): address space ``memory_mb`` (an allocation past it raises MemoryError), CPU time
(``timeout_s`` rounded up, plus one second), the size of any file it writes (``output_limit_kb``; its
stdout and stderr go to files, so endless printing is stopped too) and no core files. The parent waits
``timeout_s`` of wall time, then kills the child's whole process group (also any processes it started).

The tests count as passed only when the child runs the solution, then the tests, and then reaches the end
of the runner, which writes a token the program never sees in its source or arguments: a program that exits
early with status 0 (``sys.exit(0)``, ``os._exit(0)``) before the tests fails. This is a resource limit,
not a security boundary: the code can read and write what the user running it can, and reach the network.
Run untrusted code inside a container or VM.

:func:`run_python` never raises for anything the code does: a crash, a hang, an exception, a memory blow-up
or an early exit is a :class:`RunResult` whose ``status`` says which.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time

# The child's runner: limits first, then the solution and the tests in one namespace, then the token.
_RUNNER = r"""
import os, resource, sys

def _limit(kind, value):
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))

def _run():
    memory, cpu, fsize = (int(a) for a in sys.argv[1:4])
    _limit(resource.RLIMIT_AS, memory)
    _limit(resource.RLIMIT_CPU, cpu)
    _limit(resource.RLIMIT_FSIZE, fsize)
    _limit(resource.RLIMIT_CORE, 0)
    token = sys.stdin.readline().strip().encode()
    sys.stdin = open(os.devnull)
    sys.argv = ["solution.py"]
    namespace = {"__name__": "__main__"}
    for name in ("solution.py", "tests.py"):
        with open(name) as f:
            source = f.read()
        exec(compile(source, name, "exec"), namespace)
    sys.stdout.flush()
    os.write(1, b"\n" + token + b"\n")

_run()
"""

STATUSES = ("passed", "failed", "timeout", "memory", "crashed", "error")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """``status``: ``passed`` (the tests ran to the end), ``failed`` (an exception, a failed assertion, a
    syntax error or an early exit), ``timeout`` (killed after ``timeout_s``), ``memory`` (MemoryError past
    ``memory_mb``), ``crashed`` (killed by a signal: a segfault, the CPU or file-size limit), ``error`` (the
    child could not be started). ``output``: the end of its stderr (or why it could not start)."""

    status: str
    returncode: int | None
    seconds: float
    output: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - limit, 0))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(solution: str, tests: str = "", *, timeout_s: float = 5.0, memory_mb: int = 1024,
               output_limit_kb: int = 1024, python: str = sys.executable) -> RunResult:
    """Runs ``solution`` then ``tests`` (Python source, executed in one namespace as ``__main__``) in a child
    interpreter under the limits of the module docstring -> :class:`RunResult`."""
    if not (timeout_s > 0 and memory_mb > 0 and output_limit_kb > 0):
        raise ValueError(f"timeout_s, memory_mb and output_limit_kb must be > 0, got {timeout_s}, {memory_mb}, "
                         f"{output_limit_kb}")
    token = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="m1-code-") as tmp:
        for name, text in (("solution.py", solution), ("tests.py", tests)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        args = [python, "-I", "-c", _RUNNER, str(memory_mb << 20), str(math.ceil(timeout_s) + 1),
                str(output_limit_kb << 10)]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": tmp, "LANG": "C.UTF-8"}
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(args, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        start_new_session=True)
        except OSError as e:
            return RunResult("error", None, time.monotonic() - start, f"could not start {python}: {e}")
        try:
            try:
                proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
            except OSError:  # the child is already gone; its status says why
                pass
            try:
                code = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                code = proc.wait()
                timed_out = True
        finally:
            _kill_group(proc.pid)  # whatever it left running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - start
        stderr = _tail(err_path)
        if timed_out:
            status = "timeout"
        elif code == 0 and _tail(out_path, len(token) + 2).strip().endswith(token):
            status = "passed"
        elif "MemoryError" in stderr:
            status = "memory"
        elif code < 0:
            status = "crashed"
        else:
            status = "failed"
    return RunResult(status, code, seconds, stderr)
