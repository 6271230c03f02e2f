"""``tools/bench_lora.py``: the held-out answer loss counts exactly the answer tokens of each record, and a QLoRA
fine-tune end to end (tiny model, a few steps) prints a row with its parameter and optimizer-state shares."""

import contextlib
import json

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config
from tool_loader import load_tool

import m1_jax
from m1_jax import train
from m1_jax.checkpoint import Checkpointer
from m1_jax.config import FULL, LINEAR
from m1_jax.run_config import RunConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A checkpoint of a randomly initialised tiny model (one layer of each kind), as a train workdir holds it."""
    workdir = tmp_path_factory.mktemp("bench-lora") / "base"
    model = m1_jax.init_model(tiny_config(layer_types=[LINEAR, FULL]), seed=0)
    run = RunConfig()
    state = nnx.state((model, nnx.Optimizer(model, train.make_optimizer(run.optimizer, 1), wrt=nnx.Param)))
    with contextlib.closing(Checkpointer(workdir / "checkpoints", async_save=False)) as ckpt:
        ckpt.save(1, state, None, {"config": model.cfg.to_dict(), "run": run.to_dict()}, force=True)
        ckpt.wait()
    return workdir


def test_answer_loss_is_the_mean_over_answer_tokens(base):
    tool = load_tool("bench_lora")
    model = m1_jax.from_pretrained(base)
    held = tool.HeldOut(3, model.cfg.vocab_size)
    assert held.ids.shape[1] > min(int(np.sum(m > 0)) for m in held.mask)  # rows of different lengths, padded
    total, count = 0.0, 0
    for r in held.records:  # each record alone, unpadded
        ids, mask = tool.m1data.render_chat([*r["messages"], {"role": "assistant", "content": r["answer"]}],
                                            held.tokenizer)
        assert held.tokenizer.decode(ids[mask > 0]).startswith(r["answer"])
        logp = jax.nn.log_softmax(np.asarray(model(ids[None, :-1]), np.float64)[0], axis=-1)
        nll = -logp[np.arange(len(ids) - 1), ids[1:]]
        total, count = total + float(np.sum(nll * mask[1:])), count + int(np.sum(mask[1:]))
    assert held.answer_loss(model) == pytest.approx(total / count, rel=1e-5)


def test_qlora_row(base, tmp_path, capsys):
    out = tmp_path / "rows.json"
    tool = load_tool("bench_lora")
    assert tool.main([str(base), "--variants", "qlora-all", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                      "--examples", "16", "--eval-size", "2", "--json", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| qlora-all |")]
    assert len(lines) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert 0 < row["trainable"] < row["full_trainable"] and 0 < row["optimizer_bytes"] < row["full_optimizer_bytes"]
    assert row["answer_loss_after"] != row["answer_loss_before"] and np.isfinite(row["answer_loss_after"])
    assert 0 <= row["pass_rate_after"] <= 1 and row["step_ms_median"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--variants", "full,lora-x"], "--variants: unknown lora-x"),
    (["--lr", "full"], "expected VARIANT=RATE"),
    (["--lr", "qlora=1e-3"], "--lr: unknown variant qlora"),
])
def test_bad_flags(argv, message, capsys, base):
    with pytest.raises(SystemExit):
        load_tool("bench_lora").main([str(base), *argv])
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_tool("bench_lora").main([str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "nowhere" in err and "m1 train --workdir runs/demo" in err
