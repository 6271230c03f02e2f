"""int8 weights (m1_jax.quant): the matmuls on int8 values against dequantize-then-matmul, the sharded model
against one device, the golden model's accuracy, and `m1 convert --quantize int8` against quantizing on load."""

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax import aot, sharding
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.commands import runtime
from m1_jax.convert.convert import convert
from m1_jax.convert.export import export
from m1_jax.layers.common import matmul
from m1_jax.layers.experts import experts_dense, experts_grouped
from m1_jax.model import abstract_model, init_model
from m1_jax.quant.layout import stored_arrays, weight_bytes
from m1_jax.quant.spec import QuantConfig, QuantizeError, dequantize, quantize
from m1_jax.quant.weights import quantize_model
from m1_jax.run_config import RunConfig
from pallas_kernels.platform import tpu_target
from tiny_models import tiny_config
from test_convert import converted_arrays

N, D, E, I, K = 24, 32, 4, 48, 2


@pytest.fixture(scope="module")
def experts_problem():
    rng = np.random.default_rng(3)
    w = {n: rng.normal(size=s).astype(np.float32) * 0.2 for n, s in (("w1", (E, D, I)), ("w3", (E, D, I)),
                                                                       ("w2", (E, I, D)))}
    q = {n: quantize(v, 1, 1) for n, v in w.items()}  # numpy, as the converter does
    experts = np.stack([rng.choice(E, size=K, replace=False, p=[0.6, 0.3, 0.1, 0.0]) for _ in range(N)])
    return dict(x=jnp.asarray(rng.normal(size=(N, D)), jnp.float32), experts=jnp.asarray(experts, jnp.int32),
                weights=jnp.asarray(rng.uniform(0.1, 1, size=(N, K)), jnp.float32),
                q=[jnp.asarray(q[n][0]) for n in ("w1", "w3", "w2")],
                scales=tuple(jnp.asarray(q[n][1]) for n in ("w1", "w3", "w2")),
                deq=[jnp.asarray(dequantize(*q[n], 1, 1)) for n in ("w1", "w3", "w2")], w=w)


def test_quantize_is_symmetric_per_output_channel():
    w = np.array([[1.0, -0.5, 0.0], [-2.0, 0.25, 0.0]], np.float32)  # [in 2, out 3]; the last column all zero
    q, s = quantize(w, 0, 1)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3,)
    np.testing.assert_array_equal(s, np.float32([2.0, 0.5, 0.0]) * np.float32(1 / 127))
    np.testing.assert_array_equal(q, [[64, -127, 0], [-127, 64, 0]])  # 63.5 rounds to even
    qj, sj = quantize(jnp.asarray(w), 0, 1, xp=jnp)  # the same bits from XLA
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)


@pytest.mark.parametrize("impl, rows", [("ragged", N), ("chunked", N), ("chunked", 1), ("dense", N)])
def test_grouped_int8_equals_dequantize_then_matmul(experts_problem, impl, rows):
    """Each path on int8 values with scaled outputs == the dense reference on the dequantized float32 weights;
    one row takes the gathered path of "chunked"."""
    p = experts_problem
    args = (p["x"][:rows], p["weights"][:rows], p["experts"][:rows])
    want = experts_dense(*args, *p["deq"], jnp.float32)
    if impl == "dense":
        got = experts_dense(*args, *p["q"], jnp.float32, scales=p["scales"])
    else:
        got = experts_grouped(*args, *p["q"], jnp.float32, impl, scales=p["scales"])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    full = experts_dense(*args, *(jnp.asarray(p["w"][n]) for n in ("w1", "w3", "w2")), jnp.float32)
    assert float(jnp.abs(got - full).max()) > 1e-4  # the int8 values were used, not the float weights


@pytest.mark.parametrize("contract", [1, 2])
def test_projection_through_qwix_equals_dequantize_then_matmul(contract):
    rng = np.random.default_rng(contract)
    w = rng.normal(size=(4, 6, 10)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(2, 3) + w.shape[:contract]), jnp.float32)
    q, s = quantize(w, 0, contract)
    got = matmul(x, jnp.asarray(q), contract, jnp.float32, scale=jnp.asarray(s))
    want = matmul(x, jnp.asarray(dequantize(q, s, 0, contract)), contract, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _float_expert_weights(hlo: str, cfg, mesh) -> set[str]:
    """Floating-point arrays of optimized HLO text shaped like one device's expert weights: trailing axes
    [E / expert, D, I / tensor] or [E / expert, I / tensor, D], after any leading ones (stacked periods)."""
    e, i = cfg.num_local_experts // mesh.shape["expert"], cfg.intermediate_size // mesh.shape["tensor"]
    d = cfg.hidden_size
    return set(re.findall(rf"\b(?:bf16|f16|f32)\[(?:\d+,)*{e},(?:{d},{i}|{i},{d})\]", hlo))


@pytest.mark.parametrize("mesh_spec, batch", [("tensor=4", 1), ("expert=2,tensor=2", 2)])
def test_tpu_decode_step_holds_no_float_copy_of_int8_experts(monkeypatch, mesh_spec, batch):
    """The decode step as `m1 aot` compiles it for TPU (ragged_dot; expert-parallel with expert=2): with int8
    experts no floating-point array of an expert weight's shape (a dequantized copy of one layer's weights, or
    of all periods' hoisted out of the layer scan) is in the optimized program. With bf16 weights the same
    pattern finds the weights' per-layer slices."""
    pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed for TPU AOT compilation")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    cfg = tiny_config(intermediate_size=96)  # the expert width differs from the hidden size: two distinct layouts
    mesh = sharding.make_mesh(mesh_spec, aot.topology_devices("v5e:2x2"))

    def optimized(quantize) -> str:
        kw = {"param_dtype": jnp.bfloat16, "dtype": jnp.bfloat16, "quantize": quantize}
        with tpu_target():
            lowered, _ = aot.lower_step(cfg, mesh, "decode", batch=batch, seq_len=1, context=128, model_kw=kw,
                                        run=RunConfig())
            return lowered.compile().as_text()

    assert _float_expert_weights(optimized(QuantConfig()), cfg, mesh) == set()
    if mesh_spec == "tensor=4":
        assert _float_expert_weights(optimized(None), cfg, mesh)


@pytest.fixture(scope="module")
def tiny_int8():
    cfg = tiny_config()
    return cfg, quantize_model(init_model(cfg, seed=1), QuantConfig(attention=True))


def test_state_layout_is_what_the_converter_writes(tiny_int8):
    """stored_arrays (no JAX: the converter, m1 info) == the quantized model's state, shapes and dtypes."""
    cfg, model = tiny_int8
    state = {p: (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
             for p, v in nnx.to_flat_state(nnx.state(model))}
    for qc in (QuantConfig(), QuantConfig(attention=True)):
        abstract = {p: (tuple(v.get_value().shape), np.dtype(v.get_value().dtype))
                    for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg, quantize=qc)))}
        assert abstract == {p: (s, d) for p, (s, d, _) in stored_arrays(cfg, np.float32, qc).items()}
    assert state == abstract  # quantize_model's result has the layout of a model built so quantized
    assert state[("periods", "layers", 0, "block_sparse_moe", "w1")][1] == np.int8
    assert state[("periods", "layers", 0, "block_sparse_moe", "w1_scale")] == ((1, 4, 64), np.float32)
    assert weight_bytes(cfg, "bfloat16", "int8") < weight_bytes(cfg, "bfloat16")


def test_sharded_int8_model_equals_one_device(tiny_int8):
    cfg, model = tiny_int8
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 9)), jnp.int32)
    one = np.asarray(model(ids))
    sharded = sharding.shard_model(model, "data=1,fsdp=2,expert=2,tensor=2")
    w1 = sharded.periods.layers[0].block_sparse_moe.w1.get_value()
    assert w1.dtype == jnp.int8 and len(w1.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded(ids)), one, rtol=0, atol=2e-5)


def test_quantize_model_refuses_other_options(tiny_int8):
    _, model = tiny_int8
    assert quantize_model(model, QuantConfig(attention=True)) is model
    with pytest.raises(QuantizeError, match="quantized already"):
        quantize_model(model, "int8")
    with pytest.raises(QuantizeError, match="quantize must be None or 'int8', got 'int4'"):
        m1_jax.from_pretrained("nowhere", quantize="int4")


def test_golden_int8_experts_agree_with_full_precision(golden_dir):
    ids = jnp.asarray(np.load(golden_dir / "inputs.npz")["input_ids"])
    ref = np.asarray(m1_jax.from_pretrained(golden_dir)(ids))
    model = m1_jax.from_pretrained(golden_dir, quantize="int8")
    assert model.periods.layers[0].block_sparse_moe.w2.get_value().dtype == jnp.int8
    got = np.asarray(model(ids))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.01  # quantized (not equal), and close: 0.29% measured
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.99


def test_convert_int8_round_trip(golden_dir, tmp_path):
    """`m1 convert --quantize int8` (+ --verify) == quantizing the same bf16 checkpoint on load, bit for bit; the
    checkpoint restores int8 with and without quantize=, verifies its checksums, and export refuses it."""
    dst = tmp_path / "int8"
    summary = convert(golden_dir / "sharded", dst, quantize="int8", verify=True, progress=False)
    assert summary["quantize"] == {"weights": "int8", "attention": False}
    assert summary["verify"]["logits_max_abs_diff"] == 0.0
    arrays = converted_arrays(dst)
    assert arrays["periods.layers.0.block_sparse_moe.w1.value"].dtype == np.int8
    loaded = m1_jax.from_pretrained(golden_dir / "sharded", quantize="int8")
    for p, v in nnx.to_flat_state(nnx.state(loaded)):
        name = ".".join(map(str, p)) + ".value"
        np.testing.assert_array_equal(arrays[name], np.asarray(v.get_value()), err_msg=name)
    restored = m1_jax.from_pretrained(dst, verify=True)
    assert restored.quantize == QuantConfig()
    with pytest.raises(QuantizeError, match="stored in int8"):
        m1_jax.from_pretrained(dst, quantize=QuantConfig(attention=True))
    with pytest.raises(CheckpointError, match="stored in int8"):
        export(dst, tmp_path / "hf", progress=False)


def test_cli_quantize_flags(golden_dir, capsys):
    p = argparse.ArgumentParser()
    runtime.add_model_arguments(p)
    model = runtime.load_model(p.parse_args([str(golden_dir), "--quantize", "int8", "--quantize-attention"]))
    assert model.quantize == QuantConfig(attention=True)
    with pytest.raises(ValueError, match="--quantize-attention needs --quantize int8"):
        runtime.load_model(p.parse_args([str(golden_dir), "--quantize-attention"]))
    assert m1_jax.cli.main(["info", "tiny"]) == 0
    assert "weight bytes          bf16 " in capsys.readouterr().out
