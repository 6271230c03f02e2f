"""``tools/rl_consistency.py`` end to end on the small golden checkpoint: one row per (compute, head) dtype pair,
every sampled token counted, the float32 paths in agreement."""

import json

import pytest
from tool_loader import load_tool


def test_rl_consistency_table(golden_dir, tmp_path, capsys):
    out = tmp_path / "rl.json"
    tool = load_tool("rl_consistency")
    # the float32 case and one bf16 case: each case compiles its own model (the bf16 head is the other's twin)
    assert tool.main(["--init-from", str(golden_dir), "--prompts", "2", "--group-size", "2", "--max-new-tokens",
                      "12", "--out", str(out), "--cases", "bfloat16/float32,float32/float32"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["compute"], r["head"]) for r in rows] == [("bfloat16", "float32"), ("float32", "float32")]
    for r in rows:
        assert r["tokens"] == 2 * 2 * 12  # no end-of-sequence token: every response runs to its length
        assert -1 <= r["correlation"] <= 1 and 0 <= r["mean_abs_diff"] <= r["max_abs_diff"] < 0.5
        assert f"| {r['compute']} | {r['head']} | {r['correlation']:.6f} |" in printed
    reference = rows[-1]  # float32 everywhere: the cached decode and the full forward agree to rounding
    assert reference["max_abs_diff"] < 1e-4 and reference["correlation"] > 1 - 1e-8


@pytest.mark.parametrize("argv, message", [
    (["--group-size", "0"], "--group-size must be >= 1, got 0"),
    (["--prompts", "99"], "--prompts: there are 8 built-in prompts, got 99"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--init-from", "/nonexistent/ckpt"], "--init-from /nonexistent/ckpt: no such checkpoint directory"),
    (["--cases", "float16/float32"], "--cases: float16/float32: choose from bfloat16/float32"),
])
def test_rl_consistency_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_tool("rl_consistency").main(argv)
    assert message in capsys.readouterr().err
