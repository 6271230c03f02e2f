"""`m1 aot`: compile a scaled-down model for a small abstract TPU topology on this CPU host."""

import json

import pytest
from tiny_models import tiny_config

from m1_jax import aot, cli
from m1_jax.config import FULL, LINEAR, param_counts
from m1_jax.flops import step_flops
from m1_jax.presets import resolve_config


def test_hbm_table_and_bad_topology():
    assert (aot.HBM_GIB["v4"], aot.HBM_GIB["v5e"], aot.HBM_GIB["v5p"], aot.HBM_GIB["v6e"]) == (32, 16, 95, 32)
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    with pytest.raises(ValueError, match="expected GENERATION:SHAPE"):
        aot.topology_devices("v5p")


def test_a_compiled_plan_fits_even_when_its_sum_is_over():
    """XLA refuses a TPU program over the HBM, so a compiled report fits; the sum of arguments and temporaries
    is an upper bound, and the report says by how much it is over when it is."""
    gib = aot.GiB
    report = lambda temp: aot.AotReport(
        mode="decode", topology="v5p:2x2x4", mesh="tensor=16", devices=16, batch=1, seq_len=1, context=1 << 20,
        param_dtype="bfloat16", compute_dtype="bfloat16", lightning_impl="auto", compile_s=1.0,
        argument_bytes=68 * gib, output_bytes=0, temp_bytes=temp, alias_bytes=0, generated_code_bytes=0,
        hbm_bytes=95 * gib, flops=None, model_flops=1.0)
    over, under = report(30 * gib), report(20 * gib)
    assert (over.fits, over.sum_fits, under.fits, under.sum_fits) == (True, False, True, True)
    assert "98.00 GiB of 95.00 GiB HBM: fits: 3.00 GiB over as a sum, but within XLA's own HBM check" in over.table()
    assert "88.00 GiB of 95.00 GiB HBM: fits\n" in under.table()
    assert over.to_dict()["fits"] is True and over.to_dict()["sum_fits"] is False


def test_m1_aot_forward_on_v5p(tmp_path, monkeypatch, capsys):
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lock
    # tiny model; lightning block 128 so that the Pallas TPU kernels compile through Mosaic
    cfg_path = tmp_path / "config.json"
    resolve_config("tiny").replace(block_size=128).to_json(cfg_path)
    out = tmp_path / "aot.json"
    rc = cli.main(["aot", "--config", str(cfg_path), "--topology", "v5p:2x2x1", "--mesh", "fsdp=2,expert=2",
                   "--mode", "forward", "--seq-len", "256", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "total need" in text and "of 95.00 GiB HBM: fits" in text and "FLOPs per step" in text
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["mesh"] == "data=1,fsdp=2,expert=2,tensor=1"
    assert report["batch"] == 4  # default: one row per data-parallel shard
    assert report["argument_bytes"] > 0 and report["temp_bytes"] > 0 and report["fits"] is True
    # XLA's estimate for the TPU: bytes, and a time unless a part (the Pallas kernels here) has none
    assert report["bytes_accessed"] > 0 and (report["xla_seconds"] is None or report["xla_seconds"] > 0)
    assert report["total_bytes"] >= report["argument_bytes"] + report["temp_bytes"]
    # the tiny model is one period (no layer loop), so XLA's count covers at least the weight matmuls
    cfg = resolve_config("tiny")
    assert report["flops"] * report["devices"] > 2 * param_counts(cfg)["active"] * 4 * 256
    assert report["model_flops"] == step_flops(cfg, "forward", batch=4, seq_len=256, context=report["context"])
    assert report["compile_s"] > 0


def test_m1_aot_rejects_a_batch_the_mesh_does_not_divide(monkeypatch, capsys):
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    rc = cli.main(["aot", "--config", "tiny", "--topology", "v5p:2x2x1", "--mesh", "data=4", "--mode", "forward",
                   "--batch", "2"])
    assert rc == 2
    assert "batch=2 is not divisible by data*fsdp*expert=4" in capsys.readouterr().err


def test_m1_aot_prefill_chunk_on_v5e(tmp_path, monkeypatch):
    """The last chunk of a chunked prefill: cache of --context tokens, --seq-len new tokens per row."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg_path = tmp_path / "config.json"
    resolve_config("tiny").replace(block_size=128).to_json(cfg_path)
    out = tmp_path / "aot.json"
    rc = cli.main(["aot", "--config", str(cfg_path), "--topology", "v5e:2x2", "--mesh", "tensor=2,data=2",
                   "--mode", "prefill", "--seq-len", "128", "--context", "1024", "--batch", "2", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "prefill" and report["context"] == 1024 and report["seq_len"] == 128
    assert "prefill chunk: 128 new tokens" in report["note"]
    cfg = resolve_config("tiny")
    assert report["model_flops"] == step_flops(cfg, "prefill", batch=2, seq_len=128, context=1024)
    assert 0 < report["model_flops"] < step_flops(cfg, "forward", batch=2, seq_len=1024, context=1024)
    with pytest.raises(ValueError, match="seq_len 2048 .* exceeds context 1024"):
        aot.plan(cfg, "v5e:2x2", "tensor=-1", "prefill", batch=1, seq_len=2048, context=1024)


def test_aot_train_lowers_the_train_step_that_m1_train_runs():
    """``m1 aot --mode train`` plans the program ``m1 train`` runs: the same lowered HLO, tiny config (one layer of
    each kind), 8-device mesh."""
    import jax

    from m1_jax import sharding, train
    from m1_jax.run_config import load_run_config

    cfg = tiny_config(layer_types=[LINEAR, FULL])
    run = load_run_config(None, ["data.micro_batches=2", "optimizer.z_loss=1e-4", "model.remat=full"])
    mesh = sharding.make_mesh("data=2,fsdp=2,expert=2", jax.devices())
    ts = train.build_train_state(cfg, run, mesh)
    batch = aot.train_batch(mesh, 16, 32)
    ran = ts._step.lower(ts.abstract_state(), batch).as_text()
    planned, _ = aot.lower_step(cfg, mesh, "train", batch=16, seq_len=32, context=0, model_kw=train.model_options(run),
                                run=run)
    assert planned.as_text() == ran
    other = load_run_config(None, ["data.micro_batches=1", "optimizer.z_loss=1e-4", "model.remat=full"])
    assert aot.lower_step(cfg, mesh, "train", batch=16, seq_len=32, context=0, model_kw=train.model_options(other),
                          run=other)[0].as_text() != ran  # the comparison sees a different step
    # `m1 aot --lora`: the QLoRA step of `m1 train --lora` (int8 experts frozen, optimizer state for the adapters)
    qlora = load_run_config(None, ["lora.rank=2", "lora.alpha=4", "lora.targets=all", "lora.base=int8"])
    ts = train.build_train_state(cfg, qlora, mesh)
    planned, note = aot.lower_step(cfg, mesh, "train", batch=16, seq_len=32, context=0,
                                   model_kw=train.model_options(qlora), run=qlora)
    assert planned.as_text() == ts._step.lower(ts.abstract_state(), batch).as_text()
    assert note.startswith("LoRA rank 2, alpha 4, targets qkv_proj,") and note.endswith(",w1,w3,w2")


def one_lightning_layer():
    """The tiny config cut to one lightning layer, block 128 (so that the Pallas TPU kernels compile through
    Mosaic): a short compile of a step with a backward pass."""
    return resolve_config("tiny").replace(block_size=128, num_hidden_layers=1, layer_types=["linear_attention"])


def test_m1_aot_rl_update_on_v5p(tmp_path, monkeypatch, capsys):
    """``--mode rl`` compiles the RL update step: the objective and micro-batches asked for, the reference's
    log-probs in the batch with ``--kl``, the train step's FLOPs; flags that do not apply are refused."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    base = ["aot", "--config", "tiny", "--topology", "v5p:2x2x1", "--mesh", "fsdp=2,expert=2"]
    assert cli.main(base + ["--mode", "train", "--objective", "grpo"]) == 2
    assert "--objective and --kl apply to --mode rl, not --mode train" in capsys.readouterr().err
    assert cli.main(base + ["--mode", "rl", "--lora", "rank=2"]) == 2
    assert "--lora applies to --mode train, not --mode rl" in capsys.readouterr().err
    assert cli.main(base + ["--mode", "rl", "--micro-batches", "2", "--batch", "4"]) == 2
    assert "--batch must be a multiple of 8, got 4" in capsys.readouterr().err
    cfg = one_lightning_layer()
    cfg_path = tmp_path / "config.json"
    cfg.to_json(cfg_path)
    out = tmp_path / "aot.json"
    rc = cli.main(["aot", "--config", str(cfg_path)] + base[3:] + [
        "--mode", "rl", "--objective", "grpo", "--micro-batches", "2", "--kl", "0.01", "--seq-len", "128",
        "--head-dtype", "float32", "--json", str(out)])
    assert rc == 0
    assert "mode            rl (batch 8 x seq 128, prompt + response)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["batch"] == 8  # default: one row per data-parallel shard in each of the 2 micro-batches
    assert report["param_dtype"] == "float32" and report["fits"] is True
    assert (report["compute_dtype"], report["head_dtype"]) == ("bfloat16", "float32")
    assert "objective grpo, kl_coef 0.01, 2 micro-batches" in report["note"]
    assert report["model_flops"] == step_flops(cfg, "train", batch=8, seq_len=128, context=report["context"])
    # the state is donated (aliased to the outputs); what is left of the arguments is this device's 2 rows of
    # tokens, loss mask, old and reference log-probs (4 bytes each) and their advantages
    rows = 8 // 4
    batch_bytes = rows * 128 * 4 * 4 + rows * 4
    assert report["alias_bytes"] > 0
    assert batch_bytes <= report["argument_bytes"] - report["alias_bytes"] < 2 * batch_bytes


def test_aot_rl_lowers_the_update_step_of_the_policy_state():
    """``m1 aot --mode rl`` plans the program :class:`m1_jax.rl.update.PolicyState` runs: the same lowered HLO,
    8-device mesh."""
    import jax
    from flax import nnx

    from m1_jax import sharding, train
    from m1_jax.model import M1Model
    from m1_jax.rl.update import UpdateOptions, build_policy_state
    from m1_jax.run_config import RunConfig

    cfg = one_lightning_layer()
    mesh = sharding.make_mesh("data=2,fsdp=2,expert=2", jax.devices())
    model_kw = train.model_options(RunConfig())
    opts = UpdateOptions(objective="dapo", objective_options={"eps_high": 0.3}, micro_batches=2, remat="full")
    ps = build_policy_state(M1Model(cfg, rngs=nnx.Rngs(0), **model_kw), mesh, opts)
    batch = aot.rl_batch(mesh, 16, 32)
    assert set(batch) == set(ps.batch_shardings)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), ps.state, ps.state_shardings)
    ran = ps._step.lower(state, batch).as_text()
    planned, note = aot.lower_step(cfg, mesh, "rl", batch=16, seq_len=32, context=0, model_kw=model_kw,
                                   run=RunConfig(), update=opts)
    assert planned.as_text() == ran
    assert note.startswith("RL update (m1_jax.rl.update): objective dapo, eps_high 0.3, 2 micro-batches")


def test_m1_aot_serve_plans_the_engines_decode_step(tmp_path, monkeypatch, capsys):
    """``--mode serve`` compiles m1 serve's decode step over ``--batch`` slots of ``--context`` tokens and
    names the prefill rows the engine holds beside it."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = resolve_config("tiny").replace(block_size=128, num_hidden_layers=2,
                                         layer_types=["linear_attention", "full_attention"])
    cfg.to_json(tmp_path / "config.json")
    out = tmp_path / "aot.json"
    assert cli.main(["aot", "--config", str(tmp_path / "config.json"), "--topology", "v5p:2x2x1", "--mesh",
                     "expert=2,tensor=2", "--mode", "serve", "--batch", "8", "--context", "1024",
                     "--json", str(out)]) == 0
    assert "mode            serve (8 slots x context 1024, one new token each)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["fits"] is True and report["batch"] == 8
    assert "8 slots x 1024 tokens" in report["note"] and "4 prefill row(s)" in report["note"]
    assert report["model_flops"] == step_flops(cfg, "decode", batch=8, seq_len=report["seq_len"], context=1024)
    # the slots' KV cache is an argument: 8 slots x 1024 tokens x 2 KV heads x 16 x (keys + values) x bf16,
    # split over the expert axis (batch)
    assert report["argument_bytes"] >= 8 * 1024 * 2 * 16 * 2 * 2 // 2
