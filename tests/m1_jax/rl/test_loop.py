"""The RL loop: a run writes its metrics and checkpoints and resumes exactly; dynamic sampling refills and
leaves missing groups out of the update; the reward and the prompts are checked before any model is built."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
from cli_runner import run_cli
from flax import nnx
from tiny_models import tiny_config

from m1_jax import distributed
from m1_jax.config import FULL, LINEAR
from m1_jax.model import init_model
from m1_jax.rl.config import RLRunConfig
from m1_jax.rl.data import PromptStream, Records
from m1_jax.rl.loop import Sampler, Scorer, fit_rl
from m1_jax.tokenizer import ByteTokenizer

REWARD = '''
def score(response, record):
    if record.get("kind") == "constant":
        return 1.0
    return float(sum(map(ord, response)) % 2)
'''
STEPS = 3
MODEL = tiny_config(layer_types=[LINEAR, FULL])  # one lightning and one softmax layer: half the tiny's compile


def _run(tmp_path) -> RLRunConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}", "kind": "constant" if i % 3 == 0 else "parity"})
                               + "\n" for i in range(12)))
    (tmp_path / "reward.py").write_text(REWARD)
    MODEL.to_json(tmp_path / "config.json")
    run = RLRunConfig()
    run.update({"model": {"config": str(tmp_path / "config.json")},
                "optimizer": {"lr": 1e-3},
                "prompts": {"source": str(prompts), "eval_source": str(prompts), "eval_size": 6, "batch_size": 4},
                "rollout": {"group_size": 2, "max_new_tokens": 4, "max_prompt_tokens": 64,
                            "reward": f"{tmp_path / 'reward.py'}:score", "pass_threshold": 1.0},
                "rl": {"update_rounds": 2},
                "train": {"steps": STEPS, "mesh": "data=2,fsdp=2,expert=2", "checkpoint_every": 2, "max_to_keep": 3, "async_checkpointing": False,
                          "fast_compile": True}})
    run.validate()
    return run


def _params(summary):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(summary.policy.params())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    run = _run(tmp)
    summary = fit_rl(run, str(tmp / "work"), progress=False)
    return tmp, run, summary


def test_run_writes_metrics_and_evaluates(finished):
    tmp, _, s = finished
    lines = [json.loads(x) for x in (tmp / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines == json.loads(json.dumps(s.records))
    for key in ("reward_mean", "pass_rate", "response_length", "clip_fraction", "approx_kl", "entropy", "loss",
                "grad_norm", "rollout_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s"):
        assert np.isfinite(lines[0][key]), key
    # float32 throughout: the update step's log-probs equal the sampler's before any update
    assert lines[0]["consistency"] > 1 - 1e-6 and "consistency" not in lines[1]
    assert s.eval_before is not None and lines[-1]["eval_pass_rate"] == s.eval_after
    assert 0 < lines[0]["pass_rate"] < 1 and lines[0]["approx_kl"] > 0  # the second round is off-policy
    assert {"2", "3"} <= {p.name for p in (tmp / "work" / "checkpoints").iterdir()}


def test_resume_continues_exactly(finished, tmp_path):
    tmp, run, s = finished
    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work)
    shutil.rmtree(work / "checkpoints" / "3")
    resumed = fit_rl(run, str(work), resume=True, progress=False)
    assert resumed.start_step == 2 and [r["step"] for r in resumed.records] == [3]
    timing = ("rollout_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s")
    got, want = ({k: v for k, v in r.items() if k not in timing} for r in (resumed.records[0], s.records[-1]))
    assert got == want
    a, b = _params(s), _params(resumed)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_dynamic_sampling_drops_constant_groups_and_pads_the_rest(finished):
    run = copy.deepcopy(finished[1])
    run.set("rollout.dynamic_sampling", "on")
    run.set("rollout.max_rollouts", 2)
    tok = ByteTokenizer(512)
    stream = PromptStream(Records(run.prompts.source), tok, shuffle=False)
    sampler = Sampler(run, stream, Scorer(run, tok))
    batch, m = sampler.step(init_model(MODEL, seed=0), 0)
    assert m["rollouts"] == 2  # prompts 0, 3, 6 always score 1: never 4 informative groups in one batch
    G, P = 2, 4
    kept = m["groups_kept"]
    assert 0 < kept <= P and stream.get_state()["position"] == 2 * P
    assert batch["tokens"].shape[0] == P * G
    assert np.all(batch["advantages"][: kept * G] != 0)
    assert not batch["loss_mask"][kept * G:].any() and not batch["advantages"][kept * G:].any()


def test_bad_reward_and_workdir_reuse_fail_before_any_model(finished, tmp_path):
    tmp, run, _ = finished
    bad = _run(tmp_path)
    bad.set("rollout.reward", f"{tmp_path}/none.py:score")
    with pytest.raises(ValueError, match="none.py:score.*cannot import"):
        fit_rl(bad, str(tmp_path / "w1"), progress=False)
    with pytest.raises(Exception, match="already holds checkpoints .* pass --resume"):
        fit_rl(run, str(tmp / "work"), progress=False)


@pytest.fixture
def in_process(monkeypatch):
    """The CLI in this process, whose JAX already runs on the 8 emulated devices."""
    monkeypatch.setattr(distributed, "setup", lambda **kw: None)


def test_m1_rl_on_a_finished_run_prints_where_it_stands(finished, tmp_path, capsys, in_process):
    tmp, run, _ = finished
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run.to_dict()))
    code, out, err = run_cli(["rl", "--config", str(config), "--workdir", str(tmp / "work"), "--resume",
                              "--no-progress"], capsys)
    assert code == 0, err
    assert f"nothing to run: the checkpoint is already at step {STEPS} of {STEPS}" in out
    assert f"checkpoint: {tmp / 'work' / 'checkpoints' / str(STEPS)}" in out


@pytest.mark.parametrize("extra, match", [
    (["--set", "rl.objective=ppo"], r"--set rl\.objective=ppo: rl\.objective: must be one of cispo, grpo, dapo"),
    (["--objective", "ppo"], r"rl\.objective: must be one of"),
    (["--set", "rollout.temprature=1"], r"unknown key 'rollout\.temprature'"),
    (["--config", "no-such"], r"--config no-such: no such run config file \(presets: rl-demo\)"),
    (["--resume"], r"--resume: name the run to continue with --workdir"),
    (["--set", "prompts.source=/no/such.jsonl", "--workdir", "{tmp}/w"], r"/no/such\.jsonl: cannot read prompts"),
    (["--reward", "{tmp}/missing.py:score", "--workdir", "{tmp}/w"], r"missing\.py:score.*cannot import"),
])
def test_m1_rl_errors_are_one_line_naming_the_flag(capsys, tmp_path, in_process, extra, match):
    code, out, err = run_cli(["rl", *[a.format(tmp=tmp_path) for a in extra]], capsys)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("m1 rl: error: ") and len(err.splitlines()) == 1, err
    assert re.search(match, err), err


def test_scorer_threads_give_the_same_scores_in_order(finished):
    run = copy.deepcopy(finished[1])
    tok = ByteTokenizer(512)
    records = [{"kind": "parity"}] * 7 + [{"kind": "constant"}]
    responses = [tok.encode(f"answer {i}") for i in range(8)]
    serial = Scorer(run, tok).scores(responses, records)
    run.set("rollout.reward_workers", 4)
    np.testing.assert_array_equal(Scorer(run, tok).scores(responses, records), serial)
    assert serial[-1] == 1.0 and set(serial[:-1]) == {0.0, 1.0}


def test_steps_without_any_signal_leave_the_policy_as_it_was(finished, tmp_path):
    run = copy.deepcopy(finished[1])
    (tmp_path / "zero.py").write_text("def score(response, record):\n    return 0.0\n")
    run.set("rollout.reward", f"{tmp_path / 'zero.py'}:score")
    run.set("rollout.dynamic_sampling", "on")
    run.set("train.steps", 2)
    run.set("prompts.eval_size", 0)
    s = fit_rl(run, str(tmp_path / "work"), progress=False)
    for r in s.records:
        assert r["groups_kept"] == 0 and r["rollouts"] == run.rollout.max_rollouts
        assert r["skipped_rounds"] == run.rl.update_rounds and "loss" not in r and "consistency" not in r
    start = {"/".join(map(str, k)): np.asarray(v)
             for k, v in nnx.to_flat_state(nnx.state(init_model(MODEL, seed=0), nnx.Param))}
    assert all(np.array_equal(start[k], v) for k, v in _params(s).items())
