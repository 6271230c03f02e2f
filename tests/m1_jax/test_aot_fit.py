"""`m1 aot` on a plan larger than the chips' HBM: by how much, and the nearest plan that fits by an estimate."""

import json
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from m1_jax import aot_fit, cli, sharding
from m1_jax.config import param_counts
from m1_jax.lora import LoraParam
from m1_jax.model import init_model
from m1_jax.presets import resolve_config
from m1_jax.quant.layout import weight_bytes
from m1_jax.run_config import load_run_config
from m1_jax.train import with_lora


def test_hbm_shortfall_reads_both_xla_messages():
    assert aot_fit.hbm_shortfall("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                                 "temporaries (33.03G) exceeds available HBM (15.75G).") == (
        round(33.03 * 2 ** 30), round(15.75 * 2 ** 30))
    assert aot_fit.hbm_shortfall("XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
                                 "20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G.") == (
        round(20.5 * 2 ** 30), round(15.75 * 2 ** 30))
    assert aot_fit.hbm_shortfall("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem") is None


def test_larger_topologies_and_near_meshes():
    assert list(aot_fit.larger_topologies("v5e:2x2")) == ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8",
                                                          "v5e:8x16", "v5e:16x16"]
    assert list(aot_fit.larger_topologies("v5p:2x2x1"))[:5] == ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4",
                                                                "v5p:4x4x4"]
    assert list(aot_fit.larger_topologies("v5p:16x16x16")) == ["v5p:16x16x16"]  # the largest cube; 32 > 28
    sizes = {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    same = aot_fit.meshes_near(sizes, 4)
    assert same[0] == sizes and len(same) == 10  # every ordered factorisation of 4 = 2 * 2 over four axes
    assert same[1] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}  # one halving + one doubling, fsdp first
    assert aot_fit.meshes_near(sizes, 8)[0] == {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1}


def test_estimate_divides_parameters_optimizer_and_cache_as_the_mesh_does():
    cfg = resolve_config("tiny")
    total = 4 * param_counts(cfg)["total"]  # float32 bytes
    state = lambda mode: aot_fit.StateModel(cfg, mode, context=64, param_dtype=jnp.float32, dtype=jnp.float32)
    one = sharding.make_mesh("data=1", jax.devices()[:1])
    assert state("forward").per_device(one, 1) == {"parameters": total, aot_fit.GATHERED: 0}
    mesh = sharding.make_mesh("tensor=2,fsdp=2,expert=2", jax.devices())
    train = state("train").per_device(mesh, 4)
    assert train["gradients"] == train["parameters"] and train["AdamW moments"] == 2 * train["parameters"]
    assert total / 8 <= train["parameters"] < total / 2
    assert 0 < train[aot_fit.GATHERED] < total  # fsdp=2 gathers one weight (a layer's slice) at a time
    decode = state("decode")
    assert decode.per_device(mesh, 8)["cache"] == pytest.approx(2 * decode.per_device(mesh, 4)["cache"], rel=0.01)
    assert state("decode").parameter_floor(8) == total / 8 and state("train").parameter_floor(8) == total / 2


def test_estimate_counts_int8_weights_as_stored():
    """With quantize the parameters are the int8 model's (m1_jax.quant.layout: 1 byte per expert weight plus
    float32 scales), on one device and divided over a mesh; quantize is refused for train."""
    cfg = resolve_config("tiny")
    state = lambda mode, q=None: aot_fit.StateModel(cfg, mode, context=64, param_dtype=jnp.bfloat16,
                                                    dtype=jnp.bfloat16, quantize=q)
    one = sharding.make_mesh("data=1", jax.devices()[:1])
    full, int8 = state("decode").per_device(one, 1), state("decode", "int8").per_device(one, 1)
    assert full["parameters"] == weight_bytes(cfg, "bfloat16")
    assert int8["parameters"] == weight_bytes(cfg, "bfloat16", "int8") < full["parameters"]
    assert int8["cache"] == full["cache"]
    assert state("decode", "int8").parameter_floor(8) == weight_bytes(cfg, "bfloat16", "int8") / 8
    mesh = sharding.make_mesh("tensor=2,fsdp=2,expert=2", jax.devices())
    sharded = state("decode", "int8").per_device(mesh, 4)
    assert weight_bytes(cfg, "bfloat16", "int8") / 8 <= sharded["parameters"] < state("decode").per_device(
        mesh, 4)["parameters"]
    with pytest.raises(ValueError, match="int8 weights are for inference: quantize does not apply to mode 'train'"):
        state("train", "int8")


def test_estimate_of_a_qlora_run_trains_only_the_adapters():
    """A LoRA train plan (``run``'s lora section): gradients and moments only for the adapters; with base=int8
    the experts are stored in int8; the parameters as m1 train's QLoRA model holds them."""
    cfg = resolve_config("tiny")
    run = load_run_config(None, ["lora.rank=2", "lora.alpha=4", "lora.targets=all", "lora.base=int8"])
    state = aot_fit.StateModel(cfg, "train", context=0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, run=run)
    model = with_lora(init_model(cfg, param_dtype=jnp.bfloat16), run)
    nbytes = lambda filt: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, filt)))
    one = sharding.make_mesh("data=1", jax.devices()[:1])
    got = state.per_device(one, 1)
    assert got["parameters"] == nbytes(nnx.Param)
    assert got["gradients"] == nbytes(LoraParam) and got["AdamW moments"] == 2 * nbytes(LoraParam)
    assert 0 < got["gradients"] < got["parameters"] / 4
    assert state.parameter_floor(8) == (nbytes(nnx.Param) + 3 * nbytes(LoraParam)) / 8


def test_m1_aot_reports_a_plan_that_does_not_fit(tmp_path, monkeypatch, capsys):
    """Parameters replicated over data=4 need 32 GiB per v5e chip (16 GiB): XLA refuses; the report says by how
    much and that tensor=4 on the same chips would fit by the estimate (compiled, it needs 8.3 GiB)."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg_path = tmp_path / "config.json"
    resolve_config("tiny").replace(block_size=128, hidden_size=4096, vocab_size=1 << 21).to_json(cfg_path)
    out = tmp_path / "aot.json"
    rc = cli.main(["aot", "--config", str(cfg_path), "--topology", "v5e:2x2", "--mesh", "data=4", "--mode", "forward",
                   "--seq-len", "128", "--json", str(out)])
    text, err = capsys.readouterr()
    assert rc == 1, err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in text + err
    m = re.search(r"does not fit: forward on v5e:2x2 \(mesh data=4,fsdp=1,expert=1,tensor=1\) needs ([\d.]+) GiB per "
                  r"device of ([\d.]+) GiB HBM \(XLA\): ([\d.]+) GiB \(\d+%\) too much", text)
    assert m, text
    need, have, over = map(float, m.groups())
    assert need > 32 and 15 < have <= 16 and over == pytest.approx(need - have, abs=0.011)
    assert "this plan by the estimate: 32.03 GiB per device (parameters 32.03)" in text
    assert ("nearest plan that fits by the estimate: --topology v5e:2x2 --mesh data=1,fsdp=1,expert=1,tensor=4 "
            "(batch 1): ") in text
    assert "estimate:" in text and "compile the plan to confirm" in text
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["total_bytes"] > report["hbm_bytes"]
