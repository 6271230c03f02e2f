"""RL run configs: the presets load, values are checked with the file or flag named, relations are checked."""

import json

import pytest

from m1_jax.presets import CONFIG_DIR, preset_names
from m1_jax.rl.config import RLRunConfig, load_rl_config
from m1_jax.rl.objectives import OBJECTIVES
from m1_jax.run_config import RunConfigError


def test_rl_presets_load_and_are_not_model_presets():
    paths = sorted(CONFIG_DIR.glob("rl-*.json"))
    assert paths
    for path in paths:
        load_rl_config(str(path))
    assert not any(n.startswith("rl-") for n in preset_names())


def test_defaults_are_the_reports():
    run = RLRunConfig()
    run.validate()
    assert (run.rl.objective, run.rl.kl_coef, run.optimizer.b2, run.optimizer.eps) == ("cispo", 0.0, 0.95, 1e-15)
    assert run.rollout.repetition_stop == 3000 and run.model.head_dtype == "float32"
    assert run.objective_options() == {}


def test_override_and_errors_name_the_flag_or_file(tmp_path):
    run = load_rl_config("rl-demo", ["rl.objective=dapo", "rollout.group_size=4"])
    assert (run.rl.objective, run.rollout.group_size) == ("dapo", 4)
    with pytest.raises(RunConfigError, match=r"--set rl\.objective=ppo: rl\.objective: must be one of cispo, grpo"):
        load_rl_config("rl-demo", ["rl.objective=ppo"])
    with pytest.raises(RunConfigError, match="rollout.group_size: must be >= 2"):
        load_rl_config("rl-demo", ["rollout.group_size=1"])
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({"rollout": {"temprature": 1.0}}))
    with pytest.raises(RunConfigError, match=r"mine\.json: unknown key 'rollout\.temprature'"):
        load_rl_config(str(bad))
    with pytest.raises(RunConfigError, match="no such run config file .*rl-demo"):
        load_rl_config("nope")


def test_micro_batches_must_divide_the_update_batch():
    with pytest.raises(RunConfigError, match=r"rl\.micro_batches: 3 does not divide .* = 128 responses"):
        load_rl_config("rl-demo", ["prompts.batch_size=16", "rl.micro_batches=3"])


def test_objective_options_only_what_is_set():
    run = load_rl_config("rl-demo", ["rl.eps_high=2.0", "rl.kl_coef=0.01", "rl.mask_eps_high=4"])
    assert run.objective_options() == {"eps_high": 2.0, "kl_coef": 0.01, "mask_eps_high": 4.0}
    OBJECTIVES["cispo"]  # every option set is one the objective takes
    run = load_rl_config("rl-demo", ["rl.objective=grpo", "rl.mask_eps_high=4"])
    with pytest.raises(RunConfigError, match="rl.mask_eps_low: the token mask is CISPO's"):
        run.objective_options()
