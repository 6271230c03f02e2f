"""Generated tasks: reproducible records with correct answers, and a training split without held-out problems."""

import pytest

from m1_jax.rl import tasks
from m1_jax.rl.rewards import exact_match


def _question(record):
    return record["messages"][0]["content"]


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_records_are_reproducible_and_their_answers_score_1(name):
    task = tasks.get_task(f"task:{name}")
    first = [task.record(0, "train", i) for i in range(50)]
    assert first == [task.record(0, "train", i) for i in range(50)]
    assert first != [task.record(1, "train", i) for i in range(50)]
    for r in first:
        assert r["messages"][0]["role"] == "user"
        assert exact_match(r["answer"], r) == 1.0
    assert len({_question(r) for r in first}) > 40


def test_answers_are_right():
    task = tasks.get_task("task:sort")
    for i in range(20):
        r = task.record(3, "eval", i)
        digits = _question(r).removeprefix("sort ")
        assert 4 <= len(digits) <= 6 and r["answer"] == "".join(sorted(digits))
    task = tasks.get_task("task:add")
    for i in range(20):
        r = task.record(3, "train", i)
        a, b = _question(r).split("+")
        assert r["answer"] == str(int(a) + int(b))


def test_training_split_never_yields_a_held_out_problem():
    task = tasks.get_task("task:add")  # 8,100 problems: the 4,096 held-out ones collide often
    held_out = {_question(task.record(0, "eval", i)) for i in range(tasks.HELD_OUT_RESERVED)}
    train = [_question(task.record(0, "train", i)) for i in range(2000)]
    assert not held_out & set(train)


def test_supervised_record_adds_the_answer_as_the_reply():
    task = tasks.get_task("task:sort")
    r = task.supervised(0, 5)
    assert r["messages"][:1] == task.record(0, "train", 5)["messages"]
    assert r["messages"][1] == {"role": "assistant", "content": task.record(0, "train", 5)["answer"]}


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="task:sort, task:add"):
        tasks.get_task("task:chess")
