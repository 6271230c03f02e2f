"""``tools/bench_rl.py`` end to end on the tiny preset (one layer of each kind) with the smallest sizes: one table
row with every response run to its length, positive timings and throughputs, and a split that sums to the step."""

import json

import pytest
from tiny_models import tiny_config
from tool_loader import load_tool

from m1_jax.config import FULL, LINEAR


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def test_bench_rl_times_one_step(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rl.json"
    tool = load_tool("bench_rl")
    # the tiny preset with one layer of each kind: the same table, half the compile
    monkeypatch.setitem(tool.CONFIGS, "tiny", lambda: tiny_config(layer_types=[LINEAR, FULL]))
    assert tool.main(["--configs", "tiny", "--prompts", "1", "--group-size", "2", "--prompt-len", "3",
                      "--max-new-tokens", "2", "--rounds", "2", "--repeats", "1", "--out", str(out)]) == 0
    header, *rows = _table(capsys.readouterr().out)
    assert header == [c.strip() for c in tool.HEADER.strip("|").split("|")]
    assert len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["config"] == "tiny" and row["rows x length"] == "2 x 5" and row["update s (rounds)"].endswith("(2)")
    for col in ("rollout s", "rollout tokens/s", "reward + adv. s", "update tokens/s", "step s", "steps/s",
                "first rollout s (with compile)", "first update round s (with compile)"):
        assert float(row[col]) > 0, col
    split = [float(p.rstrip("%")) for p in row["split rollout / reward / update"].split(" / ")]
    assert all(p > 0 for p in split) and sum(split) == pytest.approx(100, abs=0.2)

    (r,) = json.loads(out.read_text())["rows"]
    assert r["generated"] == 2 * 2  # no end-of-sequence token: every response runs to max_new_tokens
    assert r["rollout_s"] + r["reward_s"] + r["update_s"] == pytest.approx(r["step_s"], rel=1e-6)
    assert r["rollout_tokens_per_s"] == pytest.approx(4 / r["rollout_s"])
    assert r["update_tokens_per_s"] == pytest.approx(2 * 5 * 2 / r["update_s"])


@pytest.mark.parametrize("argv, message", [
    (["--configs", "tiny,huge"], "--configs: unknown huge; choose from tiny, 100m"),
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--prompts", "3", "--group-size", "3", "--micro-batches", "2"], "--micro-batches 2 does not divide the 9 rows"),
])
def test_bench_rl_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        load_tool("bench_rl").main(argv)
    assert message in capsys.readouterr().err
