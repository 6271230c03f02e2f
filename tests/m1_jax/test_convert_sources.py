"""``m1 convert`` from PyTorch ``.bin`` files and from transformers-5 ``save_pretrained`` checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import m1_jax
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.convert.convert import convert
from test_convert import assert_same_arrays, converted_arrays

torch = pytest.importorskip("torch", reason="torch (the [torch] extra) reads .bin checkpoints")

ATOL = 1e-4  # fp32 logits (docs/model.md §5.5)


def _to_torch(x: np.ndarray):
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


@pytest.fixture(scope="module")
def bin_dir(golden_dir, tmp_path_factory):
    """The bf16 golden weights as two PyTorch .bin shards with an index."""
    out = tmp_path_factory.mktemp("bin")
    src = SafetensorsCheckpoint(golden_dir / "sharded")
    keys = src.keys()
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: _to_torch(src.read(k)) for k in part}, out / name)
        weight_map.update({k: name for k in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text((golden_dir / "sharded" / "config.json").read_text())
    return out


def test_torch_bin_converts_like_safetensors(bin_dir, golden_dir, tmp_path):
    convert(bin_dir, tmp_path / "from_bin", progress=False)
    convert(golden_dir / "sharded", tmp_path / "from_st", progress=False)
    assert_same_arrays(converted_arrays(tmp_path / "from_bin"), converted_arrays(tmp_path / "from_st"))


def test_truncated_torch_bin(bin_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(bin_dir, src)
    name = "pytorch_model-00002-of-00002.bin"
    data = (src / name).read_bytes()
    (src / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{name}: cannot read PyTorch checkpoint"):
        convert(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


transformers = pytest.importorskip("transformers", reason="transformers writes the transformers-5 checkpoint")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMaxForCausalLM")
    alpha = 3.5565588200778455
    cfg = transformers.MiniMaxConfig(
        vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"] * 2, block_size=4,
        full_attn_alpha_factor=alpha, full_attn_beta_factor=1.0, linear_attn_alpha_factor=alpha,
        linear_attn_beta_factor=1.0, mlp_alpha_factor=alpha, mlp_beta_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7}, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=128,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("native")
    model.save_pretrained(out)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().numpy()
    return {"model": model, "dir": out, "ids": ids.numpy(), "logits": logits}


def test_transformers5_checkpoint_converts(native, tmp_path):
    dst = tmp_path / "dst"
    convert(native["dir"], dst, progress=False)
    assert (dst / mf.COMPLETE_FILE).is_file()
    model = m1_jax.from_pretrained(dst)
    logits = model(jnp.asarray(native["ids"]))
    np.testing.assert_allclose(np.asarray(logits), native["logits"], rtol=0, atol=ATOL)

    # transformers-5's in-memory names (experts fused: gate_up_proj / down_proj) give the same arrays
    from safetensors.torch import save_file

    fused = tmp_path / "fused"
    fused.mkdir()
    sd = {k: v.detach().clone().contiguous() for k, v in native["model"].state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    save_file(sd, str(fused / "model.safetensors"), metadata={"format": "pt"})
    (fused / "config.json").write_text((native["dir"] / "config.json").read_text())
    convert(fused, tmp_path / "from_fused", progress=False)
    assert_same_arrays(converted_arrays(tmp_path / "from_fused"), converted_arrays(dst))
