"""LoRA: the adapters in every expert path and their gradients, training on the 8-device mesh (fsdp, expert
and tensor shards) equal to one device, exact resume, QLoRA on int8 experts, `m1 export --merge-lora`
(base + A B alpha / rank) and the PEFT adapter loaded by `peft` onto the exported transformers model."""

import argparse
import contextlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_checkpoint import assert_params_equal, params_of, tiny_run
from tiny_models import native_checkpoint

import m1_jax
from m1_jax import sharding, train
from m1_jax.checkpoint import Checkpointer
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.convert.export import export
from m1_jax.layers.experts import experts_dense, experts_grouped
from m1_jax.lora import LoraConfig, LoraError, LoraParam, add_adapters, merge_adapters
from m1_jax.lora.options import lora_overrides
from m1_jax.lora.spec import parse_flag
from m1_jax.model import init_model
from m1_jax.presets import resolve_config
from m1_jax.quant.spec import SCALE_SUFFIX, dequantize
from m1_jax.quant.spec import quantize as quantize_weight
from m1_jax.run_config import RunConfig, load_run_config
from m1_jax.train_loop import fit

IDS = np.array([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 128, 2]], np.int32)


def randomize(model, seed=0, std=0.05):
    """Non-zero adapters (B starts at zero: a fresh adapter changes nothing)."""
    for i, (_, v) in enumerate(nnx.to_flat_state(nnx.state(model, LoraParam))):
        v.set_value(std * jax.random.normal(jax.random.key(seed + i), v.shape, v.get_value().dtype))
    return model


def test_flag_and_config_errors():
    assert parse_flag("rank=4,alpha=8,targets=q_proj,v_proj,experts") == {
        "rank": 4, "alpha": 8.0, "targets": "q_proj,v_proj,experts"}
    assert LoraConfig(4, 8.0, "experts,o_proj").targets == ("o_proj", "w1", "w3", "w2")
    with pytest.raises(LoraError, match="unknown target 'w4'"):
        LoraConfig(4, 8.0, "w4")
    with pytest.raises(LoraError, match="rank=R is required"):
        parse_flag("alpha=8")
    with pytest.raises(LoraError, match="base must be one of"):
        parse_flag("rank=2,base=int4")
    # `--lora` of m1 train and m1 aot as run-config overrides
    run = load_run_config(None, lora_overrides(argparse.Namespace(lora="rank=4,alpha=8,targets=experts,base=int8")))
    assert (run.lora.rank, run.lora.alpha, run.lora.targets, run.lora.base) == (4, 8.0, "experts", "int8")
    assert lora_overrides(argparse.Namespace(lora=None)) == []


@pytest.mark.parametrize("quantize", [False, True])
def test_expert_paths_and_gradients_agree(quantize):
    """Forward and adapter gradients of the chunked, ragged and gathered grouped matmuls equal the dense
    reference, with float and int8 (QLoRA) expert weights; the adapters change the output."""
    E, D, I, N, r, k = 4, 8, 16, 12, 2, 2
    keys = iter(jax.random.split(jax.random.key(0), 16))
    x = jax.random.normal(next(keys), (N, D))
    gate = jax.nn.softmax(jax.random.normal(next(keys), (N, E)))
    weights, experts = jax.lax.top_k(gate, k)
    ws = [jax.random.normal(next(keys), s) * 0.3 for s in ((E, D, I), (E, D, I), (E, I, D))]
    scales = None
    if quantize:
        qs = [quantize_weight(w, 1, 1, xp=jnp) for w in ws]
        ws, scales = [q for q, _ in qs], tuple(s for _, s in qs)
    ads = tuple((jax.random.normal(next(keys), (E, a, r)) * 0.3, jax.random.normal(next(keys), (E, r, b)) * 0.3)
                for a, b in ((D, I), (D, I), (I, D)))

    def run(impl, ads, rows=x, w=weights, e=experts):
        lora = (ads, 2.0)
        if impl == "dense":
            return experts_dense(rows, w, e, *ws, jnp.float32, scales=scales, lora=lora)
        return experts_grouped(rows, w, e, *ws, jnp.float32, impl, scales=scales, lora=lora)

    loss = lambda impl: jax.grad(lambda a: jnp.sum(jnp.sin(run(impl, a))))
    want, want_g = run("dense", ads), loss("dense")(ads)
    for impl in ("chunked", "ragged"):
        np.testing.assert_allclose(run(impl, ads), want, atol=1e-5, rtol=1e-5, err_msg=impl)
        for g, h in zip(jax.tree.leaves(loss(impl)(ads)), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(g, h, atol=1e-5, rtol=1e-4, err_msg=impl)
    one = (x[:1], weights[:1], experts[:1])  # fewer rows than experts: the gathered path
    np.testing.assert_allclose(run("chunked", ads, *one), run("dense", ads, *one), atol=1e-5, rtol=1e-5)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(want_g))
    no = tuple((a, jnp.zeros_like(b)) for a, b in ads)
    assert np.abs(run("dense", no) - want).max() > 1e-2


def test_merge_adapters_in_place():
    """Every targeted weight becomes W + A B * alpha / rank and the adapters are gone."""
    cfg = resolve_config("tiny")
    model = randomize(init_model(cfg, lora=LoraConfig(2, 4.0, "all")))
    before = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    merge_adapters(model)
    assert model.lora is None and not nnx.state(model, LoraParam)
    after = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}
    w, a, b = (before[f"periods/layers/3/self_attn/o_proj{s}"] for s in ("", "_lora_a", "_lora_b"))
    np.testing.assert_allclose(after["periods/layers/3/self_attn/o_proj"],
                               w + 2.0 * np.einsum("phdr,pro->phdo", a, b), rtol=1e-6, atol=1e-7)
    w, a, b = (before[f"periods/layers/0/block_sparse_moe/w2{s}"] for s in ("", "_lora_a", "_lora_b"))
    np.testing.assert_allclose(after["periods/layers/0/block_sparse_moe/w2"],
                               w + 2.0 * np.einsum("peir,perd->peid", a, b), rtol=1e-6, atol=1e-7)


MESH = "fsdp=2,expert=2,tensor=2"  # every weight axis sharded: adapters on fsdp, expert and tensor shards


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, trained_corpus, trained_workdir):
    """LoRA fine-tunes of the shared trained model: 2 steps on the 8-device mesh (a checkpoint per step), the
    same 2 steps on one device, the first run resumed from its step 1, and the same 2 steps as QLoRA (int8
    experts) on the mesh."""
    root = tmp_path_factory.mktemp("lora")

    def run_of(flag="rank=4,alpha=8,targets=all"):
        run = tiny_run(trained_corpus, 2, MESH)
        run.train.checkpoint_every, run.train.async_checkpointing = 1, False
        for k, v in parse_flag(flag).items():
            run.set(f"lora.{k}", v)
        run.optimizer.eps = 1e-4  # well-conditioned parameter comparisons (tests/m1_jax/test_train.py)
        return run

    sharded = fit(run_of(), str(root / "sharded"), init_from=str(trained_workdir), progress=False)
    one = fit(run_of(), str(root / "one"), init_from=str(trained_workdir), progress=False,
              mesh=sharding.make_mesh("data=1", jax.devices()[:1]))
    resumed_dir = root / "resumed"
    shutil.copytree(root / "sharded", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "2")
    resumed = fit(run_of(), str(resumed_dir), resume=True, init_from=str(trained_workdir), progress=False)
    qlora = fit(run_of("rank=4,alpha=8,targets=all,base=int8"), str(root / "qlora"),
                init_from=str(trained_workdir), progress=False)
    return {"root": root, "sharded": sharded, "one": one, "resumed": resumed, "qlora": qlora,
            "base": trained_workdir}


def test_lora_training_trains_only_the_adapters(lora_runs):
    s = lora_runs["sharded"]
    base = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(m1_jax.from_pretrained(lora_runs["base"]), nnx.Param))}
    got = params_of(s)
    adapters = [k for k in got if "_lora_" in k]
    assert adapters and all(np.abs(got[k]).max() > 0 for k in adapters if k.endswith("_lora_b"))  # B moved
    for k, v in base.items():  # the base weights are frozen
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    _, optimizer = nnx.merge(s.final_state.graphdef, s.final_state.state)
    moments = nnx.to_flat_state(nnx.state(optimizer, nnx.optimizer.OptState))
    assert {p[-1] for p, v in moments if v.get_value().ndim} <= {p.split("/")[-1] for p in adapters}
    c = s.counts
    assert c["trainable"] == sum(got[k].size for k in adapters) < c["full_trainable"]
    assert c["optimizer_bytes"] < c["full_optimizer_bytes"] / 2


def test_lora_on_the_mesh_equals_one_device(lora_runs):
    a, b = params_of(lora_runs["one"]), params_of(lora_runs["sharded"])
    np.testing.assert_allclose(lora_runs["sharded"].losses, lora_runs["one"].losses, rtol=1e-5)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_lora_resume_is_exact(lora_runs):
    assert lora_runs["resumed"].start_step == 1
    assert_params_equal(params_of(lora_runs["resumed"]), params_of(lora_runs["sharded"]))


def test_resume_refuses_other_adapters(lora_runs, trained_corpus, trained_workdir, tmp_path):
    shutil.copytree(lora_runs["root"] / "sharded", tmp_path / "w")
    run = tiny_run(trained_corpus, 3)
    run.set("lora.rank", 2)
    with pytest.raises(CheckpointError, match="saved with LoRA rank=4"):
        fit(run, str(tmp_path / "w"), resume=True, init_from=str(trained_workdir), progress=False)


def assert_merged_export(summary, workdir, out):
    """``m1 export --merge-lora`` of ``workdir`` writes every targeted weight as base + A B * alpha / rank (an
    int8 base dequantized first), every other weight as trained, and gives the LoRA model's logits."""
    export(str(workdir), str(out), merge_lora=True, progress=False)
    merged = m1_jax.from_pretrained(out)
    got = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(merged))}
    trained = params_of(summary)
    scale = 8.0 / 4
    n = 0
    for k, w in got.items():
        stacked = 2 if "block_sparse_moe" in k else 1  # periods (and experts)
        base = trained[k]
        if base.dtype == np.int8:  # QLoRA: the experts were trained on their int8 values, frozen
            base = dequantize(base, trained[k + SCALE_SUFFIX], stacked, 1)
        if k + "_lora_a" not in trained:
            np.testing.assert_array_equal(w, base, err_msg=k)
            continue
        a, b = trained[k + "_lora_a"], trained[k + "_lora_b"]
        flat = lambda x, cut: x.reshape(x.shape[:stacked] + (int(np.prod(x.shape[stacked:cut])), -1))
        ab = np.einsum("...ir,...ro->...io", flat(a, a.ndim - 1), flat(b, stacked + 1).astype(np.float64))
        want = base.astype(np.float64) + scale * ab.reshape(base.shape)
        np.testing.assert_allclose(w, want, rtol=1e-6, atol=1e-7, err_msg=k)
        assert np.abs(want - base).max() > 1e-6  # the adapter moved the weight
        n += 1
    assert n == sum(1 for k in trained if k.endswith("_lora_a"))
    lora_model = m1_jax.from_pretrained(workdir)  # the adapters restored with the model
    np.testing.assert_allclose(np.asarray(merged(IDS)), np.asarray(lora_model(IDS)), atol=1e-4, rtol=1e-5)


def test_merge_lora_export_equals_base_plus_ba(lora_runs, tmp_path):
    workdir = lora_runs["root"] / "sharded"
    with pytest.raises(CheckpointError, match="pass --merge-lora"):
        export(str(workdir), str(tmp_path / "plain"), progress=False)
    assert not (tmp_path / "plain").exists()
    assert_merged_export(lora_runs["sharded"], workdir, tmp_path / "merged")


def test_qlora_trains_adapters_on_frozen_int8_experts_and_exports_merged(lora_runs, tmp_path):
    """QLoRA end to end: the experts stay the int8 values (and scales) of the base quantized on load, only the
    adapters move, and the merged export is the dequantized base + A B * alpha / rank."""
    q = lora_runs["qlora"]
    got = params_of(q)
    base = m1_jax.from_pretrained(lora_runs["base"], quantize="int8")
    want = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    int8 = [k for k, v in want.items() if v.dtype == np.int8]
    assert int8 and all(k.endswith(("w1", "w2", "w3")) for k in int8)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert all(np.abs(got[k]).max() > 0 for k in got if k.endswith("_lora_b"))
    assert q.counts["optimizer_bytes"] < q.counts["full_optimizer_bytes"] / 2
    assert_merged_export(q, lora_runs["root"] / "qlora", tmp_path / "merged")


def test_peft_adapter_matches_m1_jax(lora_runs, tmp_path):
    """A LoRA checkpoint on transformers' own MiniMax model, attention targets -> `--lora-only`; peft loads it
    onto that model and gives m1-jax's logits with the same adapter."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    native = native_checkpoint(tmp_path / "native", seq_len=12)
    model = add_adapters(m1_jax.from_pretrained(native["dir"]), LoraConfig(4, 8.0, "attention"))
    randomize(model, seed=3, std=0.1)
    run = RunConfig()
    for k, v in {"rank": 4, "alpha": 8.0, "targets": "attention"}.items():
        run.set(f"lora.{k}", v)
    state = nnx.state((model, nnx.Optimizer(model, train.make_optimizer(run.optimizer, 1), wrt=LoraParam)))
    workdir = tmp_path / "lora-run"
    with contextlib.closing(Checkpointer(workdir / "checkpoints", async_save=False)) as ckpt:
        ckpt.save(1, state, None, {"config": model.cfg.to_dict(), "run": run.to_dict()}, force=True)
        ckpt.wait()
    with pytest.raises(CheckpointError, match="PEFT cannot express"):
        export(str(lora_runs["root"] / "sharded"), str(tmp_path / "x"), lora_only=True)
    assert not (tmp_path / "x").exists()
    export(str(workdir), str(tmp_path / "adapter"), lora_only=True)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = peft.PeftModel.from_pretrained(native["model"], str(tmp_path / "adapter")).eval()
    ids = torch.as_tensor(native["ids"])
    with torch.no_grad():
        want = peft_model(input_ids=ids, use_cache=False).logits.numpy()
    got = np.asarray(m1_jax.from_pretrained(workdir)(native["ids"]))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(native["logits"] - want).max() > 1e-2  # the adapter matters
