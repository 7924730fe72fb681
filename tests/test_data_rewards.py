"""Generated tasks and the rule-based rewards the loop uses."""
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


FORMAT_CASES = [
    ("<think>a</think><answer>7</answer>", 1.0),
    ("<think></think><answer>7</answer>", 1.0),
    ("  <think>x\ny</think>\n<answer> 7 </answer>\n", 1.0),
    ("<think>a</think><answer></answer>", 0.0),                      # empty answer
    ("<think>a</think>x<answer>7</answer>", 0.0),                    # text between blocks
    ("<answer>7</answer><think>a</think>", 0.0),                     # wrong order
    ("<think>a<think>b</think><answer>7</answer>", 0.0),              # two <think>
    ("<think>a</think><answer>7</answer><answer>8</answer>", 0.0),    # two answers
    ("<think>a</think><answer>7</answer> trailing", 0.0),
    ("7", 0.0),
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion) == expected


ACCURACY_CASES = [
    ("<think>9</think><answer>7</answer>", "7", 1.0),
    ("<think>7</think><answer>9</answer>", "7", 0.0),                 # thinking never counts
    ("<think></think><answer>yes</answer>", "yes", 1.0),
    ("<think></think><answer>Yes</answer>", "yes", 1.0),
    ("<think></think><answer>no</answer>", "yes", 0.0),
    ("<think></think><answer>$\\frac{1}{2}$</answer>", "0.5", 1.0),
    ("<think></think><answer>\\boxed{3}</answer>", "3", 1.0),
    ("<think></think><answer>7.0</answer>", "7", 1.0),
    ("the answer is 7", "7", 0.0),                                    # no answer tag
    ("<think></think><answer>2^{2^{2^{2^{2^{2}}}}}</answer>", "7", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY_CASES)
def test_accuracy_reward(completion, gold, expected):
    assert rewards.accuracy_reward(completion, gold) == expected


def test_tag_reward_is_partial_in_order():
    assert rewards.tag_reward("<think>") == 0.25
    assert rewards.tag_reward("<think></think><answer>") == 0.75
    assert rewards.tag_reward("<think></think><answer>1</answer>") == 1.0
    assert rewards.tag_reward("</think><think>") == 0.25  # <think> found; </think> not after it
    assert rewards.tag_reward("</think><answer>") == 0.0
    assert rewards.tag_reward("<think><think>") == 0.0


def test_score_weights_components_and_reports_format_accuracy():
    totals, parts = rewards.score(["<think></think><answer>7</answer>", "junk"], ["7", "7"], {"accuracy": 1.0, "tags": 0.5})
    assert totals == [1.5, 0.0] and parts["format"] == [1.0, 0.0] and parts["tags"] == [1.0, 0.0]
    with pytest.raises(ConfigError, match="unknown reward"):
        rewards.score(["x"], ["y"], {"nope": 1.0})


def test_registry_decorator_adds_a_reward():
    @rewards.reward("length_test")
    def short(completion, answer):
        return 1.0 if len(completion) < 5 else 0.0
    try:
        totals, _ = rewards.score(["abc", "abcdef"], ["", ""], {"length_test": 2.0})
        assert totals == [2.0, 0.0]
    finally:
        rewards.REWARDS.pop("length_test")
