"""``m1 info``: the parameter counts of M1-40k, through main() and through the installed console script."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax import cli

TOTAL = "456,089,655,296"  # the published size of MiniMax-M1 (docs/model.md §1.4)
ACTIVE = "45,944,920,064"  # active per token, excluding embedding and head (the published 45.9B)


def test_info_prints_total_and_active(configs_dir, capsys):
    assert cli.main(["info", str(configs_dir / "minimax-m1-40k.json")]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total parameters"))
    active = next(line for line in out.splitlines() if line.startswith("active per token"))
    assert TOTAL in total and ACTIVE in active, out


def test_info_json(configs_dir, capsys):
    assert cli.main(["info", str(configs_dir / "minimax-m1-40k.json"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert f"{r['params']['total']:,}" == TOTAL and f"{r['params']['active']:,}" == ACTIVE
    assert m1_jax.M1Config.from_dict(r["config"]) == m1_jax.M1Config.from_json(configs_dir / "minimax-m1-40k.json")


def test_param_counts_match_a_built_model(configs_dir):
    """param_counts against the parameters a (small) model really has: total = every leaf, active = all but
    embedding and head, with only top_k / num_experts of the expert weights."""
    cfg = m1_jax.M1Config.from_json(configs_dir / "tiny.json")
    state = nnx.to_flat_state(nnx.state(m1_jax.abstract_model(cfg), nnx.Param))
    sizes = {path: int(np.prod(v.get_value().shape)) for path, v in state}
    counts = m1_jax.param_counts(cfg)
    assert counts["total"] == sum(sizes.values())
    frac = cfg.num_experts_per_tok / cfg.num_local_experts
    active = sum(n * (frac if path[-1] in ("w1", "w2", "w3") else 1) for path, n in sizes.items()
                 if path not in (("embed_tokens",), ("lm_head",)))
    assert counts["active"] == active


def test_info_missing_file(tmp_path, capsys):
    missing = tmp_path / "no-such-config.json"
    assert cli.main(["info", str(missing)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err, err


@pytest.mark.skipif(shutil.which("m1") is None, reason="the m1 console script is not installed (pip install -e .)")
def test_console_script(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(["m1", "info", "minimax-m1-40k"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert TOTAL in res.stdout and ACTIVE in res.stdout, res.stdout
    missing = tmp_path / "absent.json"
    res = subprocess.run(["m1", "info", str(missing)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and str(missing) in res.stderr, res.stderr
