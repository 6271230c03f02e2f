"""``tools/bench_vs_transformers.py --smoke``: the side-by-side benchmark runs end to end on a tiny config,
its two models agree, and a disagreement stops it before anything is timed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tool_loader import load_tool

pytest.importorskip("torch", reason="the benchmark compares against PyTorch")
transformers = pytest.importorskip("transformers", reason="the benchmark compares against transformers")
if not hasattr(transformers, "MiniMaxForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no MiniMaxForCausalLM", allow_module_level=True)

TOOL = Path(__file__).parents[2] / "tools" / "bench_vs_transformers.py"


def test_smoke_run_writes_four_agreeing_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    chk = res["check"]
    assert chk["agreement_pct"] == 100.0 and chk["prompt_shape"] == [2, 39]
    assert np.array(chk["m1_jax_tokens"]).shape == (2, chk["new_tokens"])
    assert chk["max_abs_logits"] > 0.1 and chk["max_abs_logits_diff"] < 1e-4  # fp32 parity (docs/model.md §5.5)
    assert res["model"]["layer_types"] == ["linear_attention", "full_attention"] and res["model"]["hidden"] == 64
    rows = res["rows"]
    assert [(r["case"], r["batch"], r["prefill"], r["new_tokens"]) for r in rows] == [
        ("prefill", 1, 64, 0), ("prefill+decode", 1, 64, 4), ("prefill", 2, 64, 0), ("prefill+decode", 2, 64, 4)]
    for r in rows:
        assert r["transformers_s"] > 0 and r["m1_jax_s"] > 0 and r["m1_jax_first_s"] > 0
        assert r["ratio"] == pytest.approx(r["transformers_s"] / r["m1_jax_s"])
        assert r["agreement_pct"] == 100.0
    for key in ("cpu", "cores", "memory_gib"):
        assert res["meta"]["machine"][key]
    assert {"jax", "torch", "transformers", "date"} <= set(res["meta"])
    table = proc.stdout[proc.stdout.index("| |"):]
    assert "| prefill 64 + 4 greedy tokens, batch 2 |" in table and len(table.strip().splitlines()) >= 6


def test_greedy_disagreement_stops_before_timing(tmp_path, monkeypatch, capsys):
    bench = load_tool("bench_vs_transformers")
    real = bench.m1_jax.generate
    monkeypatch.setattr(bench.m1_jax, "generate", lambda *a, **kw: (real(*a, **kw) + 1) % 512)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 1
    assert "FAILED: the greedy tokens of the two models differ" in capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["check"]["agreement_pct"] == 0.0 and res["rows"] == []
