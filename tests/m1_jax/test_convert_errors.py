"""``m1 convert`` on bad input and interrupted runs: clear errors, nothing marked complete, exact resume."""

import json
import os
import shutil

import numpy as np
import pytest
from test_convert import assert_same_arrays, converted_arrays

import m1_jax
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.checkpoint_io.sources import open_source
from m1_jax.cli import main
from m1_jax.config import M1Config
from m1_jax.convert import convert as convert_mod
from m1_jax.convert.convert import convert
from m1_jax.convert.layout import plan_all, targets

SHARD3 = "model-00003-of-00004.safetensors"


@pytest.fixture
def src(golden_dir, tmp_path):
    """A writable copy of the bf16 sharded golden checkpoint."""
    out = tmp_path / "src"
    shutil.copytree(golden_dir / "sharded", out)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


@pytest.fixture(scope="module")
def clean(golden_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("clean") / "out"
    convert(golden_dir / "sharded", dst, progress=False)
    return converted_arrays(dst)


def assert_fails(src, dst, match, **kw):
    with pytest.raises(CheckpointError, match=match):
        convert(src, dst, progress=False, **kw)
    assert not (dst / mf.COMPLETE_FILE).exists()


def _index(src):
    return json.loads((src / "model.safetensors.index.json").read_text())


def test_missing_shard(src, tmp_path):
    (src / SHARD3).unlink()
    assert_fails(src, tmp_path / "dst", f"{SHARD3}: shard file is missing")
    assert not (tmp_path / "dst").exists()  # checked before anything is written


def test_truncated_shard(src, tmp_path):
    data = (src / SHARD3).read_bytes()
    (src / SHARD3).write_bytes(data[: len(data) - 100])
    assert_fails(src, tmp_path / "dst", f"{SHARD3}: truncated")


def test_index_names_a_missing_tensor(src, tmp_path):
    index = _index(src)
    index["weight_map"]["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = SHARD3
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(src, tmp_path / "dst", r"names tensor 'model.layers.0.block_sparse_moe.experts.9.w1.weight'")


def test_shape_not_matching_the_config(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 16
    (src / "config.json").write_text(json.dumps(cfg))
    assert_fails(src, tmp_path / "dst", r"'model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w\d\.weight' has "
                                        r"shape \[\d+, \d+\], but config.json gives")


def test_unknown_key(src, tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.layers.0.self_attn.rotary.weight": np.ones(3, np.float32)}, str(src / "extra.safetensors"))
    index = _index(src)
    index["weight_map"]["model.layers.0.self_attn.rotary.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(src, tmp_path / "dst", r"extra.safetensors: unknown key 'model.layers.0.self_attn.rotary.weight'")


def test_missing_weight(src, tmp_path):
    index = _index(src)
    del index["weight_map"]["model.layers.2.block_sparse_moe.experts.1.w3.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(src, tmp_path / "dst", r"missing weights: model.layers.2.block_sparse_moe.experts.1.w3.weight")


def test_destination_holding_something_else(golden_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_fails(golden_dir / "sharded", other, "not empty and not a conversion output")
    dst = tmp_path / "dst"
    convert(golden_dir / "sharded", dst, progress=False)
    with pytest.raises(CheckpointError, match="another model or with other options"):
        convert(golden_dir, dst, progress=False)  # the fp32 checkpoint: another source
    with pytest.raises(CheckpointError, match="dtype: 'bfloat16' there, 'float32' now"):
        convert(golden_dir / "sharded", dst, dtype="fp32", progress=False)
    with pytest.raises(CheckpointError, match="already holds this complete conversion"):
        convert(golden_dir / "sharded", dst, progress=False)
    assert main(["convert", str(golden_dir), str(dst), "--no-progress"]) == 2  # one clear line, no trace
    assert main(["convert", str(golden_dir), str(tmp_path / "new"), "--workers", "0"]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("workers", [1, 3])
def test_interrupted_conversion_resumes_to_the_clean_result(golden_dir, tmp_path, monkeypatch, clean, workers):
    dst = tmp_path / "dst"
    real, calls = convert_mod.write_tensor, []

    def dies_after_30(*args):
        if len(calls) == 30:
            raise KeyboardInterrupt("killed")
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(convert_mod, "write_tensor", dies_after_30)
    with pytest.raises(KeyboardInterrupt):
        convert(golden_dir / "sharded", dst, progress=False, workers=workers)
    monkeypatch.setattr(convert_mod, "write_tensor", real)
    assert not (dst / mf.COMPLETE_FILE).exists()
    done = list(mf.Manifest(str(dst)).done)
    file_order = [k for k, _ in plan_all(*_plan_args(golden_dir / "sharded"))]
    # recorded: a prefix of the file order, finished before the interruption (all 30 when sequential; with
    # several workers the prefix ends at the earliest tensor still being written, which on a loaded machine
    # can be any of the last ones started)
    assert done == file_order[: len(done)] and set(done) <= set(calls)
    assert len(done) == 30 if workers == 1 else len(done) <= 30
    with pytest.raises(mf.IncompleteCheckpointError, match="did not finish"):
        m1_jax.from_pretrained(dst)
    with pytest.raises(CheckpointError, match="pass --resume"):
        convert(golden_dir / "sharded", dst, progress=False)
    with pytest.raises(CheckpointError, match="partial conversion of another model or with other options"):
        convert(golden_dir / "sharded", dst, dtype="fp32", resume=True, progress=False)

    written = []
    monkeypatch.setattr(convert_mod, "write_tensor", lambda *a: written.append(a[2]) or real(*a))
    convert(golden_dir / "sharded", dst, resume=True, progress=False, workers=workers)
    assert sorted(written) == sorted(file_order[len(done):])  # exactly the unrecorded tensors are redone
    assert (dst / mf.COMPLETE_FILE).exists()
    assert_same_arrays(converted_arrays(dst), clean)


def _plan_args(src_path):
    cfg = M1Config.from_json(src_path / "config.json")
    return cfg, open_source(str(src_path)), targets(cfg, "bfloat16")


def test_cut_manifest_line_is_redone(golden_dir, tmp_path, clean):
    dst = tmp_path / "dst"
    convert(golden_dir / "sharded", dst, progress=False)
    os.remove(dst / mf.COMPLETE_FILE)
    lines = (dst / mf.MANIFEST_FILE).read_text().splitlines(keepends=True)
    (dst / mf.MANIFEST_FILE).write_text("".join(lines[:40]) + lines[40][:10])  # killed mid-line
    convert(golden_dir / "sharded", dst, resume=True, progress=False)
    assert len(mf.Manifest(str(dst)).done) == 79
    assert_same_arrays(converted_arrays(dst), clean)


KILLER = """
import os, signal, sys
import m1_jax.checkpoint_io.manifest as mf
import m1_jax.convert.convert as c

mf.Manifest.__init__.__defaults__ = (0.0,)  # record every finished tensor at once
real, n = c.write_tensor, [0]

def write_then_die(*args):
    if n[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    n[0] += 1
    return real(*args)

c.write_tensor = write_then_die
c.convert(sys.argv[1], sys.argv[2], progress=False, workers=3)
"""


def test_killed_process_resumes_to_the_clean_result(golden_dir, tmp_path, monkeypatch, clean):
    import subprocess
    import sys

    dst = tmp_path / "dst"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(golden_dir / "sharded"), str(dst), "40"],
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (dst / mf.COMPLETE_FILE).exists()
    done = mf.Manifest(str(dst)).done  # the tensors finished before the kill (up to 40: three workers)
    assert 0 < len(done) <= 40
    written, real = [], convert_mod.write_tensor
    monkeypatch.setattr(convert_mod, "write_tensor", lambda *a: written.append(a[2]) or real(*a))
    convert(golden_dir / "sharded", dst, resume=True, progress=False)
    assert len(written) == 79 - len(done) and not set(written) & set(done)
    assert (dst / mf.COMPLETE_FILE).exists()
    assert_same_arrays(converted_arrays(dst), clean)


def test_checkpoint_of_another_layout_is_refused(golden_dir, tmp_path):
    dst = tmp_path / "dst"
    convert(golden_dir / "sharded", dst, progress=False)
    record = json.loads((dst / mf.RECORD_FILE).read_text())
    (dst / mf.RECORD_FILE).write_text(json.dumps(dict(record, layout_version=0)))
    with pytest.raises(CheckpointError, match=r"layout m1-jax-orbax v0, this code reads m1-jax-orbax v1"):
        m1_jax.from_pretrained(dst)
    (dst / mf.RECORD_FILE).write_text(json.dumps(dict(record, key_table="0123")))
    with pytest.raises(CheckpointError, match=r"written with key table 0123"):
        m1_jax.from_pretrained(dst)
