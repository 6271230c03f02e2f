"""`m1 flops`: the inference FLOP model of M1 against a DeepSeek-R1-shaped dense-attention model."""

import sys

import numpy as np
import pytest

from m1_jax import cli, flops
from m1_jax.config import param_counts
from m1_jax.presets import resolve_config


@pytest.fixture(scope="module")
def cfg():
    return resolve_config("minimax-m1-80k")


def test_attention_growth_is_one_eighth_of_all_softmax(cfg):
    m1 = flops.m1_flop_model(cfg)
    all_softmax = flops.FlopModel("M1 all softmax", m1.active_params, cfg.num_hidden_layers, 0, m1.heads, m1.d_qk,
                                  m1.d_v)
    assert m1.attn_per_context_token / all_softmax.attn_per_context_token == pytest.approx(1 / 8)
    # per-token cost grows linearly in the context length with exactly that slope
    t = np.array([0, 1000, 50_000])
    np.testing.assert_allclose(np.diff(m1.per_token(t)) / np.diff(t), m1.attn_per_context_token)
    # 10 softmax layers x 2 x 64 heads x (128 + 128) vs 61 x 2 x 128 x (192 + 128)
    assert m1.attn_per_context_token == 10 * 2 * 64 * 256
    assert flops.DEEPSEEK_R1.attn_per_context_token == 61 * 2 * 128 * 320


def test_cumulative_is_the_sum_of_per_token(cfg):
    m1 = flops.m1_flop_model(cfg)
    for model in (m1, flops.DEEPSEEK_R1):
        g = 777
        assert model.cumulative(g) == pytest.approx(np.sum(model.per_token(np.arange(g))), rel=1e-12)
    # lightning layers cost 5 H d^2 per token, whatever the context
    assert m1.constant - 2 * m1.active_params == 70 * 5 * 64 * 128 * 128


def test_ratios_against_published_claims(cfg):
    rows = {r["tokens"]: r for r in flops.table(cfg, [0, 64_000, 100_000])}
    assert rows[0]["ratio_per_token"] > 1  # with no context M1's larger active count dominates
    assert rows[64_000]["ratio_per_token"] < 0.5 and rows[64_000]["ratio_cumulative"] < 0.5
    assert 0.2 < rows[100_000]["ratio_per_token"] < 0.25  # published: about 25%


def test_m1_flops_command(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is needed for the chart")
    png = tmp_path / "flops.png"
    assert cli.main(["flops", "--max-tokens", "131072", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "F(t) = 2*N_active" in out and "at 100,000 generated tokens M1 needs 22.2%" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_flops(cfg):
    m1 = flops.m1_flop_model(cfg)
    fwd = flops.step_flops(cfg, "forward", batch=3, seq_len=100, context=0)
    assert fwd == pytest.approx(3 * np.sum(m1.per_token(np.arange(100))))
    assert flops.step_flops(cfg, "train", batch=3, seq_len=100, context=0) == pytest.approx(3 * fwd)
    assert flops.step_flops(cfg, "decode", batch=2, seq_len=1, context=5000) == pytest.approx(2 * m1.per_token(5000))


def test_png_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ModuleNotFoundError
    png = tmp_path / "flops.png"
    assert cli.main(["flops", "--png", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # checked before any work
    assert err.strip() == (f"m1 flops: error: --png {png}: the chart needs matplotlib, which is not installed: "
                           f"pip install 'm1-jax[plot]'")
    assert not png.exists()


def test_active_parameters_are_labelled_as_m1_info_counts_them(cfg, capsys):
    """`m1 flops` counts the output head in N_active, `m1 info` does not: each says so, and they differ by it."""
    c = param_counts(cfg)
    assert cli.main(["flops", "--max-tokens", "8192"]) == 0
    flops_out = capsys.readouterr().out
    assert ("N_active: active parameters per token, including the output head, excluding the embedding"
            in flops_out)
    assert (f"`m1 info` prints {c['active'] / 1e9:.1f}B active per token, excluding embedding and head; "
            f"+ {c['lm_head'] / 1e9:.1f}B output head = {(c['active'] + c['lm_head']) / 1e9:.1f}B" in flops_out)
    assert f"MiniMax-M1: N_active {(c['active'] + c['lm_head']) / 1e9:.1f}B," in flops_out
    assert cli.main(["info", "minimax-m1-80k"]) == 0
    info_active = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("active per token"))
    assert f"({c['active'] / 1e9:.1f}B, excluding embedding and head)" in info_active
