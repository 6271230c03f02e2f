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
from tiny_models import NATIVE_CONFIG, fused_checkpoint, native_checkpoint

pytest.importorskip("torch", reason="torch is needed for the transformers parity test")
pytest.importorskip("transformers", reason="transformers is needed for the parity test")
pytest.importorskip("safetensors.torch")

ATOL = 1e-4  # fp32 logits (docs/model.md §5.5)
LAYER_TYPES = NATIVE_CONFIG["layer_types"]
BLOCK = NATIVE_CONFIG["block_size"]
SEQ = 23  # not a multiple of BLOCK: several full blocks and a partial one


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_checkpoint(tmp_path_factory.mktemp("native"), SEQ)


def test_save_pretrained_writes_what_we_expect(native):
    from safetensors import safe_open

    cfg = json.loads((native["dir"] / "config.json").read_text())
    assert "partial_rotary_factor" not in json.dumps(cfg)  # native rotates the whole head
    ours = m1_jax.M1Config.from_json(native["dir"])
    assert ours.rotary_dim == ours.head_dim == 12
    assert ours.layer_types == tuple(LAYER_TYPES) and ours.block_size == BLOCK
    assert ours.rope_theta == 1e7 and ours.mlp_alpha == NATIVE_CONFIG["mlp_alpha_factor"]
    with safe_open(native["dir"] / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys  # per-expert original names
    assert "model.layers.0.self_attn.slope_rate" in keys  # derived buffers, ignored by the loader


@pytest.mark.parametrize("layout", ["saved_per_expert", "fused"])
def test_logits_match_native(native, layout, tmp_path):
    path = native["dir"] if layout == "saved_per_expert" else fused_checkpoint(native, tmp_path)
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
