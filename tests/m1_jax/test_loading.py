"""from_pretrained on damaged copies of the golden sharded (bf16) checkpoint: one clear error each,
naming the file and the key; derived buffers are ignored. An `m1 train` workdir or one of its steps
loads the trained parameters (onto a mesh when given); its damaged files are named."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax import CheckpointError
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.convert.convert import convert
from m1_jax.run_config import RunConfig
from m1_jax.train_loop import load_model_config

safetensors_flax = pytest.importorskip("safetensors.flax")  # writes bfloat16 (numpy cannot)

INDEX = "model.safetensors.index.json"
ATOL = 1e-4


@pytest.fixture
def ckpt(golden_dir, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(golden_dir / "sharded", dst)
    for f in dst.iterdir():  # the shared copy is read-only
        os.chmod(f, 0o644)
    os.chmod(dst, 0o755)
    return dst


def _index(ckpt):
    return json.loads((ckpt / INDEX).read_text())


def _write_index(ckpt, index):
    (ckpt / INDEX).write_text(json.dumps(index))


def _shard_of(ckpt, key):
    return _index(ckpt)["weight_map"][key]


def _rewrite_shard(ckpt, shard, edit):
    """Reads every tensor of ``shard``, lets ``edit(dict)`` change them, writes the shard back and the index."""
    reader = SafetensorsCheckpoint(ckpt)
    tensors = {k: jnp.asarray(reader.read(k)) for k, info in reader.tensors.items()
               if os.path.basename(info.file) == shard}
    edit(tensors)
    safetensors_flax.save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    index = _index(ckpt)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    _write_index(ckpt, index)


def _load_error(ckpt) -> str:
    with pytest.raises(CheckpointError) as e:
        m1_jax.from_pretrained(ckpt)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


def test_missing_shard_file(ckpt):
    (ckpt / "model-00002-of-00004.safetensors").unlink()
    msg = _load_error(ckpt)
    assert "model-00002-of-00004.safetensors" in msg and "missing" in msg, msg


def test_truncated_shard(ckpt):
    shard = ckpt / "model-00003-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = _load_error(ckpt)
    assert "model-00003-of-00004.safetensors" in msg and "truncated" in msg, msg


def test_shard_that_is_not_safetensors(ckpt):
    (ckpt / "model-00001-of-00004.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    msg = _load_error(ckpt)
    assert "model-00001-of-00004.safetensors" in msg, msg


def test_index_names_a_tensor_the_shard_does_not_hold(ckpt):
    key = "model.layers.2.self_attn.out_proj.weight"
    index = _index(ckpt)
    right = index["weight_map"][key]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    index["weight_map"][key] = wrong
    _write_index(ckpt, index)
    msg = _load_error(ckpt)
    assert INDEX in msg and key in msg and wrong in msg, msg


def test_missing_tensor(ckpt):
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _rewrite_shard(ckpt, _shard_of(ckpt, key), lambda t: t.pop(key))
    msg = _load_error(ckpt)
    assert "missing weights" in msg and key in msg, msg


def test_wrong_shape(ckpt):
    key = "model.layers.3.self_attn.k_proj.weight"
    shard = _shard_of(ckpt, key)

    def edit(t):
        t[key] = t[key][:-1]

    _rewrite_shard(ckpt, shard, edit)
    msg = _load_error(ckpt)
    assert shard in msg and key in msg and "[31, 48]" in msg and "[32, 48]" in msg, msg


def test_unknown_extra_key(ckpt):
    key = "model.layers.0.self_attn.rotary_gate.weight"
    shard = "model-00004-of-00004.safetensors"
    _rewrite_shard(ckpt, shard, lambda t: t.update({key: jnp.ones((4, 48), jnp.bfloat16)}))
    msg = _load_error(ckpt)
    assert shard in msg and "unknown key" in msg and key in msg, msg


def test_weight_of_the_wrong_layer_type(ckpt):
    key = "model.layers.1.self_attn.qkv_proj.weight"  # layer 1 is a softmax layer
    shard = "model-00004-of-00004.safetensors"
    _rewrite_shard(ckpt, shard, lambda t: t.update({key: jnp.ones((192, 48), jnp.bfloat16)}))
    msg = _load_error(ckpt)
    assert shard in msg and key in msg and "layer 1 is full_attention" in msg, msg


def test_same_weight_under_two_names(ckpt):
    """The original per-expert name and transformers-5's fused name for the same expert weights."""
    key = "model.layers.0.mlp.experts.down_proj"
    shard = "model-00004-of-00004.safetensors"
    _rewrite_shard(ckpt, shard, lambda t: t.update({key: jnp.ones((4, 48, 32), jnp.bfloat16)}))
    msg = _load_error(ckpt)
    assert shard in msg and "already filled by" in msg and "block_sparse_moe.w2" in msg, msg


def test_derived_buffers_are_ignored(ckpt, golden_dir):
    """transformers' save_pretrained writes decay tables; they follow from the config and are skipped."""
    shard = "model-00004-of-00004.safetensors"
    extra = {"model.layers.0.self_attn.slope_rate": jnp.full((4, 1, 1), 123.0, jnp.float32),
             "model.layers.2.self_attn.diagonal_decay": jnp.full((1, 4, 16, 16), 7.0, jnp.float32),
             "model.layers.2.self_attn.query_decay": jnp.zeros((4, 16, 1), jnp.float32),
             "model.layers.2.self_attn.key_decay": jnp.zeros((4, 16, 1), jnp.float32)}
    _rewrite_shard(ckpt, shard, lambda t: t.update(extra))
    assert set(extra) <= set(SafetensorsCheckpoint(ckpt).keys())
    ids = np.load(golden_dir / "inputs.npz")["input_ids"]
    ref = np.load(golden_dir / "outputs.npz")["logits_bf16_weights"]
    np.testing.assert_allclose(np.asarray(m1_jax.from_pretrained(ckpt)(jnp.asarray(ids))), ref, rtol=0, atol=ATOL)


def test_not_a_directory_and_no_config(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint directory"):
        m1_jax.from_pretrained(tmp_path / "nowhere")
    (ckpt / "config.json").unlink()
    with pytest.raises(m1_jax.ConfigError, match=r"config\.json: no such config file"):
        m1_jax.from_pretrained(ckpt)


# ----------------------------------------------------------------------------- `m1 train` workdirs
def params_of(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_a_training_workdir_loads_its_latest_step(trained_workdir):
    final = dict(np.load(trained_workdir.parent / "final_params.npz"))
    model = m1_jax.from_pretrained(trained_workdir)
    got = params_of(model)
    assert got.keys() == final.keys()
    for k in final:
        np.testing.assert_array_equal(got[k], final[k], err_msg=k)
    assert model.cfg == m1_jax.M1Config.from_dict(
        json.loads((trained_workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())["config"])
    step2 = params_of(m1_jax.from_pretrained(trained_workdir / "checkpoints" / "2"))
    step1 = params_of(m1_jax.from_pretrained(trained_workdir / "checkpoints" / "1", param_dtype=jnp.bfloat16))
    assert all(np.array_equal(step2[k], final[k]) for k in final)
    assert step1["embed_tokens"].dtype == jnp.bfloat16
    assert not np.array_equal(step1["embed_tokens"].astype(np.float32), final["embed_tokens"])  # an earlier step


def test_checkpoints_load_by_relative_path(trained_workdir, golden_dir, tmp_path, monkeypatch):
    """A path relative to the working directory, as a user types it (Orbax itself takes absolute paths)."""
    final = dict(np.load(trained_workdir.parent / "final_params.npz"))
    monkeypatch.chdir(trained_workdir.parent)
    got = params_of(m1_jax.from_pretrained(trained_workdir.name))
    assert all(np.array_equal(got[k], final[k]) for k in final)
    convert(golden_dir, tmp_path / "conv", progress=False)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(params_of(m1_jax.from_pretrained("conv"))["embed_tokens"],
                                  params_of(m1_jax.from_pretrained(golden_dir))["embed_tokens"])


def test_a_training_checkpoint_restores_onto_a_mesh(trained_workdir):
    model = m1_jax.from_pretrained(trained_workdir, mesh="data=1,fsdp=2,expert=2,tensor=2")
    w1 = model.periods.layers[0].block_sparse_moe.w1[...]
    assert len(w1.sharding.device_set) == 8 and w1.addressable_shards[0].data.shape != w1.shape
    final = np.load(trained_workdir.parent / "final_params.npz")
    np.testing.assert_array_equal(np.asarray(w1), final["periods/layers/0/block_sparse_moe/w1"])
    assert model.mesh is not None


def test_training_checkpoint_errors_name_the_file(trained_workdir, tmp_path):
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)  # a run that has not saved yet
    msg = _load_error(tmp_path / "fresh")
    assert f"{tmp_path}/fresh/checkpoints: no checkpoint saved yet" in msg, msg
    w = tmp_path / "w"
    shutil.copytree(trained_workdir, w)
    (w / "checkpoints" / "2" / "meta" / "metadata").write_text("{")
    msg = _load_error(w)
    assert f"{w}/checkpoints/2/meta/metadata: not valid JSON" in msg, msg
    (w / "checkpoints" / "1" / "state" / "_METADATA").write_text("")
    msg = _load_error(w / "checkpoints" / "1")
    assert f"{w}/checkpoints/1/state/_METADATA: not valid JSON" in msg, msg
    shutil.rmtree(w)
    shutil.copytree(trained_workdir, w)
    for f in (w / "checkpoints" / "2" / "state").glob("ocdbt.process_*/d/*"):
        os.truncate(f, f.stat().st_size // 2)
    msg = _load_error(w)
    assert f"{w}/checkpoints/2/state: cannot be restored (" in msg, msg


def test_a_fine_tune_can_start_from_a_training_workdir(trained_workdir):
    """`m1 train --init-from WORKDIR` reads the model config where from_pretrained finds the weights."""
    assert load_model_config(RunConfig(), str(trained_workdir)) == m1_jax.from_pretrained(trained_workdir).cfg
