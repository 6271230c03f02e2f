"""The model against transformers' native ``MiniMaxForCausalLM`` on a tiny random config.

Native rotates the whole head (docs/model.md §5.4), so its config.json carries no partial rotary factor and
our reader must give ``rotary_dim == head_dim``. Native's slope factor has an extra ``+1e-5`` in a
denominator; with the last layer a softmax layer the difference is ~1e-7 relative, far below the
tolerance. Both weight layouts are loaded: the per-expert original names that ``save_pretrained``
writes, and transformers-5's fused ``mlp.experts.gate_up_proj`` / ``down_proj``.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import m1_jax

torch = pytest.importorskip("torch", reason="torch is needed for the transformers parity test")
transformers = pytest.importorskip("transformers", reason="transformers is needed for the parity test")
safetensors_torch = pytest.importorskip("safetensors.torch")

ATOL = 1e-4  # fp32 logits (docs/model.md §5.5)
ALPHA = 3.5565588200778455
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
BLOCK = 5
SEQ = 23  # not a multiple of BLOCK: several full blocks and a partial one


def _native_model():
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMaxForCausalLM")
    cfg = transformers.MiniMaxConfig(
        vocab_size=97, hidden_size=40, intermediate_size=24, num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,  # 4 * 12 != 40
        num_local_experts=4, num_experts_per_tok=2, layer_types=LAYER_TYPES, block_size=BLOCK,
        full_attn_alpha_factor=ALPHA, full_attn_beta_factor=1.0, linear_attn_alpha_factor=ALPHA,
        linear_attn_beta_factor=1.0, mlp_alpha_factor=ALPHA, mlp_beta_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7}, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=256,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(cfg).float().eval()
    with torch.no_grad():  # norm weights away from 1, so a norm applied wrongly shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    model = _native_model()
    out = tmp_path_factory.mktemp("native")
    model.save_pretrained(out)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().numpy()
    return {"model": model, "dir": out, "ids": ids.numpy(), "logits": logits}


def _fused_checkpoint(native, tmp_path):
    """The same weights under transformers-5's in-memory names: ``.mlp.``, experts fused and stacked."""
    sd = {k: v.detach().clone().contiguous() for k, v in native["model"].state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    safetensors_torch.save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((native["dir"] / "config.json").read_text())
    return tmp_path


def test_save_pretrained_writes_what_we_expect(native):
    from safetensors import safe_open

    cfg = json.loads((native["dir"] / "config.json").read_text())
    assert "partial_rotary_factor" not in json.dumps(cfg)  # native rotates the whole head
    ours = m1_jax.M1Config.from_json(native["dir"])
    assert ours.rotary_dim == ours.head_dim == 12
    assert ours.layer_types == tuple(LAYER_TYPES) and ours.block_size == BLOCK
    assert ours.rope_theta == 1e7 and ours.mlp_alpha == ALPHA
    with safe_open(native["dir"] / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys  # per-expert original names
    assert "model.layers.0.self_attn.slope_rate" in keys  # derived buffers, ignored by the loader


@pytest.mark.parametrize("layout", ["saved_per_expert", "fused"])
def test_logits_match_native(native, layout, tmp_path):
    path = native["dir"] if layout == "saved_per_expert" else _fused_checkpoint(native, tmp_path)
    model = m1_jax.from_pretrained(path, dtype=jnp.float32)
    assert model.cfg.rotary_dim == model.cfg.head_dim
    logits = np.asarray(model(jnp.asarray(native["ids"])))
    ref = native["logits"]
    # The logits are O(1), so atol 1e-4 is a meaningful check (a small std would make it vacuous).
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(logits, ref, rtol=0, atol=ATOL)


def test_partial_rotary_factor_is_read(native, tmp_path):
    """``rope_parameters.partial_rotary_factor`` (the VL-01 port's spelling of M1's rotary_dim)."""
    cfg = json.loads((native["dir"] / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    assert m1_jax.M1Config.from_dict(cfg).rotary_dim == 6
