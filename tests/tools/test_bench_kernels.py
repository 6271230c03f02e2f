"""``tools/bench_moe.py`` and ``tools/bench_attention.py`` run end to end on tiny shapes and print their tables
(every form timed, the old and new attention paths in agreement)."""

import re

import pytest
from tool_loader import load_tool


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("|---")][1:]


def test_bench_moe_times_every_form(capsys):
    assert load_tool("bench_moe").main(["--tokens", "64", "--experts", "4", "--hidden", "32", "--width", "16",
                                    "--repeats", "1", "--backward"]) == 0
    rows = _table(capsys.readouterr().out)
    forms = [r[2] for r in rows]
    assert forms == ["batched einsum (same FLOPs)", "grouped: ragged_dot", "grouped: chunked",
                     "experts, chunked (sort + combine)", "experts, dense reference", "fwd+bwd: batched einsum",
                     "fwd+bwd: ragged_dot", "fwd+bwd: chunked"]
    for r in rows:
        assert r[:2] == ["64", "4"] and float(r[3]) > 0 and float(r[4]) > 0 and r[5].endswith("x")
    assert rows[0][5] == "1.00x" and rows[5][5] == "1.00x"


def test_bench_moe_rejects_bad_flags():
    with pytest.raises(SystemExit):
        load_tool("bench_moe").main(["--experts", "1"])


def test_bench_attention_old_and_new_agree(capsys):
    load_tool("bench_attention").main(["--tokens", "40", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                                   "--decode-caches", "64", "--repeats", "1"])
    rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["causal fwd", "causal fwd+bwd", "cache prefill (40 slots)",
                                    "decode (60 of 64 slots)"]
    for r in rows:
        assert float(r[6]) < 1e-4, r  # max abs diff between the old and the new path
        assert re.fullmatch(r"[0-9.]+x", r[5])


def test_bench_generate_runs_past_the_presets_positions(tmp_path, capsys):
    """Contexts longer than the preset's max_position_embeddings (4,096 for tiny) still run."""
    out = tmp_path / "gen.json"
    load_tool("bench_generate").main(["--contexts", "4100", "--new-tokens", "2", "--repeats", "1", "--out", str(out)])
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["context"]) for r in rows} == {(m, 4100) for m in ("hybrid", "lightning-only",
                                                                              "softmax-only")}
