"""Runs the README's walkthrough as pasted, in a fresh clone of this repository.

The walkthrough is every fenced ``bash`` and ``python`` block between the README's
``<!-- walkthrough -->`` and ``<!-- /walkthrough -->`` markers, in order, in one working directory (a
``git clone`` of this checkout's HEAD, plus its uncommitted files with ``--worktree``): bash blocks run
with ``bash -euo pipefail``, python blocks with this interpreter. Lines that install the package
(``pip install ...``) are skipped: the environment running this script has it installed already.
Exits non-zero, naming the block and showing its output, at the first block that fails.

    python tools/readme_walkthrough.py            # what CI runs after the tests
    python tools/readme_walkthrough.py --list     # print the blocks without running them
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- walkthrough -->", "<!-- /walkthrough -->"
FENCE = re.compile(r"^```(bash|python)\s*\n(.*?)^```\s*$", re.S | re.M)
INSTALL = re.compile(r"^\s*(python -m )?pip install\b")


def blocks(readme: str) -> list[tuple[str, str, int]]:
    """``[(language, code, line)]`` of the walkthrough's blocks, in order."""
    out = []
    for part in readme.split(START)[1:]:
        if END not in part:
            raise SystemExit(f"README.md: {START} without a closing {END}")
        offset = readme.index(part)
        for m in FENCE.finditer(part.split(END)[0]):
            out.append((m.group(1), m.group(2), readme[: offset + m.start()].count("\n") + 1))
    if not out:
        raise SystemExit(f"README.md has no walkthrough blocks between {START} and {END}")
    return out


def runnable(lang: str, code: str) -> str:
    if lang == "python":
        return code
    return "".join(line for line in code.splitlines(keepends=True) if not INSTALL.match(line))


def tail(text: str, lines: int = 40) -> str:
    """The last lines of a command's output (progress bars redrawn with carriage returns count as lines)."""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def fresh_clone(dst: Path, worktree: bool) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dst)], check=True)
    if worktree:  # the checkout's files as they are now, committed or not
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.split()
        for f in files:
            if (REPO / f).is_file():
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, dst / f)
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="print the blocks and exit")
    p.add_argument("--worktree", action="store_true", help="also copy uncommitted files into the clone")
    p.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    args = p.parse_args(argv)
    todo = blocks((REPO / "README.md").read_text())
    if args.list:
        for lang, code, line in todo:
            print(f"--- README.md:{line} ({lang})\n{runnable(lang, code)}")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="m1-walkthrough-"))
    try:
        clone = fresh_clone(tmp / "m1-jax", args.worktree)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        for i, (lang, code, line) in enumerate(todo, 1):
            cmd = ["bash", "-euo", "pipefail", "-c", runnable(lang, code)] if lang == "bash" else \
                [sys.executable, "-c", code]
            print(f"[{i}/{len(todo)}] README.md:{line} ({lang}) ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
            took = time.perf_counter() - t0
            if proc.returncode:
                print(f"README.md:{line}: the {lang} block exited {proc.returncode} after {took:.0f}s\n"
                      f"--- code\n{code}--- stdout (last lines)\n{tail(proc.stdout)}\n"
                      f"--- stderr (last lines)\n{tail(proc.stderr)}", file=sys.stderr)
                return 1
            print(f"    ok in {took:.0f}s; last output line: {(proc.stdout.strip().splitlines() or [''])[-1][:100]}")
        print(f"walkthrough: {len(todo)} blocks ran as pasted in {clone}")
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
