"""``tools/rl_compare.py``: its flags, the table of pass rates over seeds, and the PNG (the runs themselves are
``m1_jax.rl.loop.fit_rl``, tested in tests/m1_jax/rl/test_loop.py)."""


import pytest
from tool_loader import load_tool


def _run(seed, values, clip=0.1, rollouts=1.0):
    return {"seed": seed, "curve": [[10 * i, v] for i, v in enumerate(values)], "clip_fraction": clip,
            "rollouts_per_step": rollouts}


RUNS = {"cispo": [_run(0, [0.1, 0.5], 0.2), _run(1, [0.1, 0.3], 0.4)],
        "dapo": [_run(0, [0.1, 0.2], 0.0, 2.0), _run(1, [0.1, 0.4], 0.1, 3.0)]}


def test_table_gives_mean_and_range_over_seeds():
    lines = load_tool("rl_compare").table(RUNS).splitlines()
    assert lines[0] == "| objective | step 0 | step 10 | clipped (mean) | rollouts per step |"
    assert lines[2] == "| cispo | 10.0 [10.0, 10.0] | 40.0 [30.0, 50.0] | 0.300 | 1.00 |"
    assert lines[3] == "| dapo | 10.0 [10.0, 10.0] | 30.0 [20.0, 40.0] | 0.050 | 2.50 |"


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    load_tool("rl_compare").plot(RUNS, str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, match", [
    (["--objectives", "cispo,ppo"], "unknown ppo"),
    (["--seeds", "0,x"], "comma-separated integers"),
    (["--steps", "0"], "must be >= 1"),
])
def test_flag_errors(capsys, argv, match):
    with pytest.raises(SystemExit):
        load_tool("rl_compare").parse_args(["--out", "x", *argv])
    assert match in capsys.readouterr().err
