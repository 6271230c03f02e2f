"""Run configs: every field checked when set (type, finiteness, range, choices), one line naming it;
the fields a resumed run must keep."""

import json

import pytest

from m1_jax.presets import CONFIG_DIR
from m1_jax.run_config import (RESUME_FIXED_FIELDS, RunConfig, RunConfigError, diff_run_configs, load_run_config,
                               resume_conflicts)


@pytest.mark.parametrize("override, field, match", [
    ("optimizer.lr=-1", "optimizer.lr", "must be > 0"),
    ("optimizer.lr=0", "optimizer.lr", "must be > 0"),
    ("optimizer.lr=NaN", "optimizer.lr", "finite"),
    ("optimizer.lr=Infinity", "optimizer.lr", "finite"),
    ("optimizer.lr=true", "optimizer.lr", "expected a number"),
    ("optimizer.b1=1.0", "optimizer.b1", r"in \[0, 1\)"),
    ("optimizer.b2=1.5", "optimizer.b2", r"in \[0, 1\)"),
    ("optimizer.b2=-0.1", "optimizer.b2", r"in \[0, 1\)"),
    ("optimizer.eps=0", "optimizer.eps", "must be > 0"),
    ("optimizer.min_lr_ratio=2", "optimizer.min_lr_ratio", r"in \[0, 1\]"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay", "must be >= 0"),
    ("optimizer.clip_norm=-1", "optimizer.clip_norm", "must be >= 0"),
    ("optimizer.z_loss=-1", "optimizer.z_loss", "must be >= 0"),
    ("optimizer.warmup_steps=-1", "optimizer.warmup_steps", "must be >= 0"),
    ("optimizer.decay_steps=0", "optimizer.decay_steps", "must be >= 1"),
    ("train.on_nan=bogus", "train.on_nan", "one of stop, skip"),
    ("train.steps=0", "train.steps", "must be >= 1"),
    ("train.steps=Infinity", "train.steps", "expected an integer"),
    ("train.steps=NaN", "train.steps", "expected an integer"),
    ("train.checkpoint_every=0", "train.checkpoint_every", "must be >= 1"),
    ("train.max_to_keep=0", "train.max_to_keep", "must be >= 1"),
    ("train.sample_tokens=-1", "train.sample_tokens", "must be >= 0"),
    ("train.peak_flops_per_device=-1", "train.peak_flops_per_device", "must be >= 0"),
    ("train.mesh=data=0", "train.mesh", "must be positive or -1"),
    ("train.mesh=pipeline=2", "train.mesh", "unknown axis 'pipeline'"),
    ("train.sample_prompt=", "train.sample_prompt", "empty"),
    ("train.async_checkpointing=1", "train.async_checkpointing", "expected true or false"),
    ("data.micro_batches=0", "data.micro_batches", "must be >= 1"),
    ("data.micro_batches=3", "data.micro_batches", "does not divide data.batch_size=16"),
    ("data.batch_size=0", "data.batch_size", "must be >= 1"),
    ("data.seq_len=1", "data.seq_len", "must be >= 2"),
    ("data.format=csv", "data.format", "one of auto, text, jsonl, tokens"),
    ("data.shards=-1", "data.shards", "must be >= 0"),
    ("data.max_files=-1", "data.max_files", "must be >= 0"),
    ("data.seed=-1", "data.seed", r"in \[0, 2\*\*32\)"),
    ("data.source=", "data.source", "empty"),
    ("data.tokenizer=", "data.tokenizer", "empty"),
    ("model.dtype=int8", "model.dtype", "one of float32, bfloat16"),
    ("model.param_dtype=float64", "model.param_dtype", "one of float32, bfloat16"),
    ("model.remat=everything", "model.remat", "one of none, full, dots, dots_no_batch"),
    ("model.moe_impl=sparse", "model.moe_impl", "one of auto, ragged, chunked, dense"),
    ("model.lightning_impl=cuda", "model.lightning_impl", "one of auto, reference, xla, pallas"),
    ("model.seed=1180591620717411303424", "model.seed", r"in \[0, 2\*\*32\)"),
    ("model.config=", "model.config", "empty"),
])
def test_bad_values_name_the_field(override, field, match):
    with pytest.raises(RunConfigError) as e:
        load_run_config(None, [override])
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(f"--set {override}: {field}: "), msg  # the flag as typed, then the field
    assert pytest.importorskip("re").search(match, msg), msg


def test_file_values_name_the_file_and_field(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"optimizer": {"b2": 1.5}}))
    with pytest.raises(RunConfigError, match=rf"^{path}: optimizer.b2: must be in \[0, 1\), got 1.5$"):
        load_run_config(path)
    # Relations between fields are checked once the whole config is read: this file is fine with the
    # override that follows it, and the error of the file alone names the file.
    path.write_text(json.dumps({"data": {"batch_size": 12, "micro_batches": 5}}))
    with pytest.raises(RunConfigError, match=rf"^{path}: data.micro_batches: 5 does not divide data.batch_size=12"):
        load_run_config(path)
    assert load_run_config(path, ["data.micro_batches=4"]).data.micro_batches == 4


def test_good_values_are_kept():
    run = load_run_config(None, ["optimizer.lr=1", "optimizer.b2=0.999", "optimizer.b1=0", "train.on_nan=skip",
                                 "data.micro_batches=4", "model.dtype=bfloat16", "optimizer.decay_steps=null",
                                 "optimizer.clip_norm=0", "data.seq_len=2", "model.seed=4294967295",
                                 "train.steps=5.0", "train.sample_tokens=0", "train.sample_prompt=",
                                 "train.mesh=fsdp=-1,expert=2"])
    assert run.optimizer.lr == 1.0 and isinstance(run.optimizer.lr, float)
    assert run.train.steps == 5 and isinstance(run.train.steps, int)
    assert (run.optimizer.b2, run.train.on_nan, run.data.micro_batches, run.model.dtype) == (
        0.999, "skip", 4, "bfloat16")
    assert run.optimizer.decay_steps is None and run.train.sample_prompt == ""


def test_presets_validate():
    for path in sorted(CONFIG_DIR.glob("train-*.json")):
        load_run_config(path).validate()


def test_programmatic_configs_are_validated_on_request():
    run = RunConfig()
    run.validate()
    run.optimizer.lr = -1.0
    with pytest.raises(RunConfigError, match=r"^run config: optimizer.lr: must be > 0, got -1.0$"):
        run.validate()
    run.optimizer.lr, run.data.micro_batches = 1e-3, True
    with pytest.raises(RunConfigError, match=r"data.micro_batches: expected an integer, got True"):
        run.validate()


def test_choices_match_the_implementation():
    from m1_jax.layers.moe import MOE_IMPLS
    from m1_jax.model import REMAT_POLICIES
    from m1_jax.run_config import CHOICES
    from pallas_kernels.lightning import IMPLS

    assert CHOICES["model.remat"] == tuple(REMAT_POLICIES)
    assert CHOICES["model.moe_impl"] == tuple(MOE_IMPLS)
    assert CHOICES["model.lightning_impl"] == tuple(IMPLS)


def test_resume_conflicts_list_the_fixed_fields_that_changed():
    saved = load_run_config(None)
    same = load_run_config(None, ["train.steps=600", "optimizer.lr=1e-4", "data.micro_batches=2",
                                  "train.mesh=data=8", "model.remat=full"])
    assert resume_conflicts(saved, same) == []  # longer runs, new hyperparameters, another mesh: fine
    assert diff_run_configs(saved, same) == {"train.steps": (300, 600), "optimizer.lr": (1e-2, 1e-4),
                                             "data.micro_batches": (1, 2), "train.mesh": (saved.train.mesh, "data=8"),
                                             "model.remat": ("none", "full")}
    changed = load_run_config(None, ["data.seq_len=256", "data.source=corpus.jsonl", "train.steps=600"])
    assert resume_conflicts(saved, changed) == [
        "data.source: 'stdlib' when the checkpoint was written, 'corpus.jsonl' now",
        "data.seq_len: 128 when the checkpoint was written, 256 now",
    ]
    # From the dict a checkpoint stores.
    assert resume_conflicts(saved.to_dict(), changed) == resume_conflicts(saved, changed)
    assert {"data.seq_len", "data.source", "data.tokenizer", "data.seed"} <= set(RESUME_FIXED_FIELDS)
    assert not {"train.steps", "optimizer.lr", "train.mesh", "data.micro_batches"} & set(RESUME_FIXED_FIELDS)
