"""``m1 generate`` and ``m1 chat``: streaming output on the golden checkpoint, clear errors on bad input."""

import argparse
import importlib
import io
import json

import numpy as np
import pytest
from cli_runner import run_cli

from m1_jax.tokenizer import ByteTokenizer


@pytest.mark.parametrize("extra, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0, got -1"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
    (["--prompt", "x", "--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--prompt", "x", "--top-k", "-1"], r"--top-k must be an integer >= 0 \(0: off\), got -1"),
    (["--prompt-ids", "1,2,512"], "token id 512 is outside the vocabulary"),
    (["--prompt-ids", "1,x"], "comma-separated integers"),
    (["--prompt", "hello world", "--max-len", "4"], "the prompt has 11 tokens, more than --max-len 4"),
    (["--prompt", "hello", "--max-len", "8", "--max-new-tokens", "9"], "leaves room for 4 new tokens"),
    (["--prompt", "x", "--tokenizer", "/"], "--tokenizer /: no tokenizer.json there"),  # no silent byte fallback
    (["--prompt", "x", "--tokenizer", "/no/such/tokenizer.json"], "--tokenizer /no/such/tokenizer.json: no such file"),
])
def test_generate_errors(golden_dir, capsys, extra, match):
    code, out, err = run_cli(["generate", str(golden_dir), *extra], capsys)
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith("m1 generate: error: ")
    assert pytest.importorskip("re").search(match, err), err


def test_missing_checkpoint_and_bad_tools(tmp_path, golden_dir, capsys):
    code, _, err = run_cli(["generate", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and "no such checkpoint directory" in err
    (tmp_path / "tools.json").write_text("{not json")
    code, _, err = run_cli(["chat", str(golden_dir), "--tools", str(tmp_path / "tools.json")], capsys)
    assert code == 2 and "--tools" in err and "not valid JSON" in err
    (tmp_path / "tools.json").write_text(json.dumps([{"description": "no name"}]))
    code, _, err = run_cli(["chat", str(golden_dir), "--tools", str(tmp_path / "tools.json")], capsys)
    assert code == 2 and "tools[0]" in err


def test_generate_streams_the_greedy_continuation(golden_dir, capsys):
    inputs = np.load(golden_dir / "inputs.npz")["prompt_ids"][0]
    greedy = np.load(golden_dir / "outputs.npz")["greedy_tokens"][0]
    ids = ",".join(map(str, inputs))
    code, out, err = run_cli(["generate", str(golden_dir), "--prompt-ids", ids, "--max-new-tokens", "8",
                              "--ignore-eos", "--chunk-size", "8"], capsys)
    assert code == 0, err
    assert out == ByteTokenizer(512).decode(greedy.tolist()) + "\n"


def test_chat_session_reuses_the_cache(golden_dir, monkeypatch, capsys):
    from m1_jax.commands.chat import Session
    from m1_jax.loading import from_pretrained
    from m1_jax.sampling import SamplingParams

    model, tok = from_pretrained(golden_dir), ByteTokenizer(512)
    args = argparse.Namespace(max_len=256, max_new_tokens=4, seed=0, chunk_size=8, show_reasoning=False)
    s = Session(model, tok, SamplingParams.create(), args, None, "Be brief.")
    s.messages.append({"role": "user", "content": "hi"})
    first = s.reply(out=io.StringIO())
    assert int(s.cache.lengths[0]) == len(s.seen)
    seen = list(s.seen)
    s.messages.append({"role": "tool", "name": "get_time", "content": "12:00"})
    s.reply(out=io.StringIO())
    assert s.seen[: len(seen)] == seen  # the second turn extended the first one's cache
    assert int(s.cache.lengths[0]) == len(s.seen)
    assert s.messages[2] == {"role": "assistant", "content": first}
    assert s.history[: len(s.seen)] == s.seen


def test_generate_escapes_control_bytes_and_says_it_compiles(golden_dir, monkeypatch, capsys):
    """A byte-level model's raw control bytes reach the terminal escaped; one line says the model compiles."""
    import m1_jax.generation

    emitted = list(b"ok\x1b[2J\r\x00\n")

    def fake_stream(model, ids, **kw):
        yield from ((t, None) for t in emitted)

    monkeypatch.setattr(m1_jax.generation, "stream", fake_stream)
    code, out, err = run_cli(["generate", str(golden_dir), "--prompt", "hi", "--max-new-tokens", "8"], capsys)
    assert code == 0, err
    assert out == "ok\\x1b[2J\\x0d\\x00\n\n"
    assert err == "m1 generate: compiling the model for a 2-token prompt (first call only) ...\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_chat_prompts_on_a_terminal_and_says_it_compiles(golden_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Terminal("hi\n/exit\n"))
    code, out, err = run_cli(["chat", str(golden_dir), "--max-new-tokens", "2", "--max-len", "256"], capsys)
    assert code == 0, err
    assert out.startswith("> ") and out.count("> ") >= 2  # asked for each line: "hi", then "/exit"
    assert err.count("compiling the model") == 1 and "(first call only)" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))  # not a terminal: no prompt
    code, out, _ = run_cli(["chat", str(golden_dir)], capsys)
    assert code == 0 and out == ""


@pytest.mark.parametrize("command", ["generate", "chat", "train", "rl"])
def test_every_option_has_help(command):
    parser = argparse.ArgumentParser()
    importlib.import_module(f"m1_jax.commands.{command}").add_arguments(parser)
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not missing, f"m1 {command}: options without --help text: {missing}"


# ----------------------------------------------------------------------------- `m1 train` workdirs
def test_generate_and_chat_open_a_training_workdir(trained_workdir, monkeypatch, capsys):
    import m1_jax
    from m1_jax.tokenizer import escape_controls

    model = m1_jax.from_pretrained(trained_workdir)
    prompt = ByteTokenizer(512).encode("def ")
    want = np.asarray(m1_jax.generate(model, [prompt], max_new_tokens=5))[0].tolist()
    code, out, err = run_cli(["generate", str(trained_workdir), "--prompt", "def ", "--max-new-tokens", "5",
                              "--ignore-eos"], capsys)
    assert code == 0, err
    assert out == escape_controls(ByteTokenizer(512).decode(want)) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    code, out, err = run_cli(["chat", str(trained_workdir / "checkpoints" / "1"), "--max-new-tokens", "2",
                              "--max-len", "256"], capsys)
    assert code == 0 and "error" not in err, err
    assert "checkpoints/1" in err and out.endswith("\n")


def _tokenizer_of(path, tokenizer=None):
    from m1_jax.commands.runtime import load_config_and_tokenizer

    return load_config_and_tokenizer(argparse.Namespace(checkpoint=str(path), tokenizer=tokenizer))[1]


def _set_run_tokenizer(step_dir, value):
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["run"]["data"]["tokenizer"] = value
    meta_file.write_text(json.dumps(meta))


def test_the_tokenizer_of_a_training_run_is_its_data_tokenizer(trained_workdir, tmp_path, capsys):
    """`data.tokenizer` of the run config: "byte", or a directory whose tokenizer.json the run used."""
    import shutil

    from tokenizers import Tokenizer, models

    from m1_jax.tokenizer import HFTokenizer

    assert isinstance(_tokenizer_of(trained_workdir), ByteTokenizer)
    w = tmp_path / "w"
    shutil.copytree(trained_workdir, w)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1}, unk_token="[UNK]")).save(str(tok_dir / "tokenizer.json"))
    _set_run_tokenizer(w / "checkpoints" / "2", str(tok_dir))
    tok = _tokenizer_of(w)
    assert isinstance(tok, HFTokenizer) and tok.path == tok_dir / "tokenizer.json"
    assert isinstance(_tokenizer_of(w, tokenizer="byte"), ByteTokenizer)  # --tokenizer still decides
    _set_run_tokenizer(w / "checkpoints" / "2", str(tmp_path / "gone"))
    code, _, err = run_cli(["generate", str(w), "--prompt", "x"], capsys)
    assert code == 2 and f"{w}/checkpoints/2/meta/metadata: data.tokenizer" in err and "--tokenizer" in err, err
    code, _, err = run_cli(["generate", str(w / "checkpoints" / "1"), "--prompt", "x", "--max-new-tokens", "0"],
                           capsys)
    assert code == 2 and "--max-new-tokens" in err, err  # step 1 still says "byte": past the tokenizer


def test_generate_verify_checks_the_recorded_checksums(golden_dir, tmp_path, capsys):
    from m1_jax.convert.convert import convert

    dst = tmp_path / "bf16"
    convert(golden_dir / "sharded", dst, progress=False)
    chunk = dst / "state" / "periods.layers.1.block_sparse_moe.w2.value" / "1.2.0.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40
    chunk.write_bytes(bytes(data))
    code, _, err = run_cli(["generate", str(dst), "--prompt", "x", "--verify"], capsys)
    assert code == 2 and "periods.layers.1.block_sparse_moe.w2.value[1, 2]" in err and "checksum" in err, err
