"""The model against the original MiniMax-M1 code's outputs (tests/data/golden/caseA)."""

import jax.numpy as jnp
import numpy as np
import pytest

import m1_jax

ATOL = 1e-4  # fp32 logits (docs/model.md §5.5)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {
        "ids": np.load(golden_dir / "inputs.npz")["input_ids"],
        "out": np.load(golden_dir / "outputs.npz"),
        "inter": np.load(golden_dir / "intermediates.npz"),
    }


@pytest.fixture(scope="module")
def model(golden_dir):
    return m1_jax.from_pretrained(golden_dir)


def test_fp32_logits_and_layers(model, golden):
    out = model.forward(jnp.asarray(golden["ids"]), collect=True)
    logits = out.logits
    assert logits.dtype == jnp.float32
    assert logits.shape == golden["out"]["logits"].shape
    np.testing.assert_allclose(np.asarray(logits), golden["out"]["logits"], rtol=0, atol=ATOL)
    layer_out = np.asarray(out.layer_outputs)
    for layer in range(layer_out.shape[0]):
        np.testing.assert_allclose(layer_out[layer], golden["inter"]["layer_out"][layer], rtol=0, atol=ATOL,
                                   err_msg=f"layer {layer}")


def test_greedy_full_sequence(model, golden):
    out = golden["out"]
    logits = model(jnp.asarray(out["greedy_full_seq_ids"]))
    np.testing.assert_allclose(np.asarray(logits), out["greedy_full_seq_logits"], rtol=0, atol=ATOL)


def test_bf16_sharded_checkpoint(golden_dir, golden):
    model = m1_jax.from_pretrained(golden_dir / "sharded", dtype=jnp.float32)
    assert model.embed_tokens[...].dtype == jnp.bfloat16  # loaded as stored
    assert model.periods.layers[0].block_sparse_moe.gate[...].dtype == jnp.float32  # router stays fp32
    logits = model(jnp.asarray(golden["ids"]))
    np.testing.assert_allclose(np.asarray(logits), golden["out"]["logits_bf16_weights"], rtol=0, atol=ATOL)


def test_slopes_match_original(golden, golden_dir):
    from m1_jax.model import period_slopes

    cfg = m1_jax.M1Config.from_json(golden_dir / "config.json")
    ours = period_slopes(cfg).reshape(cfg.num_hidden_layers, -1)
    ref = golden["out"]["slope_rate_per_layer"]
    for layer, t in enumerate(cfg.layer_types):
        if t == "linear_attention":
            np.testing.assert_allclose(ours[layer], ref[layer], rtol=1e-6)
