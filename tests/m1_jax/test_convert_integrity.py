"""A converted directory that lost or damaged files after its conversion, and a disk that fills up during
`m1 convert` / `m1 export`: one clear line naming the file each time, no zeros exported in place of
missing data, no `COMPLETE` marker that lies."""

import builtins
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert import assert_same_arrays, converted_arrays

import m1_jax
from m1_jax.checkpoint_io import manifest as mf
from m1_jax.checkpoint_io import orbax_layout as ow
from m1_jax.checkpoint_io.errors import CheckpointError
from m1_jax.cli import main
from m1_jax.convert import convert as convert_mod
from m1_jax.convert.convert import convert
from m1_jax.convert.export import export

REPO = Path(__file__).resolve().parents[2]
W2 = "periods.layers.1.block_sparse_moe.w2.value"  # layer 3's expert down projections
CHUNK = f"{W2}/1.2.0.0"  # the chunk of model.layers.3.block_sparse_moe.experts.2.w2.weight
KEY = "model.layers.3.block_sparse_moe.experts.2.w2.weight"


@pytest.fixture(scope="module")
def converted(golden_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("integrity") / "bf16"
    convert(golden_dir / "sharded", dst, progress=False)
    return dst


@pytest.fixture
def ckpt(converted, tmp_path):
    """A copy of the converted golden checkpoint to damage."""
    out = tmp_path / "ckpt"
    shutil.copytree(converted, out)
    return out


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    assert e.value.__suppress_context__ or (e.value.__cause__ is None and e.value.__context__ is None)
    return msg


def cli_error(argv, capsys) -> str:
    """Runs `m1 ARGV`, which must fail with exactly one line on stderr; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_missing_chunk_fails_export_and_load_naming_the_file(ckpt, tmp_path, capsys):
    (ckpt / mf.STATE_DIR / CHUNK).unlink()
    err = cli_error(["export", str(ckpt), str(tmp_path / "hf"), "--no-progress"], capsys)
    assert f"{ckpt}/state/{CHUNK}: missing" in err and W2 in err, err
    assert not (tmp_path / "hf").exists()  # nothing half-written left behind
    msg = one_line_error(m1_jax.from_pretrained, ckpt)
    assert f"{ckpt}/state/{CHUNK}: missing" in msg, msg


def test_a_truncated_chunk_fails_export_and_load_naming_the_file(ckpt, tmp_path):
    os.truncate(ckpt / mf.STATE_DIR / CHUNK, 1000)
    for fn, args in [(export, (ckpt, tmp_path / "hf")), (m1_jax.from_pretrained, (ckpt,))]:
        msg = one_line_error(fn, *args, **({"progress": False} if fn is export else {}))
        assert f"{ckpt}/state/{CHUNK}: 1000 bytes, a chunk of {W2} has 3072: truncated" in msg, msg


def test_changed_bytes_fail_the_checksums_at_export_and_at_load_with_verify(ckpt, tmp_path, capsys):
    chunk = ckpt / mf.STATE_DIR / CHUNK
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    err = cli_error(["export", str(ckpt), str(tmp_path / "hf"), "--no-progress"], capsys)
    assert f"{ckpt}/state/{W2}[1, 2]" in err and KEY in err and "checksum" in err, err
    assert not (tmp_path / "hf").exists()
    m1_jax.from_pretrained(ckpt)  # the cheap checks (every file present, at its size) pass
    msg = one_line_error(m1_jax.from_pretrained, ckpt, verify=True)
    assert f"{ckpt}/state/{W2}[1, 2]" in msg and "checksum" in msg, msg


def test_a_manifest_missing_a_tensor_fails_export(ckpt, tmp_path):
    lines = (ckpt / mf.MANIFEST_FILE).read_text().splitlines(keepends=True)
    (ckpt / mf.MANIFEST_FILE).write_text("".join(line for line in lines if KEY not in line))
    msg = one_line_error(export, ckpt, tmp_path / "hf", progress=False)
    assert f"{ckpt}/{mf.MANIFEST_FILE}" in msg and "periods.layers.1.block_sparse_moe.w2[1, 2]" in msg, msg


def test_a_corrupted_metadata_file_is_named(ckpt, tmp_path):
    (ckpt / mf.STATE_DIR / ow.METADATA_FILE).write_text("")
    for fn, args in [(export, (ckpt, tmp_path / "hf")), (m1_jax.from_pretrained, (ckpt,))]:
        msg = one_line_error(fn, *args, **({"progress": False} if fn is export else {}))
        assert f"{ckpt}/state/_METADATA: not valid JSON" in msg, msg


def test_an_empty_complete_marker_counts_as_absent(ckpt, golden_dir, converted):
    (ckpt / mf.COMPLETE_FILE).write_text("")
    with pytest.raises(mf.IncompleteCheckpointError, match="did not finish"):
        m1_jax.from_pretrained(ckpt)
    convert(golden_dir / "sharded", ckpt, resume=True, progress=False)  # finishes: nothing left to write
    assert mf.is_complete(str(ckpt))
    assert_same_arrays(converted_arrays(ckpt), converted_arrays(converted))


def disk_full(*args, **kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk(monkeypatch, which, room: int) -> None:
    """Files opened for writing whose name ``which(name)`` accepts share ``room`` bytes of free space: a
    write past it fails with ENOSPC, as on a full disk (other files are written as usual)."""
    real_open, used = builtins.open, [0]

    class OnFullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            used[0] += len(data.encode()) if isinstance(data, str) else memoryview(data).nbytes
            if used[0] > room:
                disk_full()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        named = isinstance(file, (str, os.PathLike)) and which(os.path.basename(file))
        return OnFullDisk(f) if named and any(c in mode for c in "wax+") else f

    monkeypatch.setattr(builtins, "open", open_)


def test_a_full_disk_while_marking_complete_leaves_no_marker(golden_dir, tmp_path, monkeypatch, converted):
    dst = tmp_path / "dst"
    fill_disk(monkeypatch, lambda name: name.startswith(mf.COMPLETE_FILE), room=0)
    with pytest.raises(CheckpointError, match=f"^{dst}: no space left on the device"):
        convert(golden_dir / "sharded", dst, progress=False)
    monkeypatch.undo()
    assert not mf.is_complete(str(dst))
    assert [p.name for p in dst.iterdir() if p.name.startswith(mf.COMPLETE_FILE)] == []
    with pytest.raises(mf.IncompleteCheckpointError):
        m1_jax.from_pretrained(dst)
    convert(golden_dir / "sharded", dst, resume=True, progress=False)
    assert mf.is_complete(str(dst))
    assert_same_arrays(converted_arrays(dst), converted_arrays(converted))


def test_a_full_disk_during_conversion_is_one_line_and_resumable(golden_dir, tmp_path, monkeypatch, capsys,
                                                                 converted):
    """Chunk writes fail with ENOSPC, and so does the manifest's last record (the same full disk)."""
    dst = tmp_path / "dst"
    real_write, real_flush, n = ow._write_all, mf.Manifest.flush, [0]

    def write_until_full(*args):
        n[0] += 1
        if n[0] > 20:
            disk_full()
        return real_write(*args)

    def flush_on_a_full_disk(self):
        if n[0] > 20 and self._pending:
            disk_full()
        return real_flush(self)

    monkeypatch.setattr(ow, "_write_all", write_until_full)
    monkeypatch.setattr(mf.Manifest, "flush", flush_on_a_full_disk)
    err = cli_error(["convert", str(golden_dir / "sharded"), str(dst), "--no-progress", "--workers", "1"], capsys)
    assert err.startswith(f"m1 convert: error: {dst}: no space left on the device") and "--resume" in err, err
    monkeypatch.undo()
    assert not mf.is_complete(str(dst))
    assert main(["convert", str(golden_dir / "sharded"), str(dst), "--no-progress", "--resume"]) == 0
    assert_same_arrays(converted_arrays(dst), converted_arrays(converted))


def test_a_full_disk_under_a_tensorstore_write_is_one_line(golden_dir, tmp_path, monkeypatch):
    """TensorStore reports ENOSPC as a ValueError (this is its message on a full tmpfs)."""
    dst = tmp_path / "dst"

    def tensorstore_on_a_full_disk(*args):
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{dst}/state/x/6.0": Failed writing: '
                         f'"{dst}/state/x/6.0.__lock": Failed to write 4096 bytes to file 4: No space left on '
                         "device [os_error_code='28']")

    monkeypatch.setattr(convert_mod, "write_tensor", tensorstore_on_a_full_disk)
    msg = one_line_error(convert, golden_dir / "sharded", dst, progress=False)
    assert msg.startswith(f"{dst}: no space left on the device"), msg


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(converted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "hf"
    fill_disk(monkeypatch, lambda name: name.endswith(".safetensors") or ".safetensors." in name, room=250_000)
    err = cli_error(["export", str(converted), str(out), "--no-progress", "--max-shard-size", "100KB"], capsys)
    assert err.startswith(f"m1 export: error: {out}: no space left on the device"), err
    assert not out.exists()
    monkeypatch.undo()
    export(converted, out, progress=False)  # the same command goes through once there is room


FULL_TMPFS = """
set -e
mount -t tmpfs -o size=200k tmpfs "$MNT"
set +e
"$PY" -m m1_jax.cli convert "$SRC" "$MNT/out" --no-progress 2> "$ERR"
echo "first=$?"
mount -o remount,size=4m "$MNT"
"$PY" -m m1_jax.cli convert "$SRC" "$MNT/out" --no-progress --resume > /dev/null
echo "resumed=$?"
test -s "$MNT/out/COMPLETE" && echo complete
"""


def test_a_really_full_disk(golden_dir, tmp_path):
    """`m1 convert` onto a 200 KB tmpfs (in a private mount namespace), then the same with --resume once
    it has room. Needs unprivileged user namespaces (skipped without)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespaces here (unshare -rm)")
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, MNT=str(tmp_path / "mnt"), PY=sys.executable, SRC=str(golden_dir / "sharded"),
               ERR=str(tmp_path / "err"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_TMPFS], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    err = (tmp_path / "err").read_text()
    assert proc.stdout.split() == ["first=2", "resumed=0", "complete"], proc.stdout + proc.stderr + err
    assert len(err.splitlines()) == 1 and "no space left on the device" in err, err
