"""Generated tasks, loaders and chat messages."""
import json

import pytest

from lmmr1_lite import rewards
from lmmr1_lite.config import ConfigError
from lmmr1_lite.data import TASKS, build_messages, load_jsonl, load_splits


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_held_out_and_self_consistent(task):
    train, test = load_splits(task, 300, 40, seed=3)
    again_train, again_test = load_splits(task, 300, 40, seed=3)
    assert [(e.prompt, e.answer) for e in train] == [(e.prompt, e.answer) for e in again_train]
    assert [(e.prompt, e.answer) for e in test] == [(e.prompt, e.answer) for e in again_test]
    assert len(train) == 300 and len(test) == 40
    assert not {e.prompt for e in test} & {e.prompt for e in train}, "test prompts must be held out"
    other, _ = load_splits(task, 300, 40, seed=4)
    assert [e.prompt for e in other] != [e.prompt for e in train]
    for e in train[:50] + test:  # the gold answer, well formatted, earns full reward from the verifier
        completion = f"<think>{e.prompt}</think><answer>{e.answer}</answer>"
        assert rewards.format_reward(completion) == 1.0 and rewards.accuracy_reward(completion, e.answer) == 1.0


def test_task_answers_are_right():
    train, _ = load_splits("tiny_compare", 200, 10, seed=0)
    for e in train:
        a, b = int(e.prompt[0]), int(e.prompt[2])
        assert e.answer == ("yes" if a < b else "no")
    train, _ = load_splits("tiny_max", 200, 10, seed=0)
    for e in train:
        a, b = map(int, e.prompt[4:-1].split(","))
        assert e.answer == str(max(a, b))


def test_jsonl_errors_name_file_row_and_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n\n" + json.dumps({"prompt": "2+2", "answer": "4"}) + "\n")
    assert [e.answer for e in load_jsonl(good)] == ["2", "4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"prompt": "1+1"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: field 'answer'"):
        load_jsonl(bad)


def test_messages_put_images_before_text():
    from lmmr1_lite.data import Example
    msgs = build_messages(Example("what color", "red", ["a.png"]), "be brief")
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1]["content"][0] == {"type": "image", "image": "a.png"} and msgs[1]["content"][1]["text"] == "what color"
