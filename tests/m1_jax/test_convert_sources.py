"""``m1 convert`` from PyTorch ``.bin`` files and from transformers-5 ``save_pretrained`` checkpoints."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_convert import assert_same_arrays, converted_arrays
from tiny_models import fused_checkpoint, native_checkpoint

import m1_jax
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.convert.convert import convert

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


pytest.importorskip("transformers", reason="transformers writes the transformers-5 checkpoint")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_checkpoint(tmp_path_factory.mktemp("native"), 11)


def test_transformers5_checkpoint_converts(native, tmp_path):
    dst = tmp_path / "dst"
    convert(native["dir"], dst, progress=False)
    assert (dst / mf.COMPLETE_FILE).is_file()
    model = m1_jax.from_pretrained(dst)
    logits = model(jnp.asarray(native["ids"]))
    np.testing.assert_allclose(np.asarray(logits), native["logits"], rtol=0, atol=ATOL)

    # transformers-5's in-memory names (experts fused: gate_up_proj / down_proj) give the same arrays
    convert(fused_checkpoint(native, tmp_path / "fused"), tmp_path / "from_fused", progress=False)
    assert_same_arrays(converted_arrays(tmp_path / "from_fused"), converted_arrays(dst))
