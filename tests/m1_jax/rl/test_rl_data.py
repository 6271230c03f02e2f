"""Prompt records: JSONL and generated sources, rendering in M1's chat template, the resumable stream."""

import json

import pytest

from m1_jax import chat
from m1_jax.rl.data import PromptError, PromptStream, Records, render_prompt, reward_view
from m1_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer(512)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_and_messages_render_as_the_chat_template():
    ids = render_prompt({"prompt": "2+2?"}, TOK, system="Be brief.")
    text = chat.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                       add_generation_prompt=True)
    assert ids == TOK.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert render_prompt({"messages": msgs}, TOK) == TOK.encode(chat.render(msgs, add_generation_prompt=True))


def test_bad_records_name_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(PromptError, match=r"p\.jsonl:2: not valid JSON"):
        Records(str(path))
    path.write_text('{"prompt": "a"}\n\n[1, 2]\n')
    with pytest.raises(PromptError, match=r"p\.jsonl:3: expected a JSON object, got list"):
        Records(str(path))
    records = Records(_jsonl(path, [{"question": "a"}]))
    with pytest.raises(PromptError, match=r"p\.jsonl:1: expected a 'prompt' string or a 'messages' list"):
        PromptStream(records, TOK).next()
    with pytest.raises(PromptError, match="cannot read prompts"):
        Records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PromptError, match="holds no prompt records"):
        Records(str(tmp_path / "empty.jsonl"))


def test_long_prompt_is_an_error_naming_it(tmp_path):
    records = Records(_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 300}]))
    with pytest.raises(PromptError, match=r"p\.jsonl:1: the prompt has \d+ tokens, more than "
                                          r"rollout\.max_prompt_tokens=100"):
        PromptStream(records, TOK, max_tokens=100).next()


def test_stream_shuffles_each_epoch_and_resumes_where_it_was(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    records = Records(_jsonl(tmp_path / "p.jsonl", rows))
    stream = PromptStream(records, TOK, seed=1)
    seen = [reward_view(r)["answer"] for r, _ in stream.batch(10)]
    assert sorted(seen[:5]) == sorted(seen[5:]) == [str(i) for i in range(5)]
    assert seen[:5] != seen[5:]  # reshuffled (seed 1: the two epochs' orders differ)
    stream = PromptStream(records, TOK, seed=1)
    stream.batch(7)
    state = stream.get_state()
    rest = [r["answer"] for r, _ in stream.batch(6)]
    again = PromptStream(records, TOK, seed=1)
    again.set_state(json.loads(json.dumps(state)))
    assert [r["answer"] for r, _ in again.batch(6)] == rest
    with pytest.raises(PromptError, match="no prompt position"):
        again.set_state({})


def test_task_source_is_endless_and_held_out_split_is_bounded():
    stream = PromptStream(Records("task:add", seed=0), TOK, shuffle=True)
    batch = stream.batch(3)
    assert [r["_where"] for r, _ in batch] == ["task:add train #0", "task:add train #1", "task:add train #2"]
    assert "_where" not in reward_view(batch[0][0])
    assert len(Records("task:add", split="eval", size=10)) == 10
    with pytest.raises(PromptError, match="at most 4096 held-out records"):
        Records("task:add", split="eval", size=5000)
