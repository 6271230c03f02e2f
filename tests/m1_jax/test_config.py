"""M1Config: both config.json spellings, round trip, and one clear error per bad field."""

import json

import pytest

from m1_jax.config import ConfigError, M1Config, m1_layer_types
from m1_jax.presets import RUN_CONFIG_PREFIXES, preset_names

LAYER_NAMES = {0: "linear_attention", 1: "full_attention"}
ORIG_TO_NATIVE = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}


@pytest.fixture
def orig(golden_dir):
    """The original MiniMax-M1 config.json of the golden case (rotary_dim 8 of head_dim 16)."""
    return json.loads((golden_dir / "config.json").read_text())


def native_from_orig(d):
    """The same architecture as transformers' native MiniMaxConfig would write it (docs/model.md §1.3)."""
    skip = {"attn_type_list", "rotary_dim", "rope_theta", "postnorm", "shared_intermediate_size",
            "shared_moe_mode", "auto_map", *ORIG_TO_NATIVE}
    n = {k: v for k, v in d.items() if k not in skip}
    n["model_type"] = "minimax"
    n["layer_types"] = [LAYER_NAMES[c] for c in d["attn_type_list"]]
    for o, nat in ORIG_TO_NATIVE.items():
        n[nat] = d[o]
    n["rope_parameters"] = {"rope_type": "default", "rope_theta": float(d["rope_theta"]),
                            "partial_rotary_factor": d["rotary_dim"] / d["head_dim"]}
    return n


def test_original_and_native_names_read_the_same(orig):
    a = M1Config.from_dict(orig)
    b = M1Config.from_dict(native_from_orig(orig))
    assert a.model_type == "minimax_m1" and b.model_type == "minimax"
    assert a == b.replace(model_type="minimax_m1")
    # The values really came from the file, not from the M1 defaults.
    assert a.hidden_size == 48 and a.rotary_dim == 8 and a.layer_types == (
        "linear_attention", "full_attention", "linear_attention", "full_attention")
    assert a.mlp_alpha == orig["layernorm_mlp_alpha"] != 1.0


def test_native_defaults_rotate_the_whole_head(orig):
    n = native_from_orig(orig)
    del n["rope_parameters"]["partial_rotary_factor"]
    assert M1Config.from_dict(n).rotary_dim == orig["head_dim"]


@pytest.mark.parametrize("cfg", [
    M1Config(),
    M1Config(vocab_size=97, hidden_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
             head_dim=12, intermediate_size=24, num_local_experts=3, num_experts_per_tok=1,
             layer_types=("full_attention", "linear_attention", "linear_attention"), rotary_dim=6,
             rope_theta=1e4, full_attn_alpha=2.0, linear_attn_beta=0.5, mlp_alpha=1.5, block_size=5,
             bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6),
], ids=["m1", "odd"])
def test_to_dict_round_trips(cfg, tmp_path):
    assert M1Config.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert M1Config.from_json(tmp_path) == cfg


def test_presets_read(configs_dir):
    m1 = M1Config.from_json(configs_dir / "minimax-m1-40k.json")
    assert m1.layer_types == m1_layer_types(80) and m1.rotary_dim == 64 and m1.block_size == 256
    names = preset_names()
    assert "tiny" in names and not any(n.startswith(RUN_CONFIG_PREFIXES) for n in names)
    for name in names:
        M1Config.from_json(configs_dir / f"{name}.json")


def _err(d, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        M1Config.from_json(path)
    msg = str(e.value)
    assert str(path) in msg, msg  # every message names the file ...
    assert len(msg.splitlines()) == 1, msg
    return msg


@pytest.mark.parametrize("change,field", [
    ({"postnorm": False}, "'postnorm'"),
    ({"shared_intermediate_size": 64}, "'shared_intermediate_size'"),
    ({"shared_intermediate_size": [0, 64]}, "'shared_intermediate_size'"),
    ({"num_key_value_heads": 3}, "'num_key_value_heads'"),
    ({"rotary_dim": 7}, "'rotary_dim'"),
    ({"rotary_dim": 18}, "'rotary_dim'"),
    ({"rotary_dim": 0}, "'rotary_dim'"),
    ({"attn_type_list": [0, 2, 0, 1]}, "'attn_type_list'"),
    ({"attn_type_list": [0, 1, 0]}, "'attn_type_list'"),
    ({"attn_type_list": 1}, "'attn_type_list'"),
    ({"num_experts_per_tok": 5}, "'num_experts_per_tok'"),
    ({"hidden_act": "gelu"}, "'hidden_act'"),
    ({"tie_word_embeddings": True}, "'tie_word_embeddings'"),
    ({"head_dim": -16}, "'head_dim'"),
    ({"sliding_window": 4096}, "'sliding_window'"),
])
def test_bad_original_config(orig, tmp_path, change, field):
    msg = _err({**orig, **change}, tmp_path)
    assert f"field {field}" in msg, msg  # ... and the field


@pytest.mark.parametrize("missing", ["hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
                                     "attn_type_list"])
def test_missing_field(orig, tmp_path, missing):
    d = dict(orig)
    del d[missing]
    assert f"field '{missing}'" in _err(d, tmp_path)


@pytest.mark.parametrize("change,field", [
    ({"layer_types": ["linear_attention", "mamba", "linear_attention", "full_attention"]}, "'layer_types'"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "'layer_types'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e7}}, "'rope_parameters'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 1.5}},
     "'rotary_dim'"),
])
def test_bad_native_config(orig, tmp_path, change, field):
    msg = _err({**native_from_orig(orig), **change}, tmp_path)
    assert f"field {field}" in msg, msg


def test_unreadable_config_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        M1Config.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: expected a JSON object"):
        M1Config.from_json(bad)
    with pytest.raises(ConfigError, match=r"nope\.json: no such config file"):
        M1Config.from_json(tmp_path / "nope.json")
    empty_dir = tmp_path / "ckpt"
    empty_dir.mkdir()
    with pytest.raises(ConfigError, match=r"ckpt/config\.json: no such config file"):
        M1Config.from_json(empty_dir)


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match="field 'layer_types'"):
        M1Config(num_hidden_layers=3)  # default layer_types has 80 entries


def test_package_exports_load_on_first_use():
    """Light submodules import without JAX; public names resolve lazily, ``m1_jax.generate`` is the function."""
    import subprocess
    import sys

    code = ("import sys, m1_jax.config, m1_jax.checkpoint_io.safetensors_io; assert 'jax' not in sys.modules; "
            "import m1_jax.generation; from m1_jax.generation import Generation; import m1_jax; "
            "assert callable(m1_jax.generate) and m1_jax.generate.__name__ == 'generate'; "
            "from m1_jax import generate, from_pretrained, M1Config; assert generate is m1_jax.generate; "
            "assert sorted(m1_jax.__all__) == m1_jax.__all__ and all(hasattr(m1_jax, n) for n in m1_jax.__all__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("change,field", [
    ({"layernorm_mlp_alpha": NAN}, "'layernorm_mlp_alpha'"),
    ({"layernorm_full_attention_alpha": INF}, "'layernorm_full_attention_alpha'"),
    ({"layernorm_linear_attention_beta": "1.0"}, "'layernorm_linear_attention_beta'"),
    ({"layernorm_mlp_beta": 0}, "'layernorm_mlp_beta'"),
    ({"layernorm_mlp_alpha": True}, "'layernorm_mlp_alpha'"),
    ({"num_attention_heads": 0}, "'num_attention_heads'"),
    ({"num_attention_heads": 0, "head_dim": None}, "'num_attention_heads'"),  # head_dim from hidden / heads
    ({"num_attention_heads": "4"}, "'num_attention_heads'"),
    ({"num_hidden_layers": "4"}, "'num_hidden_layers'"),
    ({"num_hidden_layers": 4.0}, "'num_hidden_layers'"),
    ({"hidden_size": True}, "'hidden_size'"),
    ({"hidden_size": None}, "'hidden_size'"),
    ({"vocab_size": [512]}, "'vocab_size'"),
    ({"head_dim": "16"}, "'head_dim'"),
    ({"head_dim": 0}, "'head_dim'"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads'"),
    ({"num_local_experts": True}, "'num_local_experts'"),
    ({"num_experts_per_tok": 0}, "'num_experts_per_tok'"),
    ({"intermediate_size": -32}, "'intermediate_size'"),
    ({"rope_scaling": [1, 2]}, "'rope_scaling'"),
    ({"rope_scaling": {"rope_type": "default", "factor": 2.0}, "rope_theta": "1e7"}, "'rope_theta'"),
    ({"rope_theta": "1e7"}, "'rope_theta'"),
    ({"rope_theta": NAN}, "'rope_theta'"),
    ({"rope_theta": INF}, "'rope_theta'"),
    ({"rope_theta": 0}, "'rope_theta'"),
    ({"rope_theta": True}, "'rope_theta'"),
    ({"rotary_dim": 8.0}, "'rotary_dim'"),
    ({"rotary_dim": "8"}, "'rotary_dim'"),
    ({"rms_norm_eps": NAN}, "'rms_norm_eps'"),
    ({"rms_norm_eps": "1e-5"}, "'rms_norm_eps'"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings'"),
    ({"max_position_embeddings": 1e9}, "'max_position_embeddings'"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings'"),
    ({"hidden_act": 1}, "'hidden_act'"),
    ({"router_aux_loss_coef": -0.001}, "'router_aux_loss_coef'"),
    ({"router_aux_loss_coef": NAN}, "'router_aux_loss_coef'"),
    ({"router_jitter_noise": INF}, "'router_jitter_noise'"),
    ({"initializer_range": -0.02}, "'initializer_range'"),
    ({"initializer_range": "0.02"}, "'initializer_range'"),
    ({"bos_token_id": 512}, "'bos_token_id'"),
    ({"eos_token_id": "2"}, "'eos_token_id'"),
    ({"eos_token_id": [1.5]}, "'eos_token_id'"),
    ({"pad_token_id": -1}, "'pad_token_id'"),
    ({"block_size": 0}, "'block_size'"),
    ({"block_size": 2.5}, "'block_size'"),
    ({"block": "16"}, "'block'"),
    ({"attn_type_list": [0, True, 0, 1]}, "'attn_type_list'"),
    ({"shared_intermediate_size": [0, "a"]}, "'shared_intermediate_size'"),
    ({"model_type": 5}, "'model_type'"),
])
def test_bad_field_values_name_the_field(orig, tmp_path, change, field):
    """Wrong types (bools are not numbers), non-finite or out-of-range values: one line naming file and field."""
    msg = _err({**orig, **change}, tmp_path)
    assert f"field {field}" in msg, msg


@pytest.mark.parametrize("change,field", [
    ({"mlp_alpha_factor": NAN}, "'mlp_alpha_factor'"),
    ({"full_attn_beta_factor": None}, "'full_attn_beta_factor'"),
    ({"rope_parameters": "default"}, "'rope_parameters'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "'rope_parameters.rope_theta'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": "half"}},
     "'rope_parameters.partial_rotary_factor'"),
    ({"layer_types": 4}, "'layer_types'"),
    ({"layer_types": "linear_attention"}, "'layer_types'"),
])
def test_bad_native_field_values_name_the_field(orig, tmp_path, change, field):
    msg = _err({**native_from_orig(orig), **change}, tmp_path)
    assert f"field {field}" in msg, msg


def test_real_token_ids_and_number_spellings_are_kept(orig):
    """What configs in the wild write stays accepted: integer-valued floats for float fields, an eos list."""
    cfg = M1Config.from_dict({**orig, "rope_theta": 10000, "rms_norm_eps": 1e-6, "eos_token_id": [3, 4],
                              "bos_token_id": 1, "pad_token_id": 0, "layernorm_mlp_beta": 2})
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (1e4, 3, 1, 0)
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.mlp_beta, float) and cfg.mlp_beta == 2.0


@pytest.mark.parametrize("kw,field", [
    ({"mlp_alpha": NAN}, "mlp_alpha"),
    ({"full_attn_beta": -1.0}, "full_attn_beta"),
    ({"num_hidden_layers": True, "layer_types": ("full_attention",)}, "num_hidden_layers"),
    ({"rope_theta": "1e4"}, "rope_theta"),
    ({"lightning_norm_eps": INF}, "lightning_norm_eps"),
    ({"layer_types": ("full_attention",) * 79 + (1,)}, "layer_types"),
])
def test_direct_construction_checks_every_field(kw, field):
    with pytest.raises(ConfigError, match=f"^config: field '{field}': "):
        M1Config(**kw)


def test_cache_byte_counts_need_no_jax():
    """Lightning state and KV cache sizes from the config alone (``m1 info``, cache planning)."""
    import ml_dtypes
    import numpy as np

    from m1_jax.config import describe, kv_cache_bytes, lightning_state_bytes

    m1 = M1Config()  # 70 lightning layers, 10 softmax layers, 64 heads x 128, 8 KV heads
    assert lightning_state_bytes(m1) == 70 * 64 * 128 * 128 * 4
    assert lightning_state_bytes(m1, batch=3) == 3 * lightning_state_bytes(m1)
    per_token = 2 * 10 * 8 * 128  # keys and values of every softmax layer
    assert kv_cache_bytes(m1, 1, 1, "bfloat16") == per_token * 2
    assert kv_cache_bytes(m1, 2, 1024, ml_dtypes.bfloat16) == 2 * 1024 * per_token * 2
    assert kv_cache_bytes(m1, 1, 5, np.float32) == kv_cache_bytes(m1, 1, 5) == 5 * per_token * 4
    text = describe(m1)
    assert "lightning state       280 MiB per sequence" in text
    assert "softmax KV cache      40 KiB per token (bf16)" in text
