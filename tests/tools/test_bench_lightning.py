"""``tools/bench_lightning.py`` end to end on tiny shapes: the xla rows, Pallas GPU kernel variants of both forwards
(interpret mode on CPU) and the decode-step rows with the Pallas kernel agreeing with the jnp step."""

import json

import pytest
from tool_loader import load_tool


def test_bench_lightning_rows_variants_and_decode(tmp_path):
    out = tmp_path / "bench.json"
    load_tool("bench_lightning").main([
        "--lengths", "32", "--heads", "2", "--head-dim", "16", "--blocks", "16", "--reference-max", "0",
        "--softmax-max", "0", "--pallas-max", "0", "--variants", "c16-t16-w4-s2,split-c16-t16-k16-o16-n1-w4-s2",
        "--decode-batch", "2",
        "--decode-steps", "2", "--repeats", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert [(r["impl"], r["block"], r["T"]) for r in res["rows"]] == [("xla", 16, 32)]
    assert res["rows"][0]["fwd_s"] > 0 and res["rows"][0]["fwdbwd_s"] > 0
    assert [v["variant"] for v in res["variants"]] == ["pallas c16-t16-w4-s2", "pallas split-c16-t16-k16-o16-n1-w4-s2"]
    assert all(v["fwd_s"] > 0 and v["fwdbwd_s"] > 0 for v in res["variants"])
    assert [r["impl"] for r in res["decode"]] == ["xla", "pallas"]
    for r in res["decode"]:
        assert r["step_s"] > 0 and r["bytes"] == 2 * (2 * 2 * 16 * 16 * 4) + 4 * 2 * 2 * 16 * 4
        assert r["rel_err_vs_xla"] < 1e-6


@pytest.mark.parametrize("variants, message", [
    ("c64-x2", "parts are"), ("c64-k64", "k/o/n apply to the split forward only")])
def test_bench_lightning_rejects_bad_variants(variants, message, capsys):
    with pytest.raises(SystemExit):
        load_tool("bench_lightning").main(["--variants", variants])
    assert message in capsys.readouterr().err
