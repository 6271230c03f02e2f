"""``m1 demo``: flags checked before anything is built, text (not ids) out, control bytes escaped."""

import re

import pytest
from cli_runner import run_cli

from m1_jax import cli
from m1_jax.tokenizer import ByteTokenizer


@pytest.mark.parametrize("extra, match", [
    (["--prompt-len", "0"], "--prompt-len must be >= 1, got 0"),
    (["--prompt-len", "-3"], "--prompt-len must be >= 1, got -3"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1, got 0"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
    (["--seed", str(2 ** 70)], r"--seed must be in \[0, 2\*\*32\)"),
    (["--prompt-len", "4000", "--new-tokens", "100"], "4100 tokens, more than the 4096 positions of the model"),
    (["--config", "no-such-preset"], "no-such-preset"),
])
def test_demo_flag_errors(capsys, extra, match):
    code, out, err = run_cli(["demo", *extra], capsys)
    assert code == 2, err
    assert "Traceback" not in err and out == ""  # nothing built, nothing printed
    assert err.startswith("m1 demo: error: ") and len(err.splitlines()) == 1, err
    assert re.search(match, err), err


def test_demo_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    options = out[out.index("options:"):]
    for flag in ("--config", "--prompt-len", "--new-tokens", "--seed"):
        # "  --flag METAVAR  help", or the help on the lines below when the flag is long
        entry = re.search(rf"^  {flag} [A-Z_]+(.*?)(?=^  -|\Z)", options, re.M | re.S)
        assert entry and entry.group(1).strip(), f"{flag} has no help text: {options}"


def test_token_text_is_decoded_and_escaped():
    from m1_jax.commands.demo import token_text

    tok = ByteTokenizer(512)
    ids = list(b"Hi\x1b[2J\r\n\tok") + [tok.eos_token_id]
    assert token_text(tok, ids) == "Hi\\x1b[2J\\x0d\n\tok<end_of_sentence>"
    assert token_text(None, [5, 70000]) == "ids [5, 70000]"  # no byte-level tokenizer: the ids


def test_demo_prints_text(capsys):
    code, out, err = run_cli(["demo", "--prompt-len", "5", "--new-tokens", "3"], capsys)
    assert code == 0, err
    prompt = next(line for line in out.splitlines() if line.startswith("prompt (5 tokens"))
    assert re.fullmatch(r"prompt \(5 tokens, random printable bytes\): [ -~]{5}", prompt), prompt
    continuation = out[out.index("greedy continuation (3 tokens, random weights"):]
    assert not continuation.split(": ", 1)[1].startswith("ids [")  # text, not a list of ids
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out)  # control bytes come escaped
