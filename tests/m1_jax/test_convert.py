"""``m1 convert`` / ``m1 export`` against the golden checkpoints: logits, layout, round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import m1_jax
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.safetensors_io import SafetensorsCheckpoint
from m1_jax.cli import main
from m1_jax.convert.convert import convert
from m1_jax.convert.export import export
from m1_jax.convert.layout import targets
from m1_jax.convert.verify import VerificationError, verify_conversion
from m1_jax.loading import restore_model
from m1_jax.presets import CONFIG_DIR

ATOL = 1e-4  # fp32 logits (docs/model.md §5.5)


def converted_arrays(dst):
    """{orbax parameter name: np.ndarray} of every array in a converted directory."""
    state_dir = dst / mf.STATE_DIR
    meta = ow.read_metadata(str(state_dir))
    names = [".".join(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()]
    return {n: ow.open_array(str(state_dir), n, meta).read().result() for n in names}


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {"ids": jnp.asarray(np.load(golden_dir / "inputs.npz")["input_ids"]),
            "out": np.load(golden_dir / "outputs.npz")}


def _state_leaves(state) -> list[tuple[tuple, str, list, object]]:
    """The oracle for the converter's metadata: ``(tree path, orbax name, key metadata, leaf)`` of every leaf
    of ``state`` as JAX flattens it (orbax key types: 1 sequence, 2 dict)."""
    def key_name(k):
        if isinstance(k, jax.tree_util.SequenceKey):
            return str(k.idx), 1
        if isinstance(k, jax.tree_util.DictKey):
            return str(k.key), 2
        if isinstance(k, jax.tree_util.GetAttrKey):
            return k.name, 2
        raise ValueError(f"unexpected pytree key {k!r}")

    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [key_name(k) for k in keypath]
        key_md = [{"key": n, "key_type": t} for n, t in names]
        out.append((tuple(n for n, _ in names), ".".join(n for n, _ in names), key_md, leaf))
    return out


@pytest.fixture(scope="module")
def sharded_dst(golden_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "bf16"
    summary = convert(golden_dir / "sharded", dst, progress=False)
    assert summary["dtype"] == "bfloat16" and summary["tensors"] == 79
    return dst


def test_layout_is_the_models_state(sharded_dst, golden_dir):
    cfg = m1_jax.M1Config.from_json(golden_dir / "config.json")
    abstract = nnx.state(m1_jax.abstract_model(cfg, param_dtype=jnp.bfloat16))
    meta = ow.read_metadata(str(sharded_dst / mf.STATE_DIR))
    leaves = {str(names): leaf for names, _, _, leaf in _state_leaves(abstract)}
    assert set(meta["tree_metadata"]) == set(leaves)
    arrays = converted_arrays(sharded_dst)
    for names, name, _, leaf in _state_leaves(abstract):
        assert arrays[name].shape == leaf.shape and arrays[name].dtype == leaf.dtype, name
    assert arrays["periods.layers.0.block_sparse_moe.gate.value"].dtype == np.float32  # router stays fp32
    for f in ("config.json", mf.RECORD_FILE, mf.MANIFEST_FILE, mf.COMPLETE_FILE):  # the same checksums hold
        assert (sharded_dst / f).is_file()


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIG_DIR.glob("*.json")
                                           if "num_hidden_layers" in p.read_text()))
def test_param_layout_is_the_models_state_for_every_config(config):
    """The converter writes from the key table's layout alone (no JAX): it must be exactly the model's."""
    cfg = m1_jax.M1Config.from_json(CONFIG_DIR / config)
    for dtype in (jnp.bfloat16, jnp.float32):
        abstract = nnx.state(m1_jax.abstract_model(cfg, param_dtype=dtype))
        want = {names: (name, key_md, tuple(leaf.shape), np.dtype(leaf.dtype))
                for names, name, key_md, leaf in _state_leaves(abstract)}
        tgts = targets(cfg, np.dtype(dtype))
        got = {names: (name, key_md, shape, tgts[path].dtype) for (names, name, key_md, shape), path
               in zip(ow.param_entries({p: t.shape for p, t in tgts.items()}), tgts)}
        assert got == want


def test_sharded_bf16_restores_to_golden_logits(sharded_dst, golden):
    model = m1_jax.from_pretrained(sharded_dst, dtype=jnp.float32)
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model.periods.layers[0].block_sparse_moe.gate[...].dtype == jnp.float32
    logits = model(golden["ids"])
    np.testing.assert_allclose(np.asarray(logits), golden["out"]["logits_bf16_weights"], rtol=0, atol=ATOL)


def test_fp32_restores_to_golden_logits(golden_dir, golden, tmp_path):
    dst = tmp_path / "fp32"
    convert(golden_dir, dst, dtype="fp32", progress=False)
    model = m1_jax.from_pretrained(dst)
    assert model.embed_tokens[...].dtype == jnp.float32
    logits = model(golden["ids"])
    np.testing.assert_allclose(np.asarray(logits), golden["out"]["logits"], rtol=0, atol=ATOL)


def test_cli_convert_with_verify(golden_dir, tmp_path, capsys):
    dst = tmp_path / "bf16"
    assert main(["convert", str(golden_dir / "sharded"), str(dst), "--verify", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["tensors_checked"] == 79
    assert summary["verify"]["logits_max_abs_diff"] <= ATOL
    assert (dst / mf.COMPLETE_FILE).is_file()


def test_verify_finds_a_corrupted_array(golden_dir, tmp_path):
    dst = tmp_path / "bf16"
    convert(golden_dir / "sharded", dst, progress=False)
    chunk = dst / mf.STATE_DIR / "periods.layers.1.block_sparse_moe.w2.value" / "1.2.0.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"model.layers.3.block_sparse_moe.experts.2.w2.weight' -> "
                                                r"periods.layers.1.block_sparse_moe.w2\[1, 2\]: checksum"):
        verify_conversion(str(golden_dir / "sharded"), str(dst), progress=False)


def test_restore_onto_mesh(sharded_dst):
    model = restore_model(sharded_dst, mesh="data=1,fsdp=2,expert=2,tensor=2")
    w1 = model.periods.layers[0].block_sparse_moe.w1[...]
    assert len(w1.sharding.device_set) == 8
    assert w1.addressable_shards[0].data.shape != w1.shape  # really split, not replicated
    plain = converted_arrays(sharded_dst)["periods.layers.0.block_sparse_moe.w1.value"]
    assert np.asarray(jax.device_get(w1)).tobytes() == plain.tobytes()


def test_export_then_convert_round_trips_bit_for_bit(sharded_dst, golden_dir, tmp_path):
    out = tmp_path / "hf"
    summary = export(sharded_dst, out, max_shard_bytes=120_000, progress=False)
    assert summary["shards"] >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = SafetensorsCheckpoint(golden_dir / "sharded")
    exported = SafetensorsCheckpoint(out)
    assert set(index["weight_map"]) == set(source.keys()) == set(exported.keys())  # the original names
    for key in source.keys():
        a, b = source.read(key), exported.read(key)
        assert a.shape == b.shape, key
        # the exported dtype is the converted one (router gates float32): the same values, exactly
        assert np.array_equal(a.astype(b.dtype), b), key
    assert json.loads((out / "config.json").read_text()) == json.loads((golden_dir / "sharded" / "config.json").read_text())
    again = tmp_path / "again"
    convert(out, again, progress=False)
    assert_same_arrays(converted_arrays(sharded_dst), converted_arrays(again))


def test_export_reads_an_orbax_written_state(sharded_dst, tmp_path):
    """The same state saved by Orbax itself (OCDBT, as training checkpoints are) exports identically."""
    import shutil

    import orbax.checkpoint as ocp

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.json", mf.RECORD_FILE, mf.MANIFEST_FILE, mf.COMPLETE_FILE):  # the same checksums hold
        shutil.copyfile(sharded_dst / f, ckpt / f)
    with ocp.StandardCheckpointer() as saver:
        saver.save(ckpt / mf.STATE_DIR, nnx.state(restore_model(sharded_dst)))
    assert ow.read_metadata(str(ckpt / mf.STATE_DIR))["use_ocdbt"]
    export(sharded_dst, tmp_path / "a", progress=False)
    export(ckpt, tmp_path / "b", progress=False)
    a, b = SafetensorsCheckpoint(tmp_path / "a"), SafetensorsCheckpoint(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a.keys():
        assert a.read(key).tobytes() == b.read(key).tobytes(), key


def test_export_of_a_training_workdir_round_trips(trained_workdir, tmp_path, capsys):
    """`m1 export WORKDIR OUT` writes the trained model (its latest step) as a Hugging Face checkpoint."""
    out = tmp_path / "hf"
    assert main(["export", str(trained_workdir), str(out), "--no-progress", "--max-shard-size", "200KB"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] >= 2
    trained, exported = m1_jax.from_pretrained(trained_workdir), m1_jax.from_pretrained(out)
    a, b = nnx.to_flat_state(nnx.state(trained, nnx.Param)), nnx.to_flat_state(nnx.state(exported, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, x), (_, y) in zip(a, b):
        assert np.asarray(x.get_value()).tobytes() == np.asarray(y.get_value()).tobytes(), p
    cfg = json.loads((trained_workdir / "checkpoints" / "2" / "meta" / "metadata").read_text())["config"]
    assert json.loads((out / "config.json").read_text()) == cfg
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 11), dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(exported(ids)), np.asarray(trained(ids)))


def test_export_of_a_training_workdir_takes_the_runs_tokenizer(trained_workdir, tmp_path, caplog):
    import logging
    import shutil

    w = tmp_path / "w"
    shutil.copytree(trained_workdir, w)
    shutil.rmtree(w / "checkpoints" / "1")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"version": "1.0"}')
    meta_file = w / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for where, copied in [(tmp_path / "tok", True), (tmp_path / "gone", False)]:
        meta["run"]["data"]["tokenizer"] = str(where)
        meta_file.write_text(json.dumps(meta))
        out = tmp_path / f"hf-{where.name}"
        with caplog.at_level(logging.WARNING):
            export(w, out, progress=False)
        assert (out / "tokenizer.json").is_file() == copied
        assert copied or f"data.tokenizer '{where}': no such directory" in caplog.text
